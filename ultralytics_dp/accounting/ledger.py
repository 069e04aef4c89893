"""A write-ahead privacy ledger per record: every run, the records it sampled from, and its steps.

Privacy spent is never refunded, and it is spent per record: one training image. A record is
its image (``records``): the SHA-256 of its decoded pixels, so relabelling an image, moving it to
another class folder, adding it to a new dataset version or re-encoding it losslessly keeps the
same record. An image the ledger has not seen by its pixels is the record a ledger of schema 3 or
before knew by its file's bytes, if any, else a record it knows that it near-duplicates (a
re-saved, slightly resized or recoloured copy: it spends that record's budget, the conservative
choice), else a new record. The ledger stores, per run, its (sigma, q, steps) segments and the set
of records it sampled from (a membership table of record identities and thumbnails; no
image or label), and each run's delta. The epsilon of a record is the composition of every run
that included it (``accountant.release``: the larger of two accountants' upper bounds), evaluated
at the delta the question names: a privacy loss distribution composes without a delta, so runs at
different deltas share one ledger; a run checks its ``dataset_budget`` at its own delta, and a
report states the delta it used (by default the smallest of the runs'). Records included by the
same set of runs share one composition, so the cost grows with the number of distinct run
combinations, not of images.

A record's lifetime budget is the smallest ``dataset_budget`` set on any run that included it.
Steps are recorded *before* they are taken (``reserve``), durably: a process killed at any moment
never leaves the ledger below what was spent. Writes are ``BEGIN IMMEDIATE`` transactions, so
concurrent runs lose no update, and ``reserve`` grants an epoch's steps only as far as every
record of the run stays within its budget, counting runs that started since this one was planned.
Images are decoded and hashed every time (a cache keyed by size and modification time can be
fooled by a same-size file whose time was kept).

Persons. A run that knows whose images these are (a ``persons`` file) records each person as a
keyed hash of their id (``person_keys``; the raw id is never stored) and which of its records are
whose. From then on those records are accounted **per person**: a person's epsilon composes every
person-level run that included them (its steps as they are) and every image-level run that held
any of their images, charged as a person with k images in it (``group.person_segment``: the
mixture of their images), k counted from the records the ledger knows as theirs: an image-level run
recorded before the person was known is charged too, as soon as a run names them. A person's
lifetime budget is the smallest ``dataset_budget`` of those runs, and a run with persons is held
to its persons' budgets, not its images'. A run without persons is refused on images the ledger
knows as a person's (it could not charge that person for their other images in it), and so is a
persons file that gives a known image to another person.

Record identities, thumbnails and dataset fingerprints never leave this file: anyone holding the data could
recompute them and test membership. A run is known outside the ledger only by a random id (UUID4).
Runs from ledgers of schema 1 and 2 (whole-dataset fingerprints, no record identities) are kept as
*legacy* runs that count for every record: an over-count, never an under-count.
This module must not import Ultralytics.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
import uuid
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from . import person_keys
from .accountant import release
from .group import person_segments
from .pld import Segment
from .records import NEAR, Record, near_pairs
from .planning import BudgetGroup, RecordBudgets

SCHEMA = "ultralytics-dp-ledger/5"
Persons = Sequence[tuple[str, Sequence[int]]]  # (person id, positions of their images in the run's records)
_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (id INTEGER PRIMARY KEY, sha256 TEXT UNIQUE NOT NULL, pixels TEXT, thumb BLOB,
    mean REAL);
CREATE UNIQUE INDEX IF NOT EXISTS records_pixels ON records(pixels);
CREATE INDEX IF NOT EXISTS records_mean ON records(mean);
CREATE TABLE IF NOT EXISTS datasets (
    id INTEGER PRIMARY KEY, fingerprint TEXT UNIQUE NOT NULL, num_samples INTEGER NOT NULL, created REAL NOT NULL,
    description TEXT);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, uid TEXT UNIQUE NOT NULL, dataset_id INTEGER REFERENCES datasets(id),
    created REAL NOT NULL, name TEXT, settings TEXT NOT NULL, budget REAL, legacy INTEGER NOT NULL DEFAULT 0,
    delta REAL, unit TEXT NOT NULL DEFAULT 'image');
CREATE TABLE IF NOT EXISTS membership (
    run_id INTEGER NOT NULL, record_id INTEGER NOT NULL, PRIMARY KEY (run_id, record_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS membership_record ON membership(record_id, run_id);
CREATE TABLE IF NOT EXISTS persons (id INTEGER PRIMARY KEY, key TEXT UNIQUE NOT NULL);
CREATE TABLE IF NOT EXISTS owners (record_id INTEGER PRIMARY KEY, person_id INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS owners_person ON owners(person_id);
CREATE TABLE IF NOT EXISTS person_membership (
    run_id INTEGER NOT NULL, person_id INTEGER NOT NULL, images INTEGER NOT NULL, PRIMARY KEY (run_id, person_id))
    WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS person_membership_person ON person_membership(person_id, run_id);
CREATE TABLE IF NOT EXISTS spends (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run_id INTEGER NOT NULL REFERENCES runs(id),
    noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL, steps INTEGER NOT NULL, created REAL NOT NULL);
"""


