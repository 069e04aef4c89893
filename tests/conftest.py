"""Test isolation: private caches, no network, small threads."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

_TMP = Path(tempfile.mkdtemp(prefix="ultralytics-dp-tests-"))
# Before anything imports Ultralytics: its settings and font live here, datasets are built here.
# Set unconditionally: a test run never touches the user's settings, data cache or privacy ledger.
os.environ["YOLO_CONFIG_DIR"] = str(_TMP / "config")
os.environ["ULTRALYTICS_DP_DATA"] = str(_TMP / "data")
os.environ["ULTRALYTICS_DP_LEDGER"] = str(_TMP / "ledger.sqlite")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every outgoing connection and DNS lookup fails inside the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network disabled by the no_network fixture")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="session")
def tiny_det(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small digits-det (imgsz 64, 32 train / 16 val images) for fast training tests."""
    from ultralytics_dp.datasets import embedded as datasets

    return datasets.build("digits-det", imgsz=64, n_train=32, n_val=16, root=tmp_path_factory.mktemp("det"))


@pytest.fixture(autouse=True)
def own_default_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's default ledger is its own: runs of different tests (and deltas) never compose."""
    monkeypatch.setenv("ULTRALYTICS_DP_LEDGER", str(tmp_path / "default-ledger.sqlite"))
