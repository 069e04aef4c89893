"""The ``dp`` entry of checkpoints: every file gets it, other contents are kept, and the work of
writing it is done once per distinct file."""

from __future__ import annotations

import pickle

import pytest
import torch

from ultralytics_dp.integration import checkpoint
from ultralytics_dp.integration.checkpoint import read_dp_entry, write_dp_entry

ENTRY = {"epsilon": 1.5, "steps": 7, "accountant_state": {"history": [{"noise_multiplier": 1.0, "steps": 7}]}}


def test_every_checkpoint_gets_the_entry_and_identical_files_are_serialised_once(tmp_path, monkeypatch):
    weights = torch.arange(6.0)
    torch.save({"ema": weights, "epoch": 0}, tmp_path / "last.pt")
    (tmp_path / "best.pt").write_bytes((tmp_path / "last.pt").read_bytes())  # as Ultralytics writes both
    torch.save({"ema": weights * 2, "epoch": 3}, tmp_path / "epoch3.pt")
    torch.save({"ema": weights, "dp": ENTRY}, tmp_path / "stated.pt")
    stated_inode = (tmp_path / "stated.pt").stat().st_ino
    loads = []
    real_load = torch.load
    monkeypatch.setattr(checkpoint.torch, "load", lambda *a, **k: loads.append(1) or real_load(*a, **k))

    write_dp_entry([tmp_path / n for n in ("last.pt", "best.pt", "epoch3.pt", "stated.pt")], ENTRY)

    assert len(loads) == 3  # last.pt and best.pt had one content
    assert (tmp_path / "stated.pt").stat().st_ino == stated_inode  # already stated the entry: not rewritten
    monkeypatch.setattr(checkpoint.torch, "load", real_load)
    for name, ema, epoch in (("last.pt", weights, 0), ("best.pt", weights, 0), ("epoch3.pt", weights * 2, 3)):
        ckpt = torch.load(tmp_path / name, weights_only=False)
        assert ckpt["dp"] == ENTRY and torch.equal(ckpt["ema"], ema) and ckpt["epoch"] == epoch
        assert read_dp_entry(tmp_path / name) == ENTRY
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("older", [
    {**ENTRY, "steps": 3},
    {**ENTRY, "steps": 7.0},  # == ENTRY, as is the next: they were left in place (found in review)
    {**ENTRY, "accountant_state": {"history": [{"noise_multiplier": True, "steps": 7}]}},
])
def test_a_checkpoint_with_another_entry_gets_this_one(tmp_path, older):
    torch.save({"ema": torch.ones(2), "dp": older}, tmp_path / "last.pt")
    write_dp_entry([tmp_path / "last.pt"], ENTRY)
    assert pickle.dumps(read_dp_entry(tmp_path / "last.pt")) == pickle.dumps(ENTRY)