def default_path() -> Path:
    """``$ULTRALYTICS_DP_LEDGER``, else ``$XDG_CONFIG_HOME/ultralytics_dp/ledger.sqlite``."""
    if os.environ.get("ULTRALYTICS_DP_LEDGER"):
        return Path(os.environ["ULTRALYTICS_DP_LEDGER"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "ultralytics_dp" / "ledger.sqlite"


def version_fingerprint(records: Sequence[Record], labels: Sequence[str]) -> str:
    """A dataset version: its records and their labels, as a set (order and file names do not matter)."""
    pairs = sorted(hashlib.sha256(f"{r.pixels}\n{lb}".encode()).hexdigest() for r, lb in zip(records, labels))
    return hashlib.sha256("\n".join(pairs).encode()).hexdigest()


class Ledger:
    """The SQLite ledger at ``path`` (created if missing, unless ``create=False``; refused if it is
    some other file; ledgers of schemas 1 to 3 are upgraded in place)."""

    def __init__(self, path: str | Path | None = None, *, create: bool = True) -> None:
        self.path = Path(path) if path else default_path()
        existed = self.path.exists()
        if existed and self.path.is_dir():
            raise ValueError(f"ledger path {self.path} is a directory, not a ledger file")
        if not existed and not create:
            raise ValueError(f"no ledger at {self.path}: no private run has been recorded there")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._connect() as db:
                tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if existed and tables and "meta" not in tables:
                    raise ValueError
                if not tables and not create:  # an empty SQLite file: reading it must not make it a ledger
                    raise ValueError(f"{self.path} is an empty database, not a ledger: no private run has been "
                                     "recorded there")
                row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() if "meta" in tables else None
                if row and row[0] in ("ultralytics-dp-ledger/1", "ultralytics-dp-ledger/2"):
                    _upgrade_to_3(db)
                    _upgrade_to_4(db)
                elif row and row[0] == "ultralytics-dp-ledger/3":
                    _upgrade_to_4(db)
                elif row and row[0] == "ultralytics-dp-ledger/4":
                    _upgrade_to_5(db)
                elif existed and tables and (not row or row[0] != SCHEMA):
                    raise ValueError
                for statement in _TABLES.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA,))
        except sqlite3.DatabaseError:
            raise ValueError(f"{self.path} is not an ultralytics-dp ledger; point ledger= (or $ULTRALYTICS_DP_LEDGER) "
                             "at a ledger file or a path that does not exist yet") from None
        except ValueError as err:
            raise ValueError(str(err) or f"{self.path} is not an ultralytics-dp ledger; point ledger= (or "
                             "$ULTRALYTICS_DP_LEDGER) at a ledger file or a path that does not exist yet") from None

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            db.execute("PRAGMA synchronous=FULL")
            db.execute("BEGIN IMMEDIATE")  # one writer at a time; readers see committed state
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        finally:
            db.close()

    # ------------------------------------------------------------------ runs and spends
    def delta(self) -> float | None:
        """The delta a report uses by default: the smallest of the recorded runs' (None before any run)."""
        with self._connect() as db:
            return _smallest_delta(db)

    def start_run(self, records: Sequence[Record], *, fingerprint: str, settings: dict[str, Any], delta: float,
                  budget: float | None = None, name: str = "", description: str = "",
                  persons: Persons | None = None, unit: str = "image") -> str:
        """Record a run and the records it samples from, before its first step; returns its random id,
        the only link a checkpoint may carry. ``persons``: (person id, positions of their images in
        ``records``) for every person of the training set, when the run knows them; ``unit``: the
        run's privacy unit ("person" needs ``persons``). See the module's docstring for persons."""
        if unit not in ("image", "person") or (unit == "person" and persons is None):
            raise ValueError(f"a run per {unit!r} needs its persons")
        uid = str(uuid.uuid4())
        with self._connect() as db:
            secret = self._secret(db) if persons is not None else None
            db.execute("INSERT OR IGNORE INTO datasets (fingerprint, num_samples, created, description) "
                       "VALUES (?, ?, ?, ?)", (fingerprint, len(records), time.time(), description))
            dataset_id = db.execute("SELECT id FROM datasets WHERE fingerprint=?", (fingerprint,)).fetchone()[0]
            cur = db.execute("INSERT INTO runs (uid, dataset_id, created, name, settings, budget, delta, unit) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (uid, dataset_id, time.time(), name, json.dumps(settings, sort_keys=True), budget,
                              float(delta), unit))
            run_id = cur.lastrowid
            ids = _resolve(db, records, create=True)
            if len(set(ids)) < len(ids):  # each image is sampled on its own: one record may not be two images
                raise ValueError("two images of this training set are one record for the ledger (near-duplicates of an "
                                 "image it knows, e.g. re-saved copies or near-identical frames); remove one of them")
            db.executemany("INSERT OR IGNORE INTO membership (run_id, record_id) VALUES (?, ?)",
                           ((run_id, i) for i in ids))
            if persons is not None and sorted(i for _, images in persons for i in images) != list(range(len(ids))):
                raise ValueError("the persons must name every image of the run exactly once")
            if persons is None:
                _refuse_owned(db, ids)
            else:
                _record_persons(db, run_id, unit, ids, [(person_keys.person_key(secret, p), images)
                                                        for p, images in persons])
        return uid

    def _secret(self, db: sqlite3.Connection) -> bytes:
        """The key of person ids (``person_keys``), created with the ledger's first person."""
        row = db.execute("SELECT value FROM meta WHERE key='person_key_check'").fetchone()
        secret = person_keys.load(self.path, row[0] if row else None)
        if row is None:
            db.execute("INSERT INTO meta VALUES ('person_key_check', ?)", (person_keys.check_value(secret),))
        return secret

    def run(self, uid: str | None) -> dict[str, Any] | None:
        """The run with random id ``uid`` (its dataset version's fingerprint and settings), or None."""
        with self._connect() as db:
            row = db.execute("SELECT d.fingerprint, r.settings FROM runs r LEFT JOIN datasets d ON r.dataset_id = d.id "
                             "WHERE r.uid=?", (uid,)).fetchone()
        return None if row is None else {"fingerprint": row[0], "settings": json.loads(row[1])}

    def same_persons(self, uid: str, records: Sequence[Record], persons: Persons | None) -> bool:
        """Whether ``persons`` (with their images among ``records``) are exactly the persons, and
        their images exactly the images, the run ``uid`` was recorded with (both None: no persons)."""
        with self._connect() as db:
            run_id = db.execute("SELECT id FROM runs WHERE uid=?", (uid,)).fetchone()[0]
            recorded = {r[0] for r in db.execute("SELECT person_id FROM person_membership WHERE run_id=? AND "
                                                 "(images > 0 OR (SELECT unit FROM runs WHERE id=?) = 'person')",
                                                 (run_id, run_id))}
            if persons is None or not recorded:
                return persons is None and not recorded
            secret = self._secret(db)
            ids = _resolve(db, records, create=False)
            known = dict(db.execute("SELECT key, id FROM persons"))
            _stage_ids(db, [i for i in ids if i is not None])
            owner = dict(db.execute("SELECT o.record_id, o.person_id FROM owners o JOIN staged_ids s "
                                    "ON o.record_id = s.id"))
            given = [known.get(person_keys.person_key(secret, person)) for person, _ in persons]
            return set(given) == recorded and all(owner.get(ids[i]) == person_id
                                                  for person_id, (_, images) in zip(given, persons) for i in images)

    def reserve(self, uid: str, *, steps: int, noise_multiplier: float, sample_rate: float) -> int:
        """Durably record up to ``steps`` steps of (sigma, q) for run ``uid`` before they are taken, and
        return how many were granted: fewer when more would take one of the run's records past its
        lifetime budget (another run on the same records may have spent since this one was planned).
        The check and the write are one transaction."""
        if steps <= 0:
            return 0
        with self._connect() as db:
            row = db.execute("SELECT id, budget, delta FROM runs WHERE uid=?", (uid,)).fetchone()
            if row is None:
                raise ValueError(f"no run {uid} in ledger {self.path}")
            run_id, budget, delta = row  # the run's budget is checked at its own delta
            # the run's persons (charged for it, maybe since it started) and its images no person owns
            people = dict(db.execute("SELECT person_id, images FROM person_membership WHERE run_id=?", (run_id,)))
            members = {r[0] for r in db.execute("SELECT record_id FROM membership WHERE run_id=? AND record_id NOT IN "
                                                "(SELECT record_id FROM owners)", (run_id,))}
            groups = [g for limits in (_person_budgets(db, people, {}, budget, delta) if people else None,
                                       _budgets(db, members, 0, budget, delta) if members else None)
                      if limits is not None for g in limits.groups]
            limits = RecordBudgets(delta, tuple(groups)) if groups else None
            if limits is not None:
                steps = limits.steps_within(noise_multiplier, sample_rate, steps)
            if steps:
                db.execute("INSERT INTO spends (run_id, noise_multiplier, sample_rate, steps, created) "
                           "VALUES (?, ?, ?, ?, ?)", (run_id, noise_multiplier, sample_rate, steps, time.time()))
        return steps

    # ------------------------------------------------------------------ per-record epsilon
    def budgets(self, records: Sequence[Record], budget: float | None, delta: float,
                persons: Persons | None = None, unit: str = "image") -> RecordBudgets | None:
        """This run's records that have a lifetime budget (from an earlier run, or ``budget`` now), grouped
        by the runs that included them, at ``delta`` (the run's own), for ``planning``. None if no
        record has one. With ``persons`` the records are the persons (with the images each has in
        this run, which an image-level run charges them for, ``group``)."""
        with self._connect() as db:
            if persons is not None:
                row = db.execute("SELECT value FROM meta WHERE key='person_key_check'").fetchone()
                secret = person_keys.load(self.path, row[0]) if row else None  # no person known yet: all new
                known = dict(db.execute("SELECT key, id FROM persons"))
                people: dict[int, int] = {}
                new: Counter = Counter()
                for person, images in persons:
                    k = 0 if unit == "person" else len(images)
                    person_id = known.get(person_keys.person_key(secret, person)) if secret else None
                    if person_id is None:
                        new[k] += 1
                    else:
                        people[person_id] = k
                return _person_budgets(db, people, new, budget, delta)
            ids = _resolve(db, records, create=False)
            return _budgets(db, {i for i in ids if i is not None}, ids.count(None), budget, delta)

    def epsilons(self, records: Sequence[Record] | None = None, delta: float | None = None) -> dict[str, Any]:
        """Per-record epsilon of ``records`` (every recorded record if None) at ``delta`` (default: the
        smallest delta of the ledger's runs): the worst, how many records are at each distinct epsilon,
        and how many the ledger has never seen. Legacy runs count for every image, seen or not:
        ``legacy_epsilon`` is what any image has spent at least. Records the ledger knows as a
        person's are only counted (``records_of_persons``): their epsilon is their person's
        (``person_epsilons``)."""
        with self._connect() as db:
            if records is None:
                groups, segments, _, unseen = _groups(db, None, 0)
                owned = db.execute("SELECT COUNT(*) FROM owners").fetchone()[0]
            else:
                ids = _resolve(db, records, create=False)
                known = {i for i in ids if i is not None}
                groups, segments, _, unseen = _groups(db, known, ids.count(None))
                _stage_ids(db, known)
                owned = db.execute("SELECT COUNT(*) FROM owners o JOIN staged_ids s ON o.record_id = s.id").fetchone()[0]
            legacy = [s for (r,) in db.execute("SELECT id FROM runs WHERE legacy=1") for s in segments[r]]
            delta = _smallest_delta(db) if delta is None else delta
        histogram = _histogram([([s for r in signature for s in segments[r]], count) for signature, count in groups],
                               delta)
        floor = round(release(legacy, delta).epsilon, 6) if legacy and delta else 0.0
        return {"delta": delta, "worst_epsilon": max(histogram, default=floor), "legacy_epsilon": floor,
                "new_records": unseen, "records_of_persons": owned,
                "histogram": [{"epsilon": e, "records": n} for e, n in sorted(histogram.items())]}

    def person_epsilons(self, delta: float | None = None) -> dict[str, Any]:
        """Per-person epsilon of every person the ledger knows, at ``delta`` (default: the smallest
        of the runs'): the worst and how many persons are at each distinct epsilon."""
        with self._connect() as db:
            delta = _smallest_delta(db) if delta is None else delta
            histogram = _histogram(_person_groups(db, None)[0], delta)
        return {"delta": delta, "persons": sum(histogram.values()), "worst_epsilon": max(histogram, default=0.0),
                "histogram": [{"epsilon": e, "persons": n} for e, n in sorted(histogram.items())]}

    def summary(self, delta: float | None = None) -> dict[str, Any]:
        """Every dataset version with its runs and worst-record epsilon, and the whole ledger's
        per-record histogram, at ``delta`` (default: the smallest of the runs'; for ``yolo-dp ledger``)."""
        delta = self.delta() if delta is None else delta
        with self._connect() as db:
            datasets = db.execute("SELECT id, num_samples, description FROM datasets ORDER BY id").fetchall()
            runs = db.execute("SELECT r.id, r.uid, r.dataset_id, r.name, r.settings, r.budget, r.legacy, r.delta, "
                              "r.unit, COALESCE(SUM(s.steps), 0) FROM runs r LEFT JOIN spends s ON s.run_id = r.id "
                              "GROUP BY r.id ORDER BY r.id").fetchall()
            members: dict[int, set[int]] = defaultdict(set)
            for dataset_id, record_id in db.execute("SELECT r.dataset_id, m.record_id FROM runs r JOIN membership m "
                                                    "ON m.run_id = r.id"):
                members[dataset_id].add(record_id)
            people: dict[int, set[int]] = defaultdict(set)
            for dataset_id, person_id in db.execute("SELECT r.dataset_id, m.person_id FROM runs r JOIN "
                                                    "person_membership m ON m.run_id = r.id"):
                people[dataset_id].add(person_id)
            worst = {ds: (max(_histogram(_groups_as_segments(db, members[ds]), delta), default=0.0),
                          max(_histogram(_person_groups(db, people[ds])[0], delta), default=0.0))
                     for ds, _, _ in datasets}
        run_rows = [{"id": rid, "run_id": uid, "dataset": ds, "name": name, "budget": budget, "legacy": bool(legacy),
                     "delta": run_delta, "unit": unit, "steps": steps, **json.loads(settings)}
                    for rid, uid, ds, name, settings, budget, legacy, run_delta, unit, steps in runs]
        versions = [{"id": ds, "description": description, "num_samples": n, "worst_epsilon": worst[ds][0],
                     "worst_person_epsilon": worst[ds][1], "persons": len(people[ds]),
                     "runs": [r for r in run_rows if r["dataset"] == ds]} for ds, n, description in datasets]
        return {**self.epsilons(None, delta), "datasets": versions,
                "legacy_runs": [r for r in run_rows if r["legacy"]], "per_person": self.person_epsilons(delta)}



