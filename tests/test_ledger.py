"""The per-record write-ahead ledger: each image's epsilon against an independent PLD composition,
lifetime budgets across dataset versions (added images, relabelled copies, fractions), runs at any delta,
records by their pixels and near-duplicates, concurrency, refusal of other files, the upgrade of schema 1
to 3 ledgers, and read-only opening."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from PIL import Image
from ultralytics import YOLO

from ultralytics_dp import DifferentialPrivacy
from ultralytics_dp.accounting.accountant import release
from ultralytics_dp.accounting.ledger import Ledger, version_fingerprint
from ultralytics_dp.accounting.pld import Segment
from ultralytics_dp.accounting.planning import plan_run
from ultralytics_dp.accounting.records import THUMB, Record
from ultralytics_dp.config import DPConfig
from ultralytics_dp.datasets import embedded as datasets
from ultralytics_dp.integration.training_set import identify_all

from helpers import copy_dataset, ledger_steps


def stand_in(name):
    """A record for ``name``: its pixels and file keys derived from it, a random thumbnail (with
    content, and far from any other stand-in's)."""
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    thumb = np.random.default_rng(seed).integers(0, 256, THUMB * THUMB, dtype=np.uint8).tobytes()
    return Record(pixels=f"pixels-{name}", file=f"file-{name}", thumb=thumb)


def stand_ins(names):
    return [stand_in(n) for n in names]


def pld(segments, delta):
    """Independent reference: dp_accounting's PLD accountant."""
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    for sigma, q, steps in segments:
        acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def recorded_run(book, names, sigma, q, steps, budget=None, delta=1e-5):
    uid = book.start_run(stand_ins(names), fingerprint="|".join(sorted(names)), settings={"settings": {"epsilon": 1.0}},
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
    only = book.epsilons(stand_ins(c + ["never-seen"]))
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
                 records=book.budgets(stand_ins(v2), None, 1e-5))
    capped = plan_run(DPConfig(epsilon=50, noise_multiplier=1.0), num_samples=305, batch=30, epochs=6,
                      records=book.budgets(stand_ins(v2), None, 1e-5))
    assert 0 < capped.max_steps < capped.planned_steps
    assert pld([(1.8, 0.1, 60), (1.0, 30 / 305, capped.max_steps)], 1e-5) <= 2.5 * 1.005
    assert pld([(1.8, 0.1, 60), (1.0, 30 / 305, capped.max_steps + 2)], 1e-5) > 2.5
    disjoint = [f"other{i}" for i in range(300)]
    assert book.budgets(stand_ins(disjoint), None, 1e-5) is None  # no budget was ever set on these records
    assert spent < 2.5


def test_a_relabelled_copy_is_the_same_records(tiny_det, tmp_path):
    copy = copy_dataset(tiny_det, tmp_path)
    (copy.parent / "labels" / "train" / "00003.txt").write_text("7 0.5 0.5 0.2 0.2\n")
    original = sorted((tiny_det.parent / "images" / "train").iterdir())
    relabelled = sorted((copy.parent / "images" / "train").iterdir())
    assert identify_all(original) == identify_all(relabelled)
    labels = [p.read_text() for p in sorted((tiny_det.parent / "labels" / "train").glob("*.txt"))]
    assert version_fingerprint(identify_all(original), labels) != version_fingerprint(
        identify_all(original), labels[:3] + ["7 0.5 0.5 0.2 0.2\n"] + labels[4:])


def test_a_changed_image_of_the_same_size_and_time_is_a_new_record(tmp_path):
    """Identity is the pixels, decoded every time: no cache keyed by size and modification time."""
    import os

    image = tmp_path / "a.png"
    Image.fromarray(np.full((8, 8, 3), 10, np.uint8)).save(image)
    before = identify_all([image])
    stat = image.stat()
    Image.fromarray(np.full((8, 8, 3), 11, np.uint8)).save(image)
    assert image.stat().st_size == stat.st_size
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert identify_all([image]) != before


def test_a_run_started_later_on_the_same_records_limits_the_first_runs_next_epochs(tmp_path):
    """Budgets are checked again when each epoch is reserved, in the same transaction: two runs on
    overlapping records that each fit alone never take a record past its budget together."""
    book = Ledger(tmp_path / "l.sqlite")
    shared = [f"s{i}" for i in range(10)]
    first = book.start_run(stand_ins(shared), fingerprint="a", settings={}, delta=1e-5, budget=3.0)
    assert book.reserve(first, steps=20, noise_multiplier=1.5, sample_rate=0.1) == 20
    second = book.start_run(stand_ins(shared), fingerprint="b", settings={}, delta=1e-5)
    assert book.reserve(second, steps=40, noise_multiplier=1.5, sample_rate=0.1) == 40
    granted = book.reserve(first, steps=40, noise_multiplier=1.5, sample_rate=0.1)
    assert granted < 40
    assert pld([(1.5, 0.1, 60 + granted)], 1e-5) <= 3.0 * 1.005
    assert pld([(1.5, 0.1, 60 + granted + 2)], 1e-5) > 3.0


def test_runs_at_different_deltas_share_a_ledger_and_a_report_names_its_delta(tmp_path):
    """A privacy loss distribution composes without a delta: runs at 1e-5 and 1e-6 on shared records
    compose, and a record's epsilon is read at the delta asked (by default the smallest of the runs')."""
    book = Ledger(tmp_path / "l.sqlite")
    recorded_run(book, ["x", "y"], 1.0, 0.5, 3, delta=1e-5)
    recorded_run(book, ["y"], 1.2, 0.4, 4, delta=1e-6)
    both = [(1.0, 0.5, 3), (1.2, 0.4, 4)]
    default = book.epsilons(stand_ins(["y"]))
    assert default["delta"] == 1e-6 and book.delta() == 1e-6
    assert pld(both, 1e-6) * 0.999 <= default["worst_epsilon"] <= pld(both, 1e-6) * 1.01
    at = book.epsilons(stand_ins(["y"]), delta=1e-4)
    assert at["delta"] == 1e-4 and pld(both, 1e-4) * 0.999 <= at["worst_epsilon"] <= pld(both, 1e-4) * 1.01
    assert book.summary(delta=1e-4)["worst_epsilon"] == at["worst_epsilon"]
    assert [r["delta"] for ds in book.summary()["datasets"] for r in ds["runs"]] == [1e-5, 1e-6]


def test_a_schema_3_ledger_is_upgraded_and_its_records_keep_their_budget(tiny_det, tmp_path):
    """Schema 3 kept one delta per ledger (in meta) and knew records by their file's bytes only: each
    old run takes that delta, and an image it knew by its bytes is still that record (not a new one)."""
    images = sorted((tiny_det.parent / "images" / "train").iterdir())[:4]
    path = tmp_path / "v3.sqlite"
    book = Ledger(path)
    uid = book.start_run(identify_all(images), fingerprint="v", settings={}, delta=1e-5)
    book.reserve(uid, steps=3, noise_multiplier=1.0, sample_rate=0.5)
    with sqlite3.connect(path) as db:  # back to schema 3, as that version wrote it
        db.execute("ALTER TABLE runs DROP COLUMN delta")
        for index in ("records_pixels", "records_mean"):
            db.execute(f"DROP INDEX {index}")
        for column in ("pixels", "thumb", "mean"):
            db.execute(f"ALTER TABLE records DROP COLUMN {column}")
        db.execute("UPDATE meta SET value='ultralytics-dp-ledger/3' WHERE key='schema'")
        db.execute("INSERT INTO meta VALUES ('delta', '1e-05')")
    upgraded = Ledger(path)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == "ultralytics-dp-ledger/5"
        assert db.execute("SELECT delta FROM runs").fetchall() == [(1e-5,)]
    report = upgraded.epsilons(identify_all(images))
    assert report["new_records"] == 0 and report["delta"] == 1e-5
    assert report["worst_epsilon"] == pytest.approx(pld([(1.0, 0.5, 3)], 1e-5), rel=0.01)
    upgraded.start_run(identify_all(images[:2]), fingerprint="w", settings={}, delta=1e-5)  # known: take pixels
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*), COUNT(pixels) FROM records").fetchone() == (4, 2)


