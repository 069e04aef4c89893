"""Ultralytics runs with every network connection refused, and the package installs cleanly."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*cmd: object, cwd: Path | None = None) -> str:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.mark.slow
def test_non_private_training_runs_offline(no_network: None, tiny_det: Path, tmp_path: Path) -> None:
    import ultralytics_dp  # noqa: F401  (import hooks)
    from ultralytics import YOLO

    from ultralytics_dp.integration.offline import patch_ultralytics

    patch_ultralytics()
    model = YOLO("yolo26n.yaml")
    model.train(
        data=str(tiny_det), epochs=1, imgsz=64, batch=8, workers=0, plots=False,
        project=str(tmp_path), name="run", exist_ok=True,
    )
    assert (tmp_path / "run" / "weights" / "last.pt").stat().st_size > 0


@pytest.mark.slow
def test_pip_install_into_fresh_venv(tmp_path: Path) -> None:
    """Build a wheel of the package and install it into a new venv; the heavy dependencies come
    from this environment through a .pth file, so pip has nothing to download."""
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", tmp_path / "dist", REPO)
    (wheel,) = (tmp_path / "dist").glob("ultralytics_dp-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    site = _run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    # the venv's bundled setuptools is older than torch requires: use this environment's instead
    _run(py, "-m", "pip", "uninstall", "-q", "-y", "setuptools")
    Path(site, "outer-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(py, "-m", "pip", "install", "-q", "--no-index", wheel)
    out = subprocess.run([env_dir / "bin" / "yolo-dp", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "yolo-dp" in out.stdout
    installed = _run(py, "-c", "import ultralytics_dp; print(ultralytics_dp.__file__)", cwd=tmp_path)
    assert str(env_dir) in installed, "imported the checkout instead of the installed package"