class _Payload:
    """Pickles as a call of ``exec`` that writes ``marker``: what a hostile checkpoint can carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


REPORTED = {**ENTRY, "settings": {"delta": 1e-5, "max_grad_norm": 1.0}, "privacy_unit": "image",
            "noise_multiplier": 1.1, "sample_rate": 0.01, "accountant": "prv"}


def hostile_checkpoint(path, marker, dp=REPORTED):
    """A checkpoint whose pickle runs code when unpickled, with a ``dp`` entry and training arguments."""
    torch.save({"model": _Payload(marker), "train_args": {"epochs": 3, "data": "x.yaml"}, "dp": dp}, path)
    return path


def test_reading_a_checkpoints_entries_runs_no_code_from_it(tmp_path):
    from ultralytics_dp.cli import main

    marker = tmp_path / "ran"
    path = hostile_checkpoint(tmp_path / "last.pt", marker)
    torch.load(path, map_location="cpu", weights_only=False)  # the payload is live: a plain load runs it
    assert marker.exists()
    marker.unlink()

    assert read_dp_entry(path) == REPORTED
    assert checkpoint.read_entries(path) == {"dp": REPORTED, "train_args": {"epochs": 3, "data": "x.yaml"}}
    assert main(["report", str(path)]) == 0
    assert not marker.exists()


def test_a_dp_entry_that_is_not_plain_data_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"
    path = hostile_checkpoint(tmp_path / "last.pt", tmp_path / "unused", dp={**ENTRY, "epsilon": _Payload(marker)})
    with pytest.raises(ValueError, match="not plain data"):
        read_dp_entry(path)
    assert not marker.exists()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a checkpoint"):
        read_dp_entry(tmp_path / "junk.pt")


def _zip_pickle(path, pickled):
    """A torch-style zip checkpoint whose data.pkl is the hand-written ``pickled`` bytes."""
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
    return path


def test_a_dp_entry_disguised_as_a_dict_or_blown_up_by_sharing_is_refused_quickly(tmp_path):
    """A pickle can hand an OrderedDict instance its own ``items`` (so a method-based check sees it
    empty) and hide placeholders in it; and 60 levels of a tuple holding the level below twice are
    2^60 paths for a naive walk. Both are refused at once, in one line."""
    import time

    ordered_dict = b"\x8c\x0bcollections\x8c\x0bOrderedDict\x93"
    disguised = (b"\x80\x04}(\x8c\x02dp" + ordered_dict + b")R"
                 b"(\x8c\x08settings\x8c\x02os\x8c\x06system\x93)R\x8c\x05extra\x8c\x02os\x8c\x06system\x93)Ru"
                 b"}\x8c\x05items" + ordered_dict + b"sbu.")
    with pytest.raises(ValueError, match="not plain data"):
        read_dp_entry(_zip_pickle(tmp_path / "disguised.pt", disguised))
    shared = b"\x80\x04}\x8c\x02dpN\x94" + b"0"
    for level in range(60):
        shared += b"h" + bytes([level]) + b"h" + bytes([level]) + b"\x86\x94" + (b"0" if level < 59 else b"")
    shared += b"s."
    start = time.perf_counter()
    entry = checkpoint.read_entries(_zip_pickle(tmp_path / "shared.pt", shared))["dp"]
    assert time.perf_counter() - start < 5 and type(entry) is tuple  # plain, each object visited once


def test_a_run_with_persons_resumes_only_with_its_ledger(tmp_path):
    """Only the ledger can check that a resumed run's persons are those it started with: a run with
    persons trained with ledger=False cannot be resumed with persons (and the message says so,
    rather than sending the user to a ledger the run never had)."""
    from ultralytics_dp.config import DPConfig
    from ultralytics_dp.integration.checkpoint import resumed_entry

    settings = DPConfig(epsilon=3, privacy_unit="person", persons="p.csv", ledger=False)
    entry = {**ENTRY, "settings": settings.released(), "run_id": None}
    torch.save({"ema": torch.ones(2), "dp": entry}, tmp_path / "last.pt")
    for with_ledger in (False, True):
        with pytest.raises(ValueError, match="cannot be resumed with persons: start a new run"):
            resumed_entry(tmp_path / "last.pt", settings, with_ledger=with_ledger)


def test_a_run_that_states_each_persons_epsilon_resumes_only_with_persons(tmp_path):
    """A per-image run given persons= states the largest person's epsilon; resumed without the
    file it would silently stop stating it (found by a review)."""
    from ultralytics_dp.config import DPConfig
    from ultralytics_dp.integration.checkpoint import resumed_entry

    settings = DPConfig(epsilon=3, ledger=False)
    entry = {**ENTRY, "settings": settings.released(), "run_id": None,
             "person_epsilon": {"epsilon": 9.1, "images_per_person": 5}}
    torch.save({"ema": torch.ones(2), "dp": entry}, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="resume it with the same persons file"):
        resumed_entry(tmp_path / "last.pt", settings, with_ledger=False)
