"""A slice of Ultralytics' own test suite, from the sdist of the installed release, with the plugin
on and with it off (``ULTRALYTICS_DP_PLUGIN=0``): every test must end the same way. An installed
plugin changes nothing for a run without DP keys, and this is how a future change that breaks
plain Ultralytics gets caught. The slice needs no download (the sdist comes from the package
index, as ``make test``'s install does); Ultralytics' settings and weights go to a temporary
folder, never the user's."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

# tests of model building, configuration, data loading, results and checkpoints (no weights, no datasets to fetch)
SLICE = ("(model_forward or cfg_init or cfg_rejects or utils_init or data_utils or dataloader or label_encoding or "
         "results_plot or annotator or restricted_load or temporary_modules or results_update_probs or dense_result) "
         "and not (data_annotator or restricted_load_threaded)")  # those two download weights


def _outcomes(suite: Path, env: dict[str, str], report: Path) -> dict[str, str]:
    """Each test's outcome (passed, failed, skipped) in one run of the slice."""
    subprocess.run([sys.executable, "-m", "pytest", "tests/test_python.py", "-k", SLICE, "-q", "-p", "no:cacheprovider",
                    f"--junitxml={report}"], cwd=suite, env=env, capture_output=True, text=True, timeout=1500)
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        kinds = {child.tag for child in case} & {"failure", "error", "skipped"}
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = kinds.pop() if kinds else "passed"
    return outcomes


@pytest.mark.slow
def test_a_slice_of_ultralytics_own_tests_ends_the_same_with_the_plugin_on_and_off(tmp_path):
    import ultralytics

    version = ultralytics.__version__
    fetched = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                              "-d", tmp_path, f"ultralytics=={version}"], capture_output=True, text=True, timeout=600)
    assert fetched.returncode == 0, fetched.stderr[-2000:]
    (sdist,) = tmp_path.glob("ultralytics-*.tar.gz")
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(f"ultralytics-{version}/tests/")]
        archive.extractall(tmp_path, members=members, filter="data")
    suite = tmp_path / f"ultralytics-{version}"
    env = {**os.environ, "YOLO_CONFIG_DIR": str(tmp_path / "settings"), "YOLO_OFFLINE": "1"}
    on = _outcomes(suite, env, tmp_path / "on.xml")
    off = _outcomes(suite, {**env, "ULTRALYTICS_DP_PLUGIN": "0"}, tmp_path / "off.xml")
    assert on == off
    assert sum(v == "passed" for v in on.values()) >= 20