def _histogram(groups: Iterable[tuple[Sequence[Segment], int]], delta: float | None) -> Counter:
    """How many records (or persons) are at each released epsilon (6 decimals), from groups of
    (what they spent, how many)."""
    histogram: Counter = Counter()
    for segments, count in groups:
        histogram[round(release(segments, delta).epsilon, 6) if segments and delta else 0.0] += count
    return histogram


def _groups_as_segments(db: sqlite3.Connection, ids: set[int]) -> list[tuple[list[Segment], int]]:
    """``_groups`` of the records ``ids`` as (their segments, count)."""
    groups, segments, _, _ = _groups(db, ids, 0)
    return [([s for r in signature for s in segments[r]], count) for signature, count in groups]


def _groups(db: sqlite3.Connection, ids: set[int] | None, unseen: int) -> tuple[list, dict, dict, int]:
    """Records grouped by the runs that included them (legacy runs include every record):
    [(run ids, count)], each run's segments, each run's budget, and ``unseen`` (records the ledger
    has never seen, counted under the legacy runs only). ``ids`` None: every recorded record.
    Records the ledger knows as a person's are left out: they are accounted per person."""
    if ids is None:
        ids = {r[0] for r in db.execute("SELECT id FROM records WHERE id NOT IN (SELECT record_id FROM owners)")}
        rows = db.execute("SELECT record_id, run_id FROM membership").fetchall()
    else:
        ids = ids - {r[0] for r in db.execute("SELECT record_id FROM owners")}
        _stage_ids(db, ids)
        rows = db.execute("SELECT m.record_id, m.run_id FROM membership m JOIN staged_ids s ON m.record_id = s.id"
                          ).fetchall()
    legacy = {r[0] for r in db.execute("SELECT id FROM runs WHERE legacy=1")}
    segments = _segments(db)
    budgets = dict(db.execute("SELECT id, budget FROM runs"))
    runs_of: dict[int, set[int]] = defaultdict(set)
    for record_id, run_id in rows:
        runs_of[record_id].add(run_id)
    signatures = Counter(tuple(sorted(runs_of[i] | legacy)) for i in ids)
    if unseen:
        signatures[tuple(sorted(legacy))] += unseen
    return sorted(signatures.items(), key=lambda kv: kv[1]), segments, budgets, unseen


