"""A write-ahead privacy ledger per record: every run, the records it sampled from, and its steps.

Privacy spent is never refunded, and it is spent per record: one training image. A record's
identity is the SHA-256 of its image file's bytes, so relabelling an image, moving it to another
class folder or adding it to a new dataset version keeps the same record (a re-encoded or resized
copy is a different file, hence a different record). The ledger stores, per run, its (sigma, q,
steps) segments and the set of records it sampled from (a membership table of record hashes; no
image or label). The epsilon of a record is the PRV composition of every run that included it, at
the ledger's one delta (its first run's): records included by the same set of runs share one
composition, so the cost grows with the number of distinct run combinations, not of images.

A record's lifetime budget is the smallest ``dataset_budget`` set on any run that included it.
Steps are recorded *before* they are taken (``reserve``), durably: a process killed at any moment
never leaves the ledger below what was spent. Writes are ``BEGIN IMMEDIATE`` transactions, so
concurrent runs lose no update, and ``reserve`` grants an epoch's steps only as far as every
record of the run stays within its budget, counting runs that started since this one was planned.
Image files are hashed from their bytes every time (a cache keyed by size and modification time
can be fooled by a same-size file whose time was kept).

Record hashes and dataset fingerprints never leave this file: anyone holding the data could
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

from .pld import Segment, compose
from .planning import BudgetGroup, RecordBudgets

SCHEMA = "ultralytics-dp-ledger/3"
_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (id INTEGER PRIMARY KEY, sha256 TEXT UNIQUE NOT NULL);
CREATE TABLE IF NOT EXISTS datasets (
    id INTEGER PRIMARY KEY, fingerprint TEXT UNIQUE NOT NULL, num_samples INTEGER NOT NULL, created REAL NOT NULL,
    description TEXT);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, uid TEXT UNIQUE NOT NULL, dataset_id INTEGER REFERENCES datasets(id),
    created REAL NOT NULL, name TEXT, settings TEXT NOT NULL, budget REAL, legacy INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS membership (
    run_id INTEGER NOT NULL, record_id INTEGER NOT NULL, PRIMARY KEY (run_id, record_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS membership_record ON membership(record_id, run_id);
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


def version_fingerprint(records: Sequence[str], labels: Sequence[str]) -> str:
    """A dataset version: its records and their labels, as a set (order and file names do not matter)."""
    pairs = sorted(hashlib.sha256(f"{r}\n{lb}".encode()).hexdigest() for r, lb in zip(records, labels))
    return hashlib.sha256("\n".join(pairs).encode()).hexdigest()


class Ledger:
    """The SQLite ledger at ``path`` (created if missing, unless ``create=False``; refused if it is
    some other file; schema 1 and 2 ledgers are upgraded in place)."""

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
                row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() if "meta" in tables else None
                if row and row[0] in ("ultralytics-dp-ledger/1", "ultralytics-dp-ledger/2"):
                    _upgrade_to_3(db)
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

    # ------------------------------------------------------------------ record identities
    @staticmethod
    def record_hashes(images: Iterable[str | Path]) -> list[str]:
        """The record identity of each image: the SHA-256 of its file's bytes (writes nothing)."""
        return [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in images]

    # ------------------------------------------------------------------ runs and spends
    def delta(self) -> float | None:
        """The ledger's delta (its first run's), or None before any run."""
        with self._connect() as db:
            row = db.execute("SELECT value FROM meta WHERE key='delta'").fetchone()
        return None if row is None else float(row[0])

    def check_delta(self, delta: float) -> None:
        """One delta per ledger: every record's epsilon is stated at it."""
        known = self.delta()
        if known is not None and known != delta:
            raise ValueError(f"the ledger {self.path} states every image's epsilon at delta={known:g} (its first "
                             f"run's), so every run recorded in it uses delta={known:g}; got delta={delta:g}")

    def start_run(self, records: Sequence[str], *, fingerprint: str, settings: dict[str, Any], delta: float,
                  budget: float | None = None, name: str = "", description: str = "") -> str:
        """Record a run and the records it samples from, before its first step; returns its random id,
        the only link a checkpoint may carry."""
        uid = str(uuid.uuid4())
        with self._connect() as db:
            row = db.execute("SELECT value FROM meta WHERE key='delta'").fetchone()
            if row is not None and float(row[0]) != delta:
                raise ValueError(f"the ledger {self.path} accounts every record at delta={float(row[0]):g}")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('delta', ?)", (repr(float(delta)),))
            db.execute("INSERT OR IGNORE INTO datasets (fingerprint, num_samples, created, description) "
                       "VALUES (?, ?, ?, ?)", (fingerprint, len(records), time.time(), description))
            dataset_id = db.execute("SELECT id FROM datasets WHERE fingerprint=?", (fingerprint,)).fetchone()[0]
            cur = db.execute("INSERT INTO runs (uid, dataset_id, created, name, settings, budget) VALUES (?, ?, ?, ?, ?, ?)",
                             (uid, dataset_id, time.time(), name, json.dumps(settings, sort_keys=True), budget))
            run_id = cur.lastrowid
            db.executemany("INSERT OR IGNORE INTO records (sha256) VALUES (?)", ((r,) for r in records))
            _stage(db, records)
            db.execute("INSERT OR IGNORE INTO membership (run_id, record_id) SELECT ?, r.id FROM records r "
                       "JOIN staged s ON r.sha256 = s.sha256", (run_id,))
        return uid

    def run(self, uid: str | None) -> dict[str, Any] | None:
        """The run with random id ``uid`` (its dataset version's fingerprint and settings), or None."""
        with self._connect() as db:
            row = db.execute("SELECT d.fingerprint, r.settings FROM runs r LEFT JOIN datasets d ON r.dataset_id = d.id "
                             "WHERE r.uid=?", (uid,)).fetchone()
        return None if row is None else {"fingerprint": row[0], "settings": json.loads(row[1])}

    def reserve(self, uid: str, *, steps: int, noise_multiplier: float, sample_rate: float) -> int:
        """Durably record up to ``steps`` steps of (sigma, q) for run ``uid`` before they are taken, and
        return how many were granted: fewer when more would take one of the run's records past its
        lifetime budget (another run on the same records may have spent since this one was planned).
        The check and the write are one transaction."""
        if steps <= 0:
            return 0
        with self._connect() as db:
            row = db.execute("SELECT id, budget FROM runs WHERE uid=?", (uid,)).fetchone()
            if row is None:
                raise ValueError(f"no run {uid} in ledger {self.path}")
            run_id, budget = row
            delta = float(db.execute("SELECT value FROM meta WHERE key='delta'").fetchone()[0])
            members = [r[0] for r in db.execute(
                "SELECT rec.sha256 FROM membership m JOIN records rec ON rec.id = m.record_id WHERE m.run_id=?", (run_id,))]
            limits = _budgets(db, members, budget, delta)
            if limits is not None:
                steps = limits.steps_within(noise_multiplier, sample_rate, steps)
            if steps:
                db.execute("INSERT INTO spends (run_id, noise_multiplier, sample_rate, steps, created) "
                           "VALUES (?, ?, ?, ?, ?)", (run_id, noise_multiplier, sample_rate, steps, time.time()))
        return steps

    # ------------------------------------------------------------------ per-record epsilon
    def budgets(self, records: Sequence[str], budget: float | None, delta: float) -> RecordBudgets | None:
        """This run's records that have a lifetime budget (from an earlier run, or ``budget`` now), grouped
        by the runs that included them, at ``delta`` (the ledger's: see ``check_delta``), for
        ``planning``. None if no record has one."""
        with self._connect() as db:
            return _budgets(db, records, budget, delta)

    def epsilons(self, records: Sequence[str] | None = None) -> dict[str, Any]:
        """Per-record epsilon of ``records`` (every recorded record if None): the worst, how many records
        are at each distinct epsilon, and how many the ledger has never seen. Legacy runs count for
        every image, seen or not: ``legacy_epsilon`` is what any image has spent at least."""
        with self._connect() as db:
            groups, segments, _, unseen = _groups(db, records)
            legacy = [s for (r,) in db.execute("SELECT id FROM runs WHERE legacy=1") for s in segments[r]]
        delta = self.delta()
        histogram: Counter = Counter()
        for signature, count in groups:
            spent = [s for r in signature for s in segments[r]]
            histogram[round(compose(spent, delta), 6) if spent and delta else 0.0] += count
        floor = round(compose(legacy, delta), 6) if legacy and delta else 0.0
        return {"delta": delta, "worst_epsilon": max(histogram, default=floor), "legacy_epsilon": floor,
                "new_records": unseen, "histogram": [{"epsilon": e, "records": n} for e, n in sorted(histogram.items())]}

    def summary(self) -> dict[str, Any]:
        """Every dataset version with its runs and worst-record epsilon, and the whole ledger's
        per-record histogram (for ``yolo-dp ledger``)."""
        with self._connect() as db:
            datasets = db.execute("SELECT id, num_samples, description FROM datasets ORDER BY id").fetchall()
            runs = db.execute("SELECT r.id, r.uid, r.dataset_id, r.name, r.settings, r.budget, r.legacy, "
                              "COALESCE(SUM(s.steps), 0) FROM runs r LEFT JOIN spends s ON s.run_id = r.id "
                              "GROUP BY r.id ORDER BY r.id").fetchall()
            members = defaultdict(list)
            for dataset_id, sha in db.execute("SELECT DISTINCT r.dataset_id, rec.sha256 FROM runs r JOIN membership m "
                                              "ON m.run_id = r.id JOIN records rec ON rec.id = m.record_id"):
                members[dataset_id].append(sha)
        run_rows = [{"id": rid, "run_id": uid, "dataset": ds, "name": name, "budget": budget, "legacy": bool(legacy),
                     "steps": steps, **json.loads(settings)}
                    for rid, uid, ds, name, settings, budget, legacy, steps in runs]
        versions = [{"id": ds, "description": description, "num_samples": n,
                     "worst_epsilon": self.epsilons(members[ds])["worst_epsilon"],
                     "runs": [r for r in run_rows if r["dataset"] == ds]} for ds, n, description in datasets]
        return {**self.epsilons(), "datasets": versions, "legacy_runs": [r for r in run_rows if r["legacy"]]}


