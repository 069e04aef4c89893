"""A write-ahead privacy ledger: every run on a dataset, and the steps each one spent, in SQLite.

Privacy spent is never refunded: the guarantee that matters is the composition over every release
from the same data. The ledger is keyed by a fingerprint of the training set (image bytes and
labels), records each run, and records the steps a run is *about to* take, durably, before it takes
them (``reserve``). A process killed at any moment therefore never leaves the ledger below what
was actually spent; it may be above (a reserved epoch that did not finish), which is conservative.

A run is known outside the ledger only by a random id (UUID4, in its checkpoints): the ledger's
fingerprints are hashes of the private data, which would let anyone holding the data test
membership, so they never leave this file.

All runs on a dataset compose, with the PRV accountant (heterogeneous segments), into one epsilon
at the dataset's delta (the delta of its first run). Writes use ``BEGIN IMMEDIATE`` transactions
so concurrent processes never lose an update.
This module must not import Ultralytics.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from .accounting import PrivacyAccountant, Segment
from .planning import DatasetBudget

SCHEMA = "ultralytics-dp-ledger/2"  # /2 added runs.uid; /1 ledgers are upgraded in place
_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS datasets (
    fingerprint TEXT PRIMARY KEY, delta REAL NOT NULL, num_samples INTEGER NOT NULL,
    budget REAL, created REAL NOT NULL, description TEXT);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, fingerprint TEXT NOT NULL REFERENCES datasets(fingerprint),
    created REAL NOT NULL, name TEXT, settings TEXT NOT NULL, uid TEXT UNIQUE);
CREATE TABLE IF NOT EXISTS spends (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run_id INTEGER NOT NULL REFERENCES runs(id),
    noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL, steps INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS file_hashes (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL);
"""


