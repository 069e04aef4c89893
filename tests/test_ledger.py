"""The per-record write-ahead ledger: each image's epsilon against an independent PLD composition,
lifetime budgets across dataset versions (added images, relabelled copies, fractions), one delta,
concurrency, refusal of other files, the upgrade of schema 1/2 ledgers, and read-only opening."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant

from ultralytics import YOLO

from ultralytics_dp import DifferentialPrivacy

from ultralytics_dp.datasets import embedded as datasets
from ultralytics_dp.config import DPConfig
from ultralytics_dp.accounting.ledger import Ledger, version_fingerprint
from ultralytics_dp.accounting.planning import plan_run

from helpers import copy_dataset, ledger_steps


def pld(segments, delta):
    """Independent reference: dp_accounting's PLD accountant."""
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    for sigma, q, steps in segments:
        acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def recorded_run(book, records, sigma, q, steps, budget=None, delta=1e-5):
    uid = book.start_run(records, fingerprint="|".join(sorted(records)), settings={"settings": {"epsilon": 1.0}},
                         delta=delta, budget=budget)
    book.reserve(uid, steps=steps, noise_multiplier=sigma, sample_rate=q)
    return uid


def test_each_records_epsilon_composes_exactly_the_runs_that_included_it(tmp_path):
    book = Ledger(tmp_path / "l.sqlite")
    a, b, c = [f"a{i}" for i in range(3)], [f"b{i}" for i in range(5)], [f"c{i}" for i in range(2)]
    recorded_run(book, a + b, 1.2, 0.1, 40)
    recorded_run(book, b + c, 0.9, 0.2, 30)
    report = book.epsilons()
    expected = {round(pld([(1.2, 0.1, 40)], 1e-5), 2): 3, round(pld([(0.9, 0.2, 30)], 1e-5), 2): 2,
                round(pld([(1.2, 0.1, 40), (0.9, 0.2, 30)], 1e-5), 2): 5}
    got = {row["epsilon"]: row["records"] for row in report["histogram"]}
    assert len(got) == 3 and sorted(got.values()) == sorted(expected.values())
    for eps, n in got.items():  # ours is an upper bound within 1% of the PLD value, never below it by > 0.5%
        ref = min(expected, key=lambda e: abs(e - eps))
        assert expected[ref] == n and ref * 0.995 <= eps <= ref * 1.01 + 0.01
    assert report["worst_epsilon"] == max(got) and report["new_records"] == 0
    only = book.epsilons(c + ["never-seen"])
    assert only["new_records"] == 1 and [r["records"] for r in only["histogram"]] == [1, 2]
    assert only["worst_epsilon"] == {n: e for e, n in got.items()}[2]  # c: the second run only


@pytest.mark.slow  # accounting searches take seconds
def test_budgets_follow_records_into_new_dataset_versions(tmp_path):
    """v2 = v1 + 5 new images: the budget set on v1 guards its records in v2; a disjoint set trains."""
    book = Ledger(tmp_path / "l.sqlite")
    v1 = [f"img{i}" for i in range(300)]
    recorded_run(book, v1, 1.8, 0.1, 60, budget=2.5)
    spent = pld([(1.8, 0.1, 60)], 1e-5)
    v2 = v1 + [f"new{i}" for i in range(5)]
    with pytest.raises(ValueError, match=r"300 training image\(s\) past their lifetime budget"):  # even 1 step
        plan_run(DPConfig(epsilon=50, noise_multiplier=0.3), num_samples=305, batch=30, epochs=6,
                 records=book.budgets(v2, None, 1e-5))
    capped = plan_run(DPConfig(epsilon=50, noise_multiplier=1.0), num_samples=305, batch=30, epochs=6,
                      records=book.budgets(v2, None, 1e-5))
    assert 0 < capped.max_steps < capped.planned_steps
    assert pld([(1.8, 0.1, 60), (1.0, 30 / 305, capped.max_steps)], 1e-5) <= 2.5 * 1.005
    assert pld([(1.8, 0.1, 60), (1.0, 30 / 305, capped.max_steps + 2)], 1e-5) > 2.5
    disjoint = [f"other{i}" for i in range(300)]
    assert book.budgets(disjoint, None, 1e-5) is None  # no budget was ever set on these records
    assert spent < 2.5


