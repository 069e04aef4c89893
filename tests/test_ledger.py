"""The write-ahead ledger: composition against a PLD reference, the dataset budget, concurrency,
refusal of other files, the schema-1 upgrade, and read-only opening."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

import pytest

import ultralytics_dp  # noqa: F401
from ultralytics import YOLO

from ultralytics_dp import DifferentialPrivacy
from ultralytics_dp.accounting import compute_epsilon
from ultralytics_dp.ledger import Ledger


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



@pytest.mark.slow
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