def test_a_re_encoded_image_spends_the_budget_of_the_record_it_copies(tiny_det, tmp_path):
    """A lossless re-encode is the same record (its pixels); a lossy re-save of an image with content
    is a near-duplicate and counts as the record it copies; another image is a new record."""
    train = sorted((tiny_det.parent / "images" / "train").iterdir())
    records = identify_all(train)
    book = Ledger(tmp_path / "l.sqlite")
    uid = book.start_run(records, fingerprint="v", settings={}, delta=1e-5)
    book.reserve(uid, steps=3, noise_multiplier=1.0, sample_rate=0.5)
    spent = book.epsilons(records)["worst_epsilon"]
    content = next(p for p, r in zip(train, records) if r.has_content)
    with Image.open(content) as image:
        image.convert("RGB").save(tmp_path / "lossless.png", compress_level=1)
        image.convert("RGB").save(tmp_path / "lossy.jpg", quality=90)
    copies = identify_all([tmp_path / "lossless.png", tmp_path / "lossy.jpg"])
    assert copies[1].pixels not in {r.pixels for r in records}
    report = book.epsilons(copies)
    assert report["new_records"] == 0 and report["worst_epsilon"] == spent
    other = sorted((tiny_det.parent / "images" / "val").iterdir())
    fresh = next(r for r in identify_all(other) if r.has_content)
    assert book.epsilons([fresh])["new_records"] == 1


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
    from test_ledger import stand_ins
    mine = [f"{sys.argv[2]}-{i}" for i in range(50)]
    run = book.start_run(stand_ins(["shared-0", "shared-1", *mine]), fingerprint=sys.argv[2], settings={}, delta=1e-5)
    for _ in range(40):
        book.reserve(run, steps=1, noise_multiplier=1.0, sample_rate=0.1)
    """
)


def test_two_processes_on_overlapping_data_lose_no_ledger_update(tmp_path):
    path = tmp_path / "ledger.sqlite"
    Ledger(path)
    procs = [subprocess.Popen([sys.executable, "-c", APPEND, str(path), str(i)], cwd=Path(__file__).parent)
             for i in range(2)]
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


# schema 2: schema 1 with each run's random id
SCHEMA_2 = (SCHEMA_1.replace("name TEXT, settings TEXT NOT NULL);", "name TEXT, settings TEXT NOT NULL, uid TEXT);")
            .replace("ledger/1", "ledger/2")
            .replace("(fingerprint, created, name, settings) VALUES ('d', 0, 'old', '{}')",
                     "(fingerprint, created, name, settings, uid) VALUES ('d', 0, 'old', '{}', 'kept-uid')"))


@pytest.mark.slow  # accounting searches take seconds
@pytest.mark.parametrize("schema", [SCHEMA_1, SCHEMA_2], ids=["schema1", "schema2"])
def test_a_schema_1_or_2_ledger_is_upgraded_and_its_runs_count_for_every_image(tmp_path, schema):
    """Old runs have no record identities: never treated as empty, they count for every image, at
    their dataset's delta; a schema-2 run keeps its random id."""
    path = tmp_path / "v1.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(schema)
    book = Ledger(path)
    (legacy,) = book.summary()["legacy_runs"]
    assert legacy["delta"] == 1e-5 and (legacy["run_id"] == "kept-uid") == (schema is SCHEMA_2)
    old = pld([(1.0, 0.1, 50)], 1e-5)
    assert book.epsilons()["worst_epsilon"] == pytest.approx(old, rel=0.01)  # no known image, still spent
    report = book.epsilons(stand_ins(["never-seen"]))
    assert report["new_records"] == 1 and report["worst_epsilon"] == pytest.approx(old, rel=0.01)
    assert [r["steps"] for r in book.summary()["legacy_runs"]] == [50]
    recorded_run(book, ["x"], 1.0, 0.1, 5)
    assert book.epsilons(stand_ins(["x"]))["worst_epsilon"] == pytest.approx(pld([(1.0, 0.1, 55)], 1e-5), rel=0.01)
    with pytest.raises(ValueError, match="lifetime budget"):  # the old dataset's budget guards every image
        plan_run(DPConfig(epsilon=50, noise_multiplier=0.3), num_samples=1000, batch=100, epochs=2,
                 records=book.budgets(stand_ins(["y"]), None, 1e-5))