def _budgets(db: sqlite3.Connection, ids: set[int], unseen: int, budget: float | None, delta: float
             ) -> RecordBudgets | None:
    groups, segments, budgets, _ = _groups(db, ids, unseen)
    out = []
    for signature, count in groups:
        limits = [b for b in (budget, *(budgets[r] for r in signature)) if b is not None]
        if limits:
            out.append(BudgetGroup(count, min(limits), tuple(s for r in signature for s in segments[r])))
    return RecordBudgets(delta, tuple(out)) if out else None


def _refuse_owned(db: sqlite3.Connection, ids: Sequence[int]) -> None:
    """A run without persons may not train on images the ledger knows as some person's: it could
    not charge those persons for it (their other images in this run are unknown to it)."""
    _stage_ids(db, ids)
    if db.execute("SELECT 1 FROM owners o JOIN staged_ids s ON o.record_id = s.id LIMIT 1").fetchone():
        raise ValueError("this training set holds images the ledger knows as belonging to persons; give persons= (the "
                         "CSV naming every image's person) so that the run is charged to them")


def _record_persons(db: sqlite3.Connection, run_id: int, unit: str, ids: Sequence[int],
                    persons: Sequence[tuple[str, Sequence[int]]]) -> None:
    """The run's persons (keyed hashes) and which of its records are whose; then every image-level
    run, this one and earlier ones, is charged to each of these persons for the images of theirs it
    held (``group``; a count only grows, so a person learnt of later is charged retroactively)."""
    if db.execute("SELECT 1 FROM runs WHERE legacy=1 LIMIT 1").fetchone():
        raise ValueError("this ledger holds runs recorded before it knew images (schema 1 or 2); they cannot be "
                         "charged to persons: use a new ledger (ledger=PATH) for runs with persons")
    db.executemany("INSERT OR IGNORE INTO persons (key) VALUES (?)", ((key,) for key, _ in persons))
    person_id = dict(db.execute("SELECT key, id FROM persons"))
    owned = [(ids[i], person_id[key]) for key, images in persons for i in images]
    _stage_ids(db, (r for r, _ in owned))
    known = dict(db.execute("SELECT o.record_id, o.person_id FROM owners o JOIN staged_ids s ON o.record_id = s.id"))
    if any(known.get(record, person) != person for record, person in owned):
        raise ValueError("an image of this training set belongs to another person in the ledger (the same pixels "
                         "were recorded with another person id); fix the persons file")
    db.executemany("INSERT OR IGNORE INTO owners (record_id, person_id) VALUES (?, ?)", owned)
    mine = {person_id[key] for key, _ in persons}
    db.executemany("INSERT INTO person_membership (run_id, person_id, images) VALUES (?, ?, ?)",
                   ((run_id, person_id[key], 0 if unit == "person" else len(images)) for key, images in persons))
    _stage_ids(db, mine)
    charged = db.execute("SELECT m.run_id, o.person_id, COUNT(*) FROM owners o JOIN staged_ids s ON o.person_id = s.id "
                         "JOIN membership m ON m.record_id = o.record_id JOIN runs r ON r.id = m.run_id "
                         "WHERE r.unit = 'image' AND r.id != ? GROUP BY m.run_id, o.person_id", (run_id,)).fetchall()
    db.executemany("INSERT INTO person_membership (run_id, person_id, images) VALUES (?, ?, ?) "
                   "ON CONFLICT (run_id, person_id) DO UPDATE SET images = MAX(images, excluded.images)", charged)


