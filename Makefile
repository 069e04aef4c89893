# The README's two commands. Both create or reuse .venv and install the package once per
# pyproject.toml, setup.py and constraints.txt content (the stamp file's name carries its hash), then
# run. constraints.txt pins the exact versions this repository tests with; the package states ranges.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py constraints.txt | sha256sum | cut -c1-16)

.PHONY: demo test test-compat

$(STAMP): pyproject.toml setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	-$(PY) -m pip install -q --upgrade pip  # best effort: an old pip still installs the package
	$(PY) -m pip install -q -c constraints.txt -e '.[test,bench]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(PY) examples/train_detection.py

# the page tests render privacy.html in headless Chromium: Debian's package, where apt-get can install it
test: $(STAMP)
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1) || \
	  echo "no chromium (apt-get could not install it): the browser tests are skipped"
	$(PY) -m pytest -q

# every Ultralytics release of the tested window's ends and two between, each in its own venv (benchmarks/COMPAT.md)
test-compat: $(STAMP)
	$(PY) benchmarks/compat.py