# ---------------------------------------------------------------------------------------- persons
def person_run(book, images, persons, sigma, q, steps, unit="person", budget=None, delta=1e-5):
    """A run on ``images`` whose persons are ``persons`` {id: [image names]}; returns its uid."""
    names = list(images)
    grouped = [(pid, [names.index(n) for n in owned]) for pid, owned in persons.items()]
    uid = book.start_run(stand_ins(names), fingerprint="|".join(sorted(names)), settings={}, delta=delta,
                         budget=budget, persons=grouped, unit=unit)
    return uid, book.reserve(uid, steps=steps, noise_multiplier=sigma, sample_rate=q)


def test_a_person_is_budgeted_across_data_versions_with_different_images_of_theirs(tmp_path):
    """Version 2 holds new scans of the same patients (no image in common): their budget, set in
    version 1, is spent already, and a person-level run on version 2 is held to it."""
    book = Ledger(tmp_path / "l.sqlite")
    v1 = {f"mrn-{p}": [f"v1-{p}-{i}" for i in range(3)] for p in range(20)}
    v2 = {f"mrn-{p}": [f"v2-{p}-{i}" for i in range(2)] for p in range(20)}
    _, granted = person_run(book, [n for names in v1.values() for n in names], v1, 1.5, 0.1, 30, budget=3.0)
    assert granted == 30
    images2 = [n for names in v2.values() for n in names]
    uid, granted = person_run(book, images2, v2, 1.5, 0.1, 100)
    assert 0 < granted < 70  # the persons' budget from version 1, not a fresh one
    assert pld([(1.5, 0.1, 30 + granted)], 1e-5) <= 3.0 * 1.005 < pld([(1.5, 0.1, 30 + granted + 5)], 1e-5)
    report = book.person_epsilons(1e-5)
    assert report["persons"] == 20 and report["worst_epsilon"] <= 3.0 * 1.005
    assert book.epsilons(None, 1e-5)["records_of_persons"] == 100  # their images are accounted per person