def _person_groups(db: sqlite3.Connection, people: Iterable[int] | None
                   ) -> tuple[list[tuple[list[Segment], int]], dict[tuple, list[int]]]:
    """Persons grouped by what they spent: [(their segments, count)] (an image-level run's as its
    person with k images sees them, ``group``), and each group's (run, k) signature -> persons."""
    if people is None:
        rows = db.execute("SELECT person_id, run_id, images FROM person_membership").fetchall()
    else:
        _stage_ids(db, people)
        rows = db.execute("SELECT m.person_id, m.run_id, m.images FROM person_membership m JOIN staged_ids s "
                          "ON m.person_id = s.id").fetchall()
    segments = _segments(db)
    spent: dict[int, set[tuple[int, int]]] = defaultdict(set)
    for person, run_id, images in rows:
        spent[person].add((run_id, images))
    members: dict[tuple, list[int]] = defaultdict(list)
    for person in (spent if people is None else people):
        members[tuple(sorted(spent[person]))].append(person)
    groups = [([s for run_id, k in signature for s in (segments[run_id] if k == 0
                                                         else person_segments(segments[run_id], k))], len(persons))
              for signature, persons in members.items()]
    return groups, members


def _person_budgets(db: sqlite3.Connection, people: dict[int, int], new: dict[int, int], budget: float | None,
                    delta: float) -> RecordBudgets | None:
    """Like ``_budgets``, for persons: ``people`` maps each known person to the images this run
    charges them for (0: the run is per person; ``BudgetGroup.images``), ``new`` counts unknown
    persons by that number."""
    budgets = dict(db.execute("SELECT id, budget FROM runs"))
    groups, members = _person_groups(db, people)
    counts: Counter = Counter()
    for (history, _), (signature, persons) in zip(groups, members.items()):
        for person in persons:
            counts[signature, tuple(history), people[person]] += 1
    for k, n in new.items():
        if n:
            counts[(), (), k] += n
    out = []
    for (signature, history, k), count in counts.items():
        limits = [b for b in (budget, *(budgets[r] for r, _ in signature)) if b is not None]
        if limits:
            out.append(BudgetGroup(count, min(limits), history, images=k))
    return RecordBudgets(delta, tuple(out)) if out else None