def default_path() -> Path:
    """``$ULTRALYTICS_DP_LEDGER``, else ``$XDG_CONFIG_HOME/ultralytics_dp/ledger.sqlite``."""
    if os.environ.get("ULTRALYTICS_DP_LEDGER"):
        return Path(os.environ["ULTRALYTICS_DP_LEDGER"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "ultralytics_dp" / "ledger.sqlite"


class Ledger:
    """The SQLite ledger at ``path`` (created if missing, unless ``create=False``; refused if it is
    some other file)."""

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
                if existed and "meta" in tables:
                    row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
                    if row and row[0] == "ultralytics-dp-ledger/1":
                        _upgrade_from_1(db)
                    elif not row or row[0] != SCHEMA:
                        raise ValueError
                for statement in _TABLES.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA,))
        except (sqlite3.DatabaseError, ValueError):
            raise ValueError(
                f"{self.path} is not an ultralytics-dp ledger; point ledger= (or $ULTRALYTICS_DP_LEDGER) at a "
                "ledger file or a path that does not exist yet"
            ) from None

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

    # ------------------------------------------------------------------ fingerprints
    def file_sha256(self, path: str | Path) -> str:
        """SHA-256 of a file's bytes, cached by (path, size, mtime) so re-fingerprinting is cheap."""
        path = Path(path).resolve()
        st = path.stat()
        with self._connect() as db:
            row = db.execute("SELECT size, mtime_ns, sha256 FROM file_hashes WHERE path=?", (str(path),)).fetchone()
        if row and row[0] == st.st_size and row[1] == st.st_mtime_ns:
            return row[2]
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?)",
                       (str(path), st.st_size, st.st_mtime_ns, digest))
        return digest

    def fingerprint(self, records: Iterable[tuple[str | Path, str]]) -> str:
        """Fingerprint of a training set given (image path, label text) per record.

        Order-independent (a set of records), content-based (renaming files changes nothing)."""
        per_record = sorted(
            hashlib.sha256(f"{self.file_sha256(img)}\n{label}".encode()).hexdigest() for img, label in records
        )
        return hashlib.sha256("\n".join(per_record).encode()).hexdigest()

    # ------------------------------------------------------------------ runs and spends
    def register_dataset(self, fingerprint: str, *, delta: float, num_samples: int,
                         budget: float | None = None, description: str = "") -> float:
        """Record the dataset (first run fixes its delta); set or tighten its lifetime budget.
        Returns the dataset's delta."""
        with self._connect() as db:
            db.execute("INSERT OR IGNORE INTO datasets VALUES (?, ?, ?, ?, ?, ?)",
                       (fingerprint, delta, num_samples, budget, time.time(), description))
            if budget is not None:
                db.execute("UPDATE datasets SET budget = CASE WHEN budget IS NULL OR budget > ? THEN ? ELSE budget END"
                           " WHERE fingerprint=?", (budget, budget, fingerprint))
            return db.execute("SELECT delta FROM datasets WHERE fingerprint=?", (fingerprint,)).fetchone()[0]

    def start_run(self, fingerprint: str, settings: dict[str, Any], name: str = "") -> str:
        """Record a run on the dataset; returns its random id, the only link a checkpoint may carry."""
        uid = str(uuid.uuid4())
        with self._connect() as db:
            db.execute("INSERT INTO runs (fingerprint, created, name, settings, uid) VALUES (?, ?, ?, ?, ?)",
                       (fingerprint, time.time(), name, json.dumps(settings, sort_keys=True), uid))
        return uid

    def run(self, uid: str | None) -> dict[str, Any] | None:
        """The run with random id ``uid`` (its dataset fingerprint and settings), or None."""
        with self._connect() as db:
            row = db.execute("SELECT fingerprint, settings FROM runs WHERE uid=?", (uid,)).fetchone()
        return None if row is None else {"fingerprint": row[0], "settings": json.loads(row[1])}

    def reserve(self, uid: str, *, steps: int, noise_multiplier: float, sample_rate: float) -> None:
        """Durably record ``steps`` steps of (sigma, q) for run ``uid`` before they are taken."""
        if steps <= 0:
            return
        with self._connect() as db:
            row = db.execute("SELECT id FROM runs WHERE uid=?", (uid,)).fetchone()
            if row is None:
                raise ValueError(f"no run {uid} in ledger {self.path}")
            db.execute("INSERT INTO spends (run_id, noise_multiplier, sample_rate, steps, created) "
                       "VALUES (?, ?, ?, ?, ?)", (row[0], noise_multiplier, sample_rate, steps, time.time()))

    def segments(self, fingerprint: str) -> list[Segment]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT s.noise_multiplier, s.sample_rate, s.steps FROM spends s JOIN runs r ON s.run_id = r.id "
                "WHERE r.fingerprint=? ORDER BY s.id", (fingerprint,)).fetchall()
        return [Segment(*row) for row in rows]

    def dataset(self, fingerprint: str) -> dict[str, Any] | None:
        with self._connect() as db:
            row = db.execute("SELECT delta, num_samples, budget, description FROM datasets WHERE fingerprint=?",
                             (fingerprint,)).fetchone()
        return None if row is None else dict(zip(("delta", "num_samples", "budget", "description"), row))

    def budget(self, fingerprint: str, budget: float | None, delta: float) -> DatasetBudget | None:
        """The dataset's lifetime budget for planning: the tighter of ``budget`` and the recorded one,
        at the dataset's delta (its first run's; ``delta`` for a new dataset). None if it has none."""
        known = self.dataset(fingerprint) or {}
        budgets = [b for b in (budget, known.get("budget")) if b is not None]
        if not budgets:
            return None
        dataset_delta = known.get("delta", delta)
        return DatasetBudget(min(budgets), dataset_delta,
                             lambda extra: self.epsilon(fingerprint, extra, delta=dataset_delta))

    def epsilon(self, fingerprint: str, extra: Iterable[Segment] = (), delta: float | None = None) -> float:
        """Epsilon of every run recorded on the dataset plus ``extra`` planned segments, at ``delta``
        (default: the dataset's delta, fixed by its first run)."""
        if delta is None:
            info = self.dataset(fingerprint)
            if info is None:
                raise ValueError(f"no dataset with fingerprint {fingerprint[:12]}... in ledger {self.path}")
            delta = info["delta"]
        accountant = PrivacyAccountant()
        for seg in [*self.segments(fingerprint), *extra]:
            accountant.step(noise_multiplier=seg.noise_multiplier, sample_rate=seg.sample_rate, steps=seg.steps)
        return accountant.get_epsilon(delta)

    def summary(self) -> list[dict[str, Any]]:
        """Every dataset with its runs, steps and total epsilon (for ``yolo-dp ledger``)."""
        with self._connect() as db:
            datasets = db.execute("SELECT fingerprint, delta, num_samples, budget, description FROM datasets "
                                  "ORDER BY created").fetchall()
            runs = db.execute("SELECT r.id, r.uid, r.fingerprint, r.name, r.settings, COALESCE(SUM(s.steps), 0) "
                              "FROM runs r LEFT JOIN spends s ON s.run_id = r.id GROUP BY r.id ORDER BY r.id").fetchall()
        out = []
        for fp, delta, n, budget, description in datasets:
            out.append({
                "fingerprint": fp, "description": description, "num_samples": n, "delta": delta, "budget": budget,
                "epsilon": self.epsilon(fp),
                "runs": [{"id": rid, "run_id": uid, "name": name, "steps": steps, **json.loads(settings)}
                         for rid, uid, rfp, name, settings, steps in runs if rfp == fp],
            })
        return out


def _upgrade_from_1(db: sqlite3.Connection) -> None:
    """Schema 1 -> 2: give every run a random id (its checkpoints carried the integer id, which stays
    in ``runs.id``; resuming such a checkpoint is refused, as it names no random id)."""
    db.execute("ALTER TABLE runs ADD COLUMN uid TEXT")
    for (rid,) in db.execute("SELECT id FROM runs").fetchall():
        db.execute("UPDATE runs SET uid=? WHERE id=?", (str(uuid.uuid4()), rid))
    db.execute("CREATE UNIQUE INDEX IF NOT EXISTS runs_uid ON runs(uid)")
    db.execute("UPDATE meta SET value=? WHERE key='schema'", (SCHEMA,))