def test_an_image_level_run_is_charged_to_each_person_for_their_images_in_it(tmp_path):
    """An image-level run recorded before the persons were known is charged to them once a run
    names them, as a person with k images in it (``group``: the mixture), k = their images the
    ledger knows."""
    book = Ledger(tmp_path / "l.sqlite")
    images = [f"img{i}" for i in range(12)]
    recorded_run(book, images, 1.2, 0.1, 50)  # per image, no persons
    persons = {"alice": images[:4], "bob": images[4:6], **{f"p{i}": [images[i]] for i in range(6, 12)}}
    person_run(book, images[:6], {"alice": images[:4], "bob": images[4:6]}, 1.0, 0.5, 10)
    report = book.person_epsilons(1e-5)
    alice = release([Segment(1.2, 0.1, 50, images=4), Segment(1.0, 0.5, 10)], 1e-5).epsilon
    bob = release([Segment(1.2, 0.1, 50, images=2), Segment(1.0, 0.5, 10)], 1e-5).epsilon
    assert sorted(h["epsilon"] for h in report["histogram"]) == pytest.approx(sorted([bob, alice]), rel=1e-6)
    assert persons  # the other six images stay per image, with the image-level run's epsilon
    assert book.epsilons(None, 1e-5)["records_of_persons"] == 6


def test_runs_that_would_hide_a_persons_spending_are_refused_and_record_nothing(tmp_path):
    book = Ledger(tmp_path / "l.sqlite")
    images = [f"img{i}" for i in range(6)]
    person_run(book, images, {"alice": images[:3], "bob": images[3:]}, 1.0, 0.5, 5)
    runs = len(book.summary()["datasets"][0]["runs"])
    with pytest.raises(ValueError, match="give persons="):  # per image, on images the ledger knows as persons'
        book.start_run(stand_ins(images[:2] + ["new"]), fingerprint="x", settings={}, delta=1e-5)
    with pytest.raises(ValueError, match="belongs to another person"):
        person_run(book, images, {"carol": images[:3], "bob": images[3:]}, 1.0, 0.5, 5)
    assert len(book.summary()["datasets"]) == 1 and len(book.summary()["datasets"][0]["runs"]) == runs


def test_the_ledger_keeps_keyed_hashes_of_person_ids_never_the_ids(tmp_path):
    path = tmp_path / "l.sqlite"
    book = Ledger(path)
    images = [f"img{i}" for i in range(4)]
    person_run(book, images, {"MRN-0012345": images[:2], "MRN-0067890": images[2:]}, 1.0, 0.5, 5)
    assert b"MRN-00" not in path.read_bytes()
    key = path.with_name(path.name + ".key")
    assert key.stat().st_mode & 0o777 == 0o600
    key.rename(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="key file .* is missing"):  # every known person would look new
        person_run(book, images, {"MRN-0012345": images[:2], "MRN-0067890": images[2:]}, 1.0, 0.5, 5)
    key.write_text("00" * 32 + "\n")
    with pytest.raises(ValueError, match="is not the key of the ledger"):
        person_run(book, images, {"MRN-0012345": images[:2], "MRN-0067890": images[2:]}, 1.0, 0.5, 5)