def _segments(db: sqlite3.Connection) -> dict[int, list[Segment]]:
    """Each run's recorded (sigma, q, steps) segments, in the order they were reserved."""
    segments: dict[int, list[Segment]] = defaultdict(list)
    for run_id, *seg in db.execute("SELECT run_id, noise_multiplier, sample_rate, steps FROM spends ORDER BY id"):
        segments[run_id].append(Segment(*seg))
    return segments


def _smallest_delta(db: sqlite3.Connection) -> float | None:
    row = db.execute("SELECT MIN(delta) FROM runs").fetchone()
    return None if row is None or row[0] is None else float(row[0])


def _stage_ids(db: sqlite3.Connection, ids: Iterable[int]) -> None:
    """Put record ``ids`` in the temporary table ``staged_ids`` for joins."""
    db.execute("CREATE TEMP TABLE IF NOT EXISTS staged_ids (id INTEGER PRIMARY KEY)")
    db.execute("DELETE FROM staged_ids")
    db.executemany("INSERT OR IGNORE INTO staged_ids VALUES (?)", ((i,) for i in ids))


def _resolve(db: sqlite3.Connection, records: Sequence[Record], create: bool) -> list[int | None]:
    """Each record's id in the ledger (see the module's docstring): by its pixels, else by its file's
    bytes (a record of schema 3 or before, which then takes the pixels as well), else as a
    near-duplicate of a record the ledger held before this call; else a new record (``create``) or
    None (not seen)."""
    db.execute("CREATE TEMP TABLE IF NOT EXISTS staged (pos INTEGER PRIMARY KEY, pixels TEXT, file TEXT)")
    db.execute("DELETE FROM staged")
    db.executemany("INSERT INTO staged VALUES (?, ?, ?)", ((i, r.pixels, r.file) for i, r in enumerate(records)))
    ids: list[int | None] = [None] * len(records)
    for pos, record_id in db.execute("SELECT s.pos, r.id FROM staged s JOIN records r ON r.pixels = s.pixels"):
        ids[pos] = record_id
    for pos, record_id in db.execute("SELECT s.pos, r.id FROM staged s JOIN records r ON r.sha256 = s.file "
                                     "WHERE r.pixels IS NULL"):
        if ids[pos] is None:
            ids[pos] = record_id
            if create:
                db.execute("UPDATE records SET pixels=?, thumb=?, mean=? WHERE id=? AND pixels IS NULL",
                           (records[pos].pixels, records[pos].thumb, _mean(records[pos]), record_id))
    unknown = [pos for pos, i in enumerate(ids) if i is None and records[pos].has_content]
    if unknown:
        means = [_mean(records[pos]) for pos in unknown]
        known = db.execute("SELECT id, thumb FROM records WHERE thumb IS NOT NULL AND mean BETWEEN ? AND ?",
                           (min(means) - NEAR, max(means) + NEAR)).fetchall()
        for i, j in near_pairs([records[pos].thumb for pos in unknown], [t for _, t in known]):
            ids[unknown[i]] = ids[unknown[i]] or known[j][0]
    if create:
        for pos, record in enumerate(records):
            if ids[pos] is None:
                db.execute("INSERT OR IGNORE INTO records (sha256, pixels, thumb, mean) VALUES (?, ?, ?, ?)",
                           (record.file, record.pixels, record.thumb, _mean(record)))
                ids[pos] = db.execute("SELECT id FROM records WHERE pixels=?", (record.pixels,)).fetchone()[0]
    return ids