def test_a_relabelled_copy_is_the_same_records(tiny_det, tmp_path):
    book = Ledger(tmp_path / "l.sqlite")
    copy = copy_dataset(tiny_det, tmp_path)
    (copy.parent / "labels" / "train" / "00003.txt").write_text("7 0.5 0.5 0.2 0.2\n")
    original = sorted((tiny_det.parent / "images" / "train").iterdir())
    relabelled = sorted((copy.parent / "images" / "train").iterdir())
    assert book.record_hashes(original) == book.record_hashes(relabelled)
    labels = [p.read_text() for p in sorted((tiny_det.parent / "labels" / "train").glob("*.txt"))]
    assert version_fingerprint(book.record_hashes(original), labels) != version_fingerprint(
        book.record_hashes(original), labels[:3] + ["7 0.5 0.5 0.2 0.2\n"] + labels[4:])


def test_a_changed_image_of_the_same_size_and_time_is_a_new_record(tmp_path):
    """Identity is the bytes, hashed every time: no cache keyed by size and modification time."""
    import os

    book = Ledger(tmp_path / "l.sqlite")
    image = tmp_path / "a.png"
    image.write_bytes(b"x" * 100)
    before = book.record_hashes([image])
    stat = image.stat()
    image.write_bytes(b"y" * 100)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert book.record_hashes([image]) != before


def test_a_run_started_later_on_the_same_records_limits_the_first_runs_next_epochs(tmp_path):
    """Budgets are checked again when each epoch is reserved, in the same transaction: two runs on
    overlapping records that each fit alone never take a record past its budget together."""
    book = Ledger(tmp_path / "l.sqlite")
    shared = [f"s{i}" for i in range(10)]
    first = book.start_run(shared, fingerprint="a", settings={}, delta=1e-5, budget=3.0)
    assert book.reserve(first, steps=20, noise_multiplier=1.5, sample_rate=0.1) == 20
    second = book.start_run(shared, fingerprint="b", settings={}, delta=1e-5)
    assert book.reserve(second, steps=40, noise_multiplier=1.5, sample_rate=0.1) == 40
    granted = book.reserve(first, steps=40, noise_multiplier=1.5, sample_rate=0.1)
    assert granted < 40
    assert pld([(1.5, 0.1, 60 + granted)], 1e-5) <= 3.0 * 1.005
    assert pld([(1.5, 0.1, 60 + granted + 2)], 1e-5) > 3.0


def test_one_delta_per_ledger(tmp_path):
    book = Ledger(tmp_path / "l.sqlite")
    recorded_run(book, ["x"], 1.0, 0.5, 3, delta=1e-5)
    book.check_delta(1e-5)
    with pytest.raises(ValueError, match="delta=1e-05"):
        book.check_delta(1e-6)
    with pytest.raises(ValueError, match="delta=1e-05"):
        recorded_run(book, ["y"], 1.0, 0.5, 3, delta=1e-6)


def private_run(data, tmp_path, name, **kwargs):
    dp_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in ("epsilon", "noise_multiplier", "dataset_budget")}
    dp = DifferentialPrivacy(delta=1e-3, ledger=tmp_path / "ledger.sqlite", **dp_kwargs)
    model = YOLO("yolo26n.yaml")
    dp.attach(model)
    model.train(data=str(data), epochs=1, imgsz=64, batch=8, workers=0, project=str(tmp_path), name=name, **kwargs)
    return dp


@pytest.mark.slow
def test_trainer_runs_on_dataset_versions_compose_per_image(tiny_det, tmp_path):
    """v1 (27 images) at epsilon=2, then v2 = v1 + 5 images: refused at dataset_budget=2.5 (the shared
    images would pass it), trains until the budget with a given sigma; a disjoint set still trains."""
    v1 = copy_dataset(tiny_det, tmp_path / "v1")
    for p in sorted((v1.parent / "images" / "train").iterdir())[27:]:
        p.unlink()
    first = private_run(v1, tmp_path, "v1", epsilon=2.0, dataset_budget=2.5)
    book = Ledger(tmp_path / "ledger.sqlite")
    (level,) = book.epsilons()["histogram"]
    assert level["records"] == 27 and level["epsilon"] == pytest.approx(first.epsilon, abs=1e-5)
    steps = ledger_steps(tmp_path / "ledger.sqlite")
    with pytest.raises(ValueError, match=r"27 training image\(s\) past their lifetime budget"):
        private_run(tiny_det, tmp_path, "v2", epsilon=2.0, dataset_budget=2.5)
    assert ledger_steps(tmp_path / "ledger.sqlite") == steps and not (tmp_path / "v2").exists()

    capped = private_run(tiny_det, tmp_path, "v2s", epsilon=50.0, noise_multiplier=1.0)
    assert 0 < capped.steps < 4
    worst = book.epsilons()["worst_epsilon"]
    assert worst <= 2.5 < pld([*((s["noise_multiplier"], s["sample_rate"], s["steps"]) for s in
                                 first.accountant.state_dict()["history"]), (1.0, 0.25, capped.steps + 1)], 1e-3)

    other = datasets.build("digits-det", seed=7, imgsz=64, n_train=32, n_val=16, root=tmp_path / "other")
    assert private_run(other, tmp_path, "disjoint", epsilon=2.0, dataset_budget=2.5).steps == 4


