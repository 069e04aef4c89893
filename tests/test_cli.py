"""The yolo-dp command line: planning, Ultralytics' key parsing with the DP keys added, one-line
errors with exit code 2, read-only commands that create nothing, and a private run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from PIL import Image

from helpers import released_epsilon
from ultralytics_dp.accounting.ledger import Ledger
from ultralytics_dp.cli import main, split_train_args
from ultralytics_dp.integration.training_set import identify_all


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
    expected = released_epsilon(noise_multiplier=1.1, sample_rate=0.05, steps=40, delta=1e-5)
    assert f"epsilon={expected:.4f}" in out


def test_privacy_epsilon_reports_noise(capsys):
    assert main(["privacy", "n=1000", "batch=50", "epochs=2", "epsilon=2"]) == 0
    out = capsys.readouterr().out
    sigma = float(out.split("noise_multiplier=")[1].split()[0])
    assert released_epsilon(noise_multiplier=sigma, sample_rate=0.05, steps=40, delta=1e-5) <= 2.0
    assert released_epsilon(noise_multiplier=sigma - 0.01, sample_rate=0.05, steps=40, delta=1e-5) > 2.0


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


def test_help_imports_neither_torch_nor_ultralytics():
    code = ("import sys; from ultralytics_dp.cli import main; main(['--help']);"
            "print('LOADED', 'torch' in sys.modules, 'ultralytics' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "epsilon" in out and out.strip().endswith("LOADED False False")


@pytest.mark.parametrize("args,match", [
    (["n=1000", "batch=50", "epochs=2", "delta=0.01", "noise=1"], "1/N"),    # train refuses it too
    (["n=1000", "batch=50", "epochs=2", "epsilon=-1"], "epsilon"),
    (["n=1000", "batch=50", "epochs=2", "noise=1", "colour=red"], "not a valid key"),
])
def test_privacy_checks_everything_before_printing(args, match, capsys):
    assert main(["privacy", *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and match in err


def test_train_keys_typo_gets_ultralytics_suggestion_in_one_line():
    out = yolo_dp("train", "epsilon=8", "epohcs=1", "data=digits-det")
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert "'epohcs' is not a valid YOLO argument" in line and "epochs" in line


def test_train_keys_split_into_dp_settings_and_ultralytics_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config, overrides = split_train_args(["epsilon=8", "ledger=false", "max_grad_norm", "=", "0.5", "epochs=3",
                                          "data=digits-det", "secure_mode=true"])
    assert config.epsilon == 8 and config.ledger is False and config.max_grad_norm == 0.5 and config.secure_mode
    assert overrides == {"epochs": 3, "data": "digits-det"}
    with pytest.raises(ValueError, match="epsilon= is required"):
        split_train_args(["epochs=3"])
    with pytest.raises(ValueError, match="epochs"):  # Ultralytics' own type check
        split_train_args(["epsilon=8", "epochs=abc"])
    assert list(tmp_path.iterdir()) == []  # no ledger file named 'false'


def test_a_cfg_file_holds_dp_and_ultralytics_keys_and_the_command_line_wins(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("epsilon: 4\nmax_grad_norm: 0.5\nepochs: 2\nimgsz: 64\n")
    config, overrides = split_train_args([f"cfg={cfg}", "epochs=3", "max_grad_norm=2"])
    assert (config.epsilon, config.max_grad_norm) == (4.0, 2.0) and overrides == {"epochs": 3, "imgsz": 64}
    cfg.write_text("epsilon: 4\nepohcs: 2\n")
    with pytest.raises(ValueError, match="'epohcs' is not a valid YOLO argument"):
        split_train_args([f"cfg={cfg}"])
    with pytest.raises(ValueError, match="does not exist"):
        split_train_args(["epsilon=8", f"cfg={tmp_path / 'none.yaml'}"])


def test_report_on_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, capsys):
    junk = tmp_path / "notes.pt"
    junk.write_text("not a checkpoint")
    assert main(["report", str(junk)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "is not a checkpoint" in line


def test_read_only_commands_create_nothing(tmp_path, capsys):
    missing = tmp_path / "new" / "ledger.sqlite"
    assert main(["ledger", f"ledger={missing}"]) == 2
    assert "no ledger" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert main(["report", str(tmp_path / "none.pt")]) == 2 and list(tmp_path.iterdir()) == []


def test_reading_an_empty_database_does_not_make_it_a_ledger(tmp_path, capsys):
    import sqlite3

    blank = tmp_path / "blank.sqlite"
    with sqlite3.connect(blank) as db:
        db.execute("PRAGMA user_version=1")  # a valid SQLite file with no table
    for args in (["ledger", f"ledger={blank}"], ["report", str(blank)]):
        assert main(args) == 2
        assert "empty database" in capsys.readouterr().err
    with sqlite3.connect(blank) as db:
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == []


def test_ledger_cli_reports_each_images_epsilon(tmp_path, capsys):
    book = Ledger(tmp_path / "l.sqlite")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):  # blank images (no content: never near-duplicates), each its own grey
        Image.new("RGB", (8, 8), (40 * i, 40 * i, 40 * i)).save(images / f"{i}.png")
    records = identify_all(sorted(images.iterdir()))
    run = book.start_run(records[:3], fingerprint="v1", settings={"settings": {"epsilon": 1.0}, "noise_multiplier": 1.0,
                         "sample_rate": 0.1, "num_samples": 3}, delta=1e-5, description="toy")
    book.reserve(run, steps=10, noise_multiplier=1.0, sample_rate=0.1)
    expected = released_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=10, delta=1e-5)
    assert main(["ledger", "--json", f"ledger={tmp_path / 'l.sqlite'}"]) == 0
    report = json.loads(capsys.readouterr().out)
    (ds,) = report["datasets"]
    assert ds["runs"][0]["steps"] == 10 and ds["worst_epsilon"] == pytest.approx(expected, abs=1e-5)
    assert report["histogram"] == [{"epsilon": pytest.approx(expected, abs=1e-5), "records": 3}]
    assert main(["ledger", f"ledger={tmp_path / 'l.sqlite'}", f"records={images}"]) == 0
    out = capsys.readouterr().out
    assert f"worst epsilon={expected:.4f}" in out and "1 never trained on" in out


@pytest.mark.slow
def test_cli_trains_end_to_end(tiny_det, tmp_path):
    out = yolo_dp("train", "model=yolo26n.yaml", f"data={tiny_det}", "epochs=1", "imgsz=64", "batch=8", "workers=0",
                  "epsilon=5", "delta=1e-3", "max_grad_norm=0.5", f"project={tmp_path}", "name=cli")
    assert out.returncode == 0, out.stderr[-2000:]
    info = torch.load(tmp_path / "cli" / "weights" / "last.pt", map_location="cpu", weights_only=False)["dp"]
    assert info["steps"] == 4 and info["settings"]["max_grad_norm"] == 0.5 and info["epsilon"] <= 5
    assert (out.stdout + out.stderr).count("-DP per image") == 1  # the guarantee's summary, once