def _mean(record: Record) -> float:
    return sum(record.thumb) / len(record.thumb)


def _upgrade_to_3(db: sqlite3.Connection) -> None:
    """Schema 1/2 -> 3 (with schema 4's per-run delta). Old runs have no record identities: they
    become legacy runs that count for every record, with their dataset's budget and delta; their
    spends keep their run ids."""
    columns = {r[1] for r in db.execute("PRAGMA table_info(runs)")}
    old = db.execute("SELECT r.id, r.created, r.name, r.settings, d.budget, d.description, d.delta"
                     + (", r.uid" if "uid" in columns else ", NULL")
                     + " FROM runs r LEFT JOIN datasets d ON r.fingerprint = d.fingerprint").fetchall()
    db.execute("DROP TABLE runs")
    db.execute("DROP TABLE datasets")
    db.execute("DROP TABLE IF EXISTS file_hashes")  # hashes keyed by size and mtime: not trusted any more
    for statement in _TABLES.split(";"):
        if statement.strip():
            db.execute(statement)
    for rid, created, name, settings, budget, description, delta, uid in old:
        db.execute("INSERT INTO runs (id, uid, dataset_id, created, name, settings, budget, legacy, delta) "
                   "VALUES (?, ?, NULL, ?, ?, ?, ?, 1, ?)",
                   (rid, uid or str(uuid.uuid4()), created, f"{name} ({description})", settings, budget, delta))
    db.execute("UPDATE meta SET value='ultralytics-dp-ledger/3' WHERE key='schema'")