@pytest.mark.slow
def test_fractions_of_one_dataset_compose_on_their_shared_images(tiny_det, tmp_path):
    half = private_run(tiny_det, tmp_path, "half", epsilon=3.0, noise_multiplier=1.5, fraction=0.5)
    more = private_run(tiny_det, tmp_path, "more", epsilon=3.0, noise_multiplier=1.5, fraction=0.6)
    segs = lambda dp: [(s["noise_multiplier"], s["sample_rate"], s["steps"])  # noqa: E731
                       for s in dp.accountant.state_dict()["history"]]
    report = Ledger(tmp_path / "ledger.sqlite").epsilons()
    got = {row["records"]: row["epsilon"] for row in report["histogram"]}
    assert set(got) == {16, 3}  # fraction=0.5 -> 16 images, 0.6 -> 19 (the same 16 and 3 more)
    assert got[16] == pytest.approx(pld(segs(half) + segs(more), 1e-3), rel=0.01)
    assert got[3] == pytest.approx(pld(segs(more), 1e-3), rel=0.01)


APPEND = textwrap.dedent(
    """
    import sys
    from ultralytics_dp.accounting.ledger import Ledger
    book = Ledger(sys.argv[1])
    mine = [f"{sys.argv[2]}-{i}" for i in range(50)]
    run = book.start_run(["shared-0", "shared-1", *mine], fingerprint=sys.argv[2], settings={}, delta=1e-5)
    for _ in range(40):
        book.reserve(run, steps=1, noise_multiplier=1.0, sample_rate=0.1)
    """
)


def test_two_processes_on_overlapping_data_lose_no_ledger_update(tmp_path):
    path = tmp_path / "ledger.sqlite"
    Ledger(path)
    procs = [subprocess.Popen([sys.executable, "-c", APPEND, str(path), str(i)]) for i in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*), SUM(steps) FROM spends").fetchone() == (80, 80)
        assert db.execute("SELECT COUNT(*) FROM runs").fetchone() == (2,)
        assert db.execute("SELECT COUNT(*) FROM records").fetchone() == (102,)
    histogram = {row["records"]: row["epsilon"] for row in Ledger(path).epsilons()["histogram"]}
    assert set(histogram) == {100, 2} and histogram[2] > histogram[100]  # the shared records spent twice


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
    with pytest.raises(ValueError, match="no ledger at"):
        Ledger(tmp_path / "missing.sqlite", create=False)
    assert not (tmp_path / "missing.sqlite").exists()


SCHEMA_1 = """
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
    INSERT INTO datasets VALUES ('d', 1e-5, 100, 9.0, 0, 'toy');
    INSERT INTO runs (fingerprint, created, name, settings) VALUES ('d', 0, 'old', '{}');
    INSERT INTO spends (run_id, noise_multiplier, sample_rate, steps, created) VALUES (1, 1.0, 0.1, 50, 0);
"""


@pytest.mark.slow  # accounting searches take seconds
def test_a_schema_1_ledger_is_upgraded_and_its_runs_count_for_every_image(tmp_path):
    """Old runs have no record identities: never treated as empty, they count for every image."""
    path = tmp_path / "v1.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA_1)
    book = Ledger(path)
    old = pld([(1.0, 0.1, 50)], 1e-5)
    assert book.epsilons()["worst_epsilon"] == pytest.approx(old, rel=0.01)  # no known image, still spent
    report = book.epsilons(["never-seen"])
    assert report["new_records"] == 1 and report["worst_epsilon"] == pytest.approx(old, rel=0.01)
    assert [r["steps"] for r in book.summary()["legacy_runs"]] == [50]
    recorded_run(book, ["x"], 1.0, 0.1, 5)
    assert book.epsilons(["x"])["worst_epsilon"] == pytest.approx(pld([(1.0, 0.1, 55)], 1e-5), rel=0.01)
    with pytest.raises(ValueError, match="lifetime budget"):  # the old dataset's budget guards every image
        plan_run(DPConfig(epsilon=50, noise_multiplier=0.3), num_samples=1000, batch=100, epochs=2,
                 records=book.budgets(["y"], None, 1e-5))