def test_a_resumed_run_must_keep_its_persons(tmp_path):
    """Resume checks the persons against the run's record: the same grouping passes; a person split
    in two, an image moved, or persons dropped do not."""
    book = Ledger(tmp_path / "l.sqlite")
    images = [f"img{i}" for i in range(6)]
    grouping = [("alice", [0, 1, 2]), ("bob", [3, 4, 5])]
    uid = book.start_run(stand_ins(images), fingerprint="f", settings={}, delta=1e-5, persons=grouping, unit="person")
    records = stand_ins(images)
    assert book.same_persons(uid, records, grouping)
    assert not book.same_persons(uid, records, [("alice", [0, 1]), ("alice2", [2]), ("bob", [3, 4, 5])])
    assert not book.same_persons(uid, records, [("alice", [0, 1, 3]), ("bob", [2, 4, 5])])
    assert not book.same_persons(uid, records, None)
    plain = book.start_run(stand_ins(["x", "y"]), fingerprint="g", settings={}, delta=1e-5)
    assert book.same_persons(plain, stand_ins(["x", "y"]), None)


def _near(record: Record) -> Record:
    """A near-duplicate of ``record``: other pixels and bytes, its thumbnail moved by 3 grey levels."""
    thumb = bytes(min(255, b + 3) for b in record.thumb)
    return Record(pixels=record.pixels + "-resaved", file=record.file + "-resaved", thumb=thumb)


def test_two_images_that_are_one_known_record_are_refused(tmp_path):
    """A known image and its near-duplicate in one training set are sampled as two images: the
    ledger, which knows them as one record, would count one. Found by a review: a person's second,
    near-identical image charged them for one image."""
    book = Ledger(tmp_path / "l.sqlite")
    x, other = stand_in("x"), stand_in("q0")
    book.start_run([x, other], fingerprint="a", settings={}, delta=1e-5)
    with pytest.raises(ValueError, match="one record for the ledger"):
        book.start_run([x, _near(x), other], fingerprint="b", settings={}, delta=1e-5,
                       persons=[("P", [0, 1]), ("Q", [2])])
    with pytest.raises(ValueError, match="one record for the ledger"):
        book.start_run([x, _near(x)], fingerprint="c", settings={}, delta=1e-5)


def test_a_running_image_level_run_keeps_its_images_budgets_once_persons_are_named(tmp_path):
    """A persons run that names some of an earlier, still running image-level run's images makes
    that run answer to those persons; its other images keep their own budgets (found by a review:
    they were dropped, and an image went to epsilon 2.8 on a budget of 1)."""
    book = Ledger(tmp_path / "l.sqlite")
    a, b = "a", "b"
    first = book.start_run(stand_ins([b]), fingerprint="b", settings={}, delta=1e-5, budget=1.0)
    book.reserve(first, steps=2000, noise_multiplier=1.0, sample_rate=0.05)  # b's budget spent, or nearly
    running = book.start_run(stand_ins([a, b]), fingerprint="ab", settings={}, delta=1e-5)
    before = book.reserve(running, steps=2000, noise_multiplier=1.0, sample_rate=0.05)
    book.start_run(stand_ins([a]), fingerprint="a", settings={}, delta=1e-5, persons=[("P", [0])], unit="person")
    after = book.reserve(running, steps=2000, noise_multiplier=1.0, sample_rate=0.05)
    assert before < 2000 and after == 0 or before + after < 2000
    assert book.epsilons(stand_ins([b]), 1e-5)["worst_epsilon"] <= 1.0 * 1.005


def test_persons_must_name_every_image_of_a_run(tmp_path):
    book = Ledger(tmp_path / "l.sqlite")
    with pytest.raises(ValueError, match="name every image"):
        book.start_run(stand_ins(["a", "b", "c"]), fingerprint="f", settings={}, delta=1e-5,
                       persons=[("P", [0, 1])], unit="person")