def _upgrade_to_5(db: sqlite3.Connection) -> None:
    """Schema 4 -> 5: persons (keyed hashes), which records are whose, and each run's unit; every
    run so far was per image."""
    if "unit" not in {r[1] for r in db.execute("PRAGMA table_info(runs)")}:
        db.execute("ALTER TABLE runs ADD COLUMN unit TEXT NOT NULL DEFAULT 'image'")
    db.execute("UPDATE meta SET value=? WHERE key='schema'", (SCHEMA,))


def _upgrade_to_4(db: sqlite3.Connection) -> None:
    """Schema 3 -> 4: each run states its own delta, and records are known by their pixels too.
    Schema 3 had one delta per ledger (its first run's, every run's since): it becomes every old
    run's. Its records keep their file hashes; each takes its pixels the next time a run sees it."""
    columns = {r[1] for r in db.execute("PRAGMA table_info(runs)")}
    if "delta" not in columns:
        db.execute("ALTER TABLE runs ADD COLUMN delta REAL")
    record_columns = {r[1] for r in db.execute("PRAGMA table_info(records)")}
    for column, kind in (("pixels", "TEXT"), ("thumb", "BLOB"), ("mean", "REAL")):
        if column not in record_columns:
            db.execute(f"ALTER TABLE records ADD COLUMN {column} {kind}")
    row = db.execute("SELECT value FROM meta WHERE key='delta'").fetchone()
    if row is not None:
        db.execute("UPDATE runs SET delta=? WHERE delta IS NULL", (float(row[0]),))
    _upgrade_to_5(db)
