"""hooks.when_imported: the callback runs after the module executes, whoever imports it."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from ultralytics_dp.integration.hooks import when_imported


def test_callback_runs_once_after_a_later_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "dp_hook_probe.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    when_imported("dp_hook_probe", lambda m: seen.append(m.VALUE))
    assert seen == [] and "dp_hook_probe" not in sys.modules
    module = importlib.import_module("dp_hook_probe")
    assert seen == [1]
    importlib.reload(module)
    assert seen == [1]  # once
    assert module.__spec__.origin == str(tmp_path / "dp_hook_probe.py")
    del sys.modules["dp_hook_probe"]


def test_callback_runs_at_once_for_an_imported_module() -> None:
    seen = []
    when_imported("json", lambda m: seen.append(m.__name__))
    assert seen == ["json"]
