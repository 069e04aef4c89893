"""A private run in the ledger: the records it trains on, and its record before its first step.

Privacy assumptions relied on here: a record is named as the ledger names it (``accounting.ledger``)
and a data version by its records and labels; persons go to the ledger as their ids, which it
keeps only as keyed hashes; the run is recorded before its first step, and each
epoch's steps are reserved before the first of them is taken (write-ahead, ``adapter``). Only the
random run id links a checkpoint to the ledger.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..accounting.ledger import Ledger, version_fingerprint
from ..accounting.planning import Plan
from ..accounting.records import Record
from ..config import DPConfig
from .persons import Persons
from .training_set import dataset_records


def fingerprint_of(ledger: Ledger, dataset: Any, records: Sequence[Record], resume: dict[str, Any] | None,
                   persons: Persons | None = None) -> str:
    """The training set's version fingerprint (its ``records``, in the dataset's order, and their
    labels); a resumed run must train on the data version it was recorded with, and on the same
    persons (a person split or merged halfway would not be one record over the whole run)."""
    fingerprint = version_fingerprint(records, [label for _, label in dataset_records(dataset)])
    if resume is not None:
        run_id = resume["run_id"]
        recorded = ledger.run(run_id)
        if recorded is None:
            raise ValueError(f"the run being resumed (run_id {run_id}) is not in the ledger {ledger.path}; "
                             "resume with ledger= set to the ledger it was recorded in")
        if recorded["fingerprint"] != fingerprint:
            raise ValueError("resume must train on the training data of the run it continues, and this data "
                             "differs (by the ledger's identity of the data); start a new run instead")
        if not ledger.same_persons(run_id, records, ledger_persons(persons)):
            raise ValueError("resume must train on the persons of the run it continues, and the persons file gives "
                             "other persons (or none, or the run had none); resume with the persons file it started with")
    return fingerprint


def ledger_persons(persons: Persons | None) -> list[tuple[str, tuple[int, ...]]] | None:
    """The training set's persons as the ledger takes them: (id, their images' positions)."""
    return None if persons is None else list(zip(persons.ids, persons.images))


def record_run(ledger: Ledger, records: Sequence[Record], fingerprint: str, *, config: DPConfig, plan: Plan,
               name: str, description: str, persons: Persons | None) -> str:
    """Record a new run, its records and its persons if known (before its first step); returns its
    random run id."""
    summary = {"settings": config.released(), "noise_multiplier": plan.noise_multiplier,
               "sample_rate": plan.sample_rate, "num_samples": plan.num_samples}
    return ledger.start_run(records, fingerprint=fingerprint, settings=summary, delta=config.delta,
                            budget=config.dataset_budget, name=name, description=description,
                            persons=ledger_persons(persons), unit=config.privacy_unit)
