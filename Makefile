# The README's two commands. Both create or reuse .venv and install the package once per
# pyproject.toml and setup.py content (the stamp file's name carries its hash), then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py | sha256sum | cut -c1-16)

.PHONY: demo test

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	-$(PY) -m pip install -q --upgrade pip  # best effort: an old pip still installs the package
	$(PY) -m pip install -q -e '.[test,bench]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(PY) examples/train_detection.py

test: $(STAMP)
	$(PY) -m pytest -q