def _groups(db: sqlite3.Connection, records: Sequence[str] | None) -> tuple[list, dict, dict, int]:
    """Records grouped by the runs that included them (legacy runs include every record):
    [(run ids, count)], each run's segments, each run's budget, and how many of ``records`` (every
    recorded one if None) the ledger has never seen."""
    if records is None:
        rows = db.execute("SELECT record_id, run_id FROM membership").fetchall()
        ids = {r[0] for r in db.execute("SELECT id FROM records")}
        unseen = 0
    else:
        _stage(db, records)
        ids = {r[0] for r in db.execute("SELECT r.id FROM records r JOIN staged s ON r.sha256 = s.sha256")}
        unseen = len(set(records)) - len(ids)
        rows = db.execute("SELECT m.record_id, m.run_id FROM membership m JOIN records r ON m.record_id = r.id "
                          "JOIN staged s ON r.sha256 = s.sha256").fetchall()
    legacy = {r[0] for r in db.execute("SELECT id FROM runs WHERE legacy=1")}
    segments: dict[int, list[Segment]] = defaultdict(list)
    for run_id, *seg in db.execute("SELECT run_id, noise_multiplier, sample_rate, steps FROM spends ORDER BY id"):
        segments[run_id].append(Segment(*seg))
    budgets = dict(db.execute("SELECT id, budget FROM runs"))
    runs_of: dict[int, set[int]] = defaultdict(set)
    for record_id, run_id in rows:
        runs_of[record_id].add(run_id)
    signatures = Counter(tuple(sorted(runs_of[i] | legacy)) for i in ids)
    if unseen:
        signatures[tuple(sorted(legacy))] += unseen
    return sorted(signatures.items(), key=lambda kv: kv[1]), segments, budgets, unseen


