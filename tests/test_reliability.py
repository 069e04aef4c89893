"""Reliability and security: crash-safe resume, the write-ahead ledger, dataset budgets,
concurrency, refusal of bad input (nothing written or spent), and secure-mode noise."""

from __future__ import annotations

import math
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import ultralytics_dp  # noqa: F401
from ultralytics import YOLO

from ultralytics_dp import DifferentialPrivacy
from ultralytics_dp.accounting import compute_epsilon
from ultralytics_dp.ledger import Ledger
from ultralytics_dp.mechanism import add_noise

TRAIN_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import ultralytics_dp
    from ultralytics import YOLO
    from ultralytics_dp import DifferentialPrivacy

    data, ledger, log, project, resume = sys.argv[1:6]

    def log_step(trainer):  # an independent record of every optimizer step actually taken
        with open(log, "a") as f:
            f.write("step\\n")
            f.flush()
            os.fsync(f.fileno())

    dp = DifferentialPrivacy(epsilon=20.0, delta=1e-3, noise_multiplier=2.0, ledger=ledger, physical_batch=8)
    model = YOLO(os.path.join(project, "run", "weights", "last.pt") if resume == "1" else "yolo26n.yaml")
    dp.attach(model)
    model.add_callback("on_train_batch_end", log_step)
    kwargs = dict(resume=True) if resume == "1" else dict(
        data=data, epochs=4, imgsz=64, batch=8, workers=0, project=project, name="run", exist_ok=True)
    model.train(**kwargs)
    print("FINAL", dp.steps, dp.epsilon)
    """
)


def test_kill_9_mid_epoch_then_resume(tiny_det, tmp_path):
    ledger_path, log = tmp_path / "ledger.sqlite", tmp_path / "steps.log"
    args = [sys.executable, "-c", TRAIN_SCRIPT, str(tiny_det), str(ledger_path), str(log), str(tmp_path)]
    proc = subprocess.Popen([*args, "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # 4 steps per epoch: wait for epoch 1's checkpoint and two steps into epoch 2
    while time.time() < deadline and not (log.exists() and len(log.read_text().split()) >= 6
                                          and (tmp_path / "run" / "weights" / "last.pt").exists()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    taken_before_kill = len(log.read_text().split())
    assert 6 <= taken_before_kill < 16

    # changing DP settings on resume is refused and spends nothing
    book = Ledger(ledger_path)
    (fp,) = [d["fingerprint"] for d in book.summary()]
    reserved = sum(s.steps for s in book.segments(fp))
    changed = DifferentialPrivacy(epsilon=20.0, delta=1e-3, noise_multiplier=2.0, max_grad_norm=0.5,
                                  ledger=ledger_path)
    model = YOLO(tmp_path / "run" / "weights" / "last.pt")
    changed.attach(model)
    with pytest.raises(ValueError, match="max_grad_norm"):
        model.train(resume=True)
    assert sum(s.steps for s in book.segments(fp)) == reserved

    out = subprocess.run([*args, "1"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    final_steps, final_eps = (float(v) for v in out.stdout.split("FINAL")[1].split())
    taken = len(log.read_text().split())
    assert taken > taken_before_kill
    # the resumed run continued its own accountant from the checkpoint and stayed within budget
    assert final_eps <= 20.0 and final_steps == 16
    # the ledger never undercounts what was actually spent, crash included
    ledger_eps = Ledger(ledger_path).epsilon(fp)
    assert ledger_eps >= compute_epsilon(noise_multiplier=2.0, sample_rate=0.25, steps=taken, delta=1e-3)
    assert sum(s.steps for s in Ledger(ledger_path).segments(fp)) >= taken


def pld(segments, delta):
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    for sigma, q, steps in segments:
        acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def private_run(data, tmp_path, name, **dp_kwargs):
    dp = DifferentialPrivacy(delta=1e-3, ledger=tmp_path / "ledger.sqlite", **dp_kwargs)
    model = YOLO("yolo26n.yaml")
    dp.attach(model)
    model.train(data=str(data), epochs=1, imgsz=64, batch=8, workers=0, project=str(tmp_path), name=name)
    return dp


def test_ledger_composes_runs_and_enforces_the_dataset_budget(tiny_det, tmp_path):
    first = private_run(tiny_det, tmp_path, "a", epsilon=4.0, noise_multiplier=1.5, secure_mode=True)
    second = private_run(tiny_det, tmp_path, "b", epsilon=4.0, noise_multiplier=1.0)
    book = Ledger(tmp_path / "ledger.sqlite")
    (dataset,) = book.summary()
    assert [r["steps"] for r in dataset["runs"]] == [first.steps, second.steps] == [4, 4]
    reference = pld([(1.5, 0.25, 4), (1.0, 0.25, 4)], 1e-3)
    assert abs(dataset["epsilon"] - reference) <= 0.01 * reference
    assert dataset["epsilon"] > max(first.epsilon, second.epsilon)

    before = book.segments(dataset["fingerprint"])
    with pytest.raises(ValueError, match="lifetime budget"):
        private_run(tiny_det, tmp_path, "c", epsilon=4.0, dataset_budget=dataset["epsilon"] + 0.5)
    assert book.segments(dataset["fingerprint"]) == before
    assert len(book.summary()[0]["runs"]) == 2
    assert not (tmp_path / "c").exists()

    # with a given noise multiplier the run trains until the dataset budget is reached
    capped = private_run(tiny_det, tmp_path, "d", epsilon=50.0, noise_multiplier=1.0,
                         dataset_budget=dataset["epsilon"] + 0.25)
    assert 0 < capped.steps < 4
    assert book.epsilon(dataset["fingerprint"]) <= dataset["epsilon"] + 0.25


def test_ledger_cli_lists_datasets(tmp_path, capsys):
    from ultralytics_dp.accounting import Segment
    from ultralytics_dp.cli import main

    book = Ledger(tmp_path / "l.sqlite")
    book.register_dataset("f" * 64, delta=1e-5, num_samples=100, description="toy")
    run = book.start_run("f" * 64, {"target_epsilon": 1.0, "noise_multiplier": 1.0, "sample_rate": 0.1,
                                    "delta": 1e-5, "max_grad_norm": 1.0, "num_samples": 100})
    book.reserve(run, steps=10, noise_multiplier=1.0, sample_rate=0.1)
    assert main(["ledger", "--json", f"ledger={tmp_path / 'l.sqlite'}"]) == 0
    out = capsys.readouterr().out
    import json

    (ds,) = json.loads(out)["datasets"]
    assert ds["runs"][0]["steps"] == 10
    assert ds["epsilon"] == pytest.approx(book.epsilon("f" * 64, [Segment(1.0, 0.1, 0)]))
    assert main(["ledger", f"ledger={tmp_path / 'l.sqlite'}"]) == 0
    assert "1 run(s)" in capsys.readouterr().out


APPEND = textwrap.dedent(
    """
    import sys
    from ultralytics_dp.ledger import Ledger
    book = Ledger(sys.argv[1])
    run = book.start_run("c" * 64, {"who": sys.argv[2]})
    for _ in range(40):
        book.reserve(run, steps=1, noise_multiplier=1.0, sample_rate=0.1)
    """
)


def test_two_processes_lose_no_ledger_update(tmp_path):
    path = tmp_path / "ledger.sqlite"
    Ledger(path).register_dataset("c" * 64, delta=1e-5, num_samples=100)
    procs = [subprocess.Popen([sys.executable, "-c", APPEND, str(path), str(i)]) for i in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*), SUM(steps) FROM spends").fetchone() == (80, 80)
        assert db.execute("SELECT COUNT(*) FROM runs").fetchone() == (2,)


# ---------------------------------------------------------------------- bad input
def copy_dataset(tiny_det: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(tiny_det.parent, root)
    yaml = root / "data.yaml"
    yaml.write_text(yaml.read_text().replace(str(tiny_det.parent), str(root)))
    return yaml


def assert_refused(tmp_path, data, match, dp_kwargs=None, cfg="yolo26n.yaml", **train_kwargs):
    ledger = tmp_path / "ledger.sqlite"
    dp = DifferentialPrivacy(**{"epsilon": 4.0, "delta": 1e-3, "ledger": ledger, **(dp_kwargs or {})})
    model = YOLO(cfg)
    dp.attach(model)
    kwargs = dict(data=str(data), epochs=1, imgsz=64, batch=8, workers=0, project=str(tmp_path), name="r")
    with pytest.raises(Exception, match=match) as err:
        model.train(**{**kwargs, **train_kwargs})
    assert len(str(err.value).splitlines()) == 1
    assert dp.steps == 0 and dp.noise_draws == 0
    assert Ledger(ledger).summary() == []  # nothing spent or recorded
    assert not (tmp_path / "r").exists()  # nothing written


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(epsilon=0), "epsilon"), (dict(epsilon=-1), "epsilon"), (dict(epsilon=float("nan")), "epsilon"),
        (dict(epsilon=float("inf")), "epsilon"), (dict(epsilon=1, delta=0), "delta"),
        (dict(epsilon=1, delta=1), "delta"), (dict(epsilon=1, max_grad_norm=0), "max_grad_norm"),
        (dict(epsilon=1, noise_multiplier=-1), "noise_multiplier"), (dict(epsilon=1, dataset_budget=0), "budget"),
        (dict(epsilon=1, dataset_budget=2, ledger=False), "dataset_budget needs the ledger"),
    ],
)
def test_bad_settings_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DifferentialPrivacy(**kwargs)


@pytest.mark.parametrize(
    "train_kwargs,match",
    [
        (dict(mosaic=1.0), "mosaic"), (dict(mixup=0.2), "mixup"), (dict(cutmix=0.5), "cutmix"),
        (dict(copy_paste=0.1), "copy_paste"), (dict(rect=True), "rect"), (dict(batch=-1), "auto-batch"),
        (dict(batch=0.7), "auto-batch"), (dict(batch=64), "exceeds the dataset size"),
        (dict(cls_pw=0.5), "cls_pw"), (dict(time=0.01), "time"), (dict(quantize=8), "quantize"),
        (dict(distill_model="yolo26n.yaml"), "distill_model"), (dict(device="0,1"), "several devices"),
        (dict(device=[0, 1]), "several devices"),
    ],
)
def test_bad_training_keys_are_refused(tiny_det, tmp_path, train_kwargs, match):
    assert_refused(tmp_path, tiny_det, match, **train_kwargs)


def test_delta_not_below_one_over_n_is_refused(tiny_det, tmp_path):
    assert_refused(tmp_path, tiny_det, "1/N", dp_kwargs=dict(delta=1 / 32))


def test_out_of_range_label_is_refused(tiny_det, tmp_path):
    yaml = copy_dataset(tiny_det, tmp_path)
    (yaml.parent / "labels" / "train" / "00003.txt").write_text("12 0.5 0.5 0.1 0.1\n")
    assert_refused(tmp_path, yaml, "class 12 outside 0..9")


def test_corrupt_label_is_refused(tiny_det, tmp_path):
    yaml = copy_dataset(tiny_det, tmp_path)
    (yaml.parent / "labels" / "train" / "00004.txt").write_text("3 0.5 oops 0.1\n")
    assert_refused(tmp_path, yaml, "corrupt label file")


def test_single_image_dataset_is_refused(tiny_det, tmp_path):
    yaml = copy_dataset(tiny_det, tmp_path)
    for p in list((yaml.parent / "images" / "train").glob("*.png"))[1:]:
        p.unlink()
    assert_refused(tmp_path, yaml, "at least 2", batch=1)


def test_empty_dataset_is_refused(tiny_det, tmp_path):
    yaml = copy_dataset(tiny_det, tmp_path)
    for p in (yaml.parent / "images" / "train").glob("*.png"):
        p.unlink()
    assert_refused(tmp_path, yaml, "cannot load the training set")


def test_unsupported_task_is_refused(tiny_det, tmp_path):
    assert_refused(tmp_path, tiny_det, "segment.*supported", cfg="yolo26n-seg.yaml")


def test_a_file_that_is_not_a_ledger_is_refused(tmp_path):
    bogus = tmp_path / "notes.sqlite"
    bogus.write_text("these are my notes, not a ledger\n")
    with pytest.raises(ValueError, match="not an ultralytics-dp ledger"):
        DifferentialPrivacy(epsilon=1.0, ledger=bogus)
    assert bogus.read_text() == "these are my notes, not a ledger\n"
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE things (x)")
    with pytest.raises(ValueError, match="not an ultralytics-dp ledger"):
        Ledger(other)


# ---------------------------------------------------------------------- secure noise
def test_secure_noise_statistics_and_no_seed():
    sigma, c = 1.3, 0.7
    zero = {"w": torch.zeros(200_000, dtype=torch.float64)}
    torch.manual_seed(0)
    a = add_noise(zero, noise_multiplier=sigma, max_grad_norm=c, secure=True)["w"]
    torch.manual_seed(0)
    b = add_noise(zero, noise_multiplier=sigma, max_grad_norm=c, secure=True)["w"]
    assert not torch.equal(a, b)
    for sample in (a, b):
        assert abs(sample.std().item() / (sigma * c) - 1) < 0.03
        assert abs(sample.mean().item()) < 3 * sigma * c / math.sqrt(sample.numel())
        kurtosis = ((sample / sample.std()) ** 4).mean().item()
        assert abs(kurtosis - 3) < 0.1  # Gaussian tails, not a sum of uniforms
    with pytest.raises(ValueError, match="secure"):
        add_noise(zero, noise_multiplier=1.0, max_grad_norm=1.0, secure=True, generator=torch.Generator())


def test_a_schema_1_ledger_is_upgraded_in_place(tmp_path):
    """Ledgers written before runs had random ids keep every spend, and each run gets a UUID4."""
    import uuid

    path = tmp_path / "v1.sqlite"
    with sqlite3.connect(path) as db:  # the schema-1 tables, as version 0.1.0 wrote them
        db.executescript("""
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE datasets (fingerprint TEXT PRIMARY KEY, delta REAL NOT NULL, num_samples INTEGER NOT NULL,
                budget REAL, created REAL NOT NULL, description TEXT);
            CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, fingerprint TEXT NOT NULL, created REAL NOT NULL,
                name TEXT, settings TEXT NOT NULL);
            CREATE TABLE spends (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id INTEGER NOT NULL,
                noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL, steps INTEGER NOT NULL, created REAL NOT NULL);
            CREATE TABLE file_hashes (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
                sha256 TEXT NOT NULL);
            INSERT INTO meta VALUES ('schema', 'ultralytics-dp-ledger/1');
            INSERT INTO datasets VALUES ('d', 1e-5, 100, NULL, 0, 'toy');
            INSERT INTO runs (fingerprint, created, name, settings) VALUES ('d', 0, 'old', '{}');
            INSERT INTO spends (run_id, noise_multiplier, sample_rate, steps, created) VALUES (1, 1.0, 0.1, 50, 0);
        """)
    book = Ledger(path)
    (dataset,) = book.summary()
    (run,) = dataset["runs"]
    assert uuid.UUID(run["run_id"]).version == 4 and run["steps"] == 50
    assert dataset["epsilon"] == pytest.approx(compute_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=50,
                                                               delta=1e-5), rel=1e-9)
    new = book.start_run("d", {})
    book.reserve(new, steps=5, noise_multiplier=1.0, sample_rate=0.1)
    assert [r["steps"] for r in Ledger(path).summary()[0]["runs"]] == [50, 5]
