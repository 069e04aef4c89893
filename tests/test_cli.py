"""The yolo-dp command line: planning, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ultralytics_dp.accounting import compute_epsilon
from ultralytics_dp.cli import main


def yolo_dp(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ultralytics_dp.cli", *args], capture_output=True, text=True)


def test_help_and_version():
    assert yolo_dp("--help").returncode == 0
    out = yolo_dp("version")
    assert out.returncode == 0 and out.stdout.strip()


def test_privacy_noise_reports_epsilon_steps_and_q(capsys):
    assert main(["privacy", "n=1000", "batch=50", "epochs=2", "delta=1e-5", "noise=1.1"]) == 0
    out = capsys.readouterr().out
    assert "q=0.05" in out and "40 steps" in out
    expected = compute_epsilon(noise_multiplier=1.1, sample_rate=0.05, steps=40, delta=1e-5)
    assert f"epsilon={expected:.4f}" in out


def test_privacy_epsilon_reports_noise(capsys):
    assert main(["privacy", "n=1000", "batch=50", "epochs=2", "epsilon=2"]) == 0
    out = capsys.readouterr().out
    sigma = float(out.split("noise_multiplier=")[1].split()[0])
    assert compute_epsilon(noise_multiplier=sigma, sample_rate=0.05, steps=40, delta=1e-5) <= 2.0
    assert compute_epsilon(noise_multiplier=sigma - 0.01, sample_rate=0.05, steps=40, delta=1e-5) > 2.0


@pytest.mark.parametrize(
    "args",
    [
        ["n=1000", "batch=50", "epochs=2"],                      # neither noise nor epsilon
        ["n=1000", "batch=50", "epochs=2", "noise=1", "epsilon=2"],
        ["n=1000", "batch=50", "epochs=2", "noise=abc"],
        ["n=1000", "batch=5000", "epochs=2", "noise=1"],          # batch > N
        ["n=1000", "batch=50", "epochs=2", "noise=1", "delta=2"],
        ["n=1000", "batch=50", "epochs=2", "epsilon=-1"],
        ["n=1000", "batch=50", "epochs=2", "noise=1", "colour=red"],
        ["n=1000", "batch=50", "epochs=2", "noise"],
    ],
)
def test_privacy_bad_input_is_one_line_and_exit_2(args, capsys):
    assert main(["privacy", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("yolo-dp privacy:")


def test_console_exit_code_on_bad_input():
    out = yolo_dp("privacy", "n=0", "batch=1", "epochs=1", "noise=1")
    assert out.returncode == 2 and "dataset size" in out.stderr