def _budgets(db: sqlite3.Connection, records: Sequence[str], budget: float | None, delta: float) -> RecordBudgets | None:
    groups, segments, budgets, _ = _groups(db, records)
    out = []
    for signature, count in groups:
        limits = [b for b in (budget, *(budgets[r] for r in signature)) if b is not None]
        if limits:
            out.append(BudgetGroup(count, min(limits), tuple(s for r in signature for s in segments[r])))
    return RecordBudgets(delta, tuple(out)) if out else None


def _stage(db: sqlite3.Connection, records: Iterable[str]) -> None:
    """Put ``records`` in the temporary table ``staged`` for joins (a set of 100k hashes is one statement)."""
    db.execute("CREATE TEMP TABLE IF NOT EXISTS staged (sha256 TEXT PRIMARY KEY)")
    db.execute("DELETE FROM staged")
    db.executemany("INSERT OR IGNORE INTO staged VALUES (?)", ((r,) for r in records))


def _upgrade_to_3(db: sqlite3.Connection) -> None:
    """Schema 1/2 -> 3. Old runs have no record identities: they become legacy runs that count for
    every record, with their dataset's budget; their spends keep their run ids. The ledger's delta is
    the old datasets' delta (refused if they differ: no single delta would state them all)."""
    deltas = {r[0] for r in db.execute("SELECT delta FROM datasets")}
    if len(deltas) > 1:
        raise ValueError(f"this ledger (schema 1/2) holds datasets at several deltas {sorted(deltas)}; the per-record "
                         "ledger states every record at one delta: keep it as an archive and start a new ledger")
    columns = {r[1] for r in db.execute("PRAGMA table_info(runs)")}
    old = db.execute("SELECT r.id, r.created, r.name, r.settings, d.budget, d.description"
                     + (", r.uid" if "uid" in columns else ", NULL")
                     + " FROM runs r LEFT JOIN datasets d ON r.fingerprint = d.fingerprint").fetchall()
    db.execute("DROP TABLE runs")
    db.execute("DROP TABLE datasets")
    db.execute("DROP TABLE IF EXISTS file_hashes")  # hashes keyed by size and mtime: not trusted any more
    for statement in _TABLES.split(";"):
        if statement.strip():
            db.execute(statement)
    for rid, created, name, settings, budget, description, uid in old:
        db.execute("INSERT INTO runs (id, uid, dataset_id, created, name, settings, budget, legacy) "
                   "VALUES (?, ?, NULL, ?, ?, ?, ?, 1)",
                   (rid, uid or str(uuid.uuid4()), created, f"{name} ({description})", settings, budget))
    if deltas:
        db.execute("INSERT OR REPLACE INTO meta VALUES ('delta', ?)", (repr(float(deltas.pop())),))
    db.execute("UPDATE meta SET value=? WHERE key='schema'", (SCHEMA,))
