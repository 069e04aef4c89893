"""The ``dp`` entry of a checkpoint: the guarantee a released model carries.

Privacy assumptions relied on here: everything in the entry is public (the DP settings without
local paths, N, q, sigma, the steps and the accountant's segments, the epsilon they give, a random
run id); nothing in it is computed from the training data except through the number of steps,
which the budget fixes. A checkpoint states every step taken before it was written.

Security assumption relied on here: a checkpoint read to learn its guarantee or its training
arguments (``yolo-dp report``, resuming, planning) may come from anyone, and unpickling it with
``torch.load(weights_only=False)`` would run whatever code its pickle names. ``read_entries``
never does: it reads the pickle with an unpickler that resolves no class or function at all
(each one becomes an inert placeholder, tensor storages are not read), so only plain data (dicts,
lists, strings, numbers) comes out, and the ``dp`` entry must consist of exactly those types
(checked without calling any method of the objects, each visited once, with bounded size). Loading the model
itself is Ultralytics' job, under its own safe-load setting.
"""

from __future__ import annotations

import io
import pickle
import time
import zipfile
from pathlib import Path
from typing import Any, Iterable

import torch

from ..accounting.planning import check_resume
from ..config import DPConfig

MAX_PICKLE_BYTES = 64 << 20  # a checkpoint's pickle without its tensors is kilobytes to a few megabytes
MAX_NODES = 1_000_000  # containers and values _plain may visit in one entry


class Opaque:
    """What ``read_entries`` puts where a checkpoint's pickle names any other class or function:
    it accepts whatever pickle hands it and runs nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "Opaque":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _InertUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:  # every class and function, even OrderedDict
        return Opaque

    def persistent_load(self, pid: Any) -> None:  # torch's tensor storages: never read
        return None


def _plain(value: Any) -> bool:
    """Whether ``value`` is plain data: exactly dict, list, tuple, str, bytes, bool, int, float or
    None, all the way down (not subclasses: a pickle can give an instance its own methods). Each
    object is visited once and at most ``MAX_NODES`` of them (a pickle can share one object many
    times, or hold itself)."""
    plain = (str, bytes, bool, int, float, type(None))
    seen: set[int] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if len(seen) > MAX_NODES:
            return False
        if type(item) is dict:
            stack.extend(dict.keys(item))
            stack.extend(dict.values(item))
        elif type(item) in (list, tuple):
            stack.extend(item)
        elif type(item) not in plain:
            return False
    return True


def read_entries(path: str | Path) -> dict[str, Any]:
    """``{"dp": ..., "train_args": ...}`` of a checkpoint, read without running any code from it
    (see the module's docstring); an entry the file lacks is None. A one-line ValueError if the
    file is not a (zip-format) torch checkpoint or its ``dp`` entry holds anything but plain data."""
    try:
        with zipfile.ZipFile(path) as archive:
            (member,) = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if archive.getinfo(member).file_size > MAX_PICKLE_BYTES:
                raise ValueError(f"its pickle is over {MAX_PICKLE_BYTES >> 20} MiB")
            ckpt = _InertUnpickler(io.BytesIO(archive.read(member))).load()
    except Exception as err:  # zip, pickle and unpacking errors of every kind: not a checkpoint we can read
        raise ValueError(f"{path} is not a checkpoint ({type(err).__name__}: {err})") from None
    if type(ckpt) is not dict:
        raise ValueError(f"{path} is not an Ultralytics checkpoint (its top level is not a dict)")
    entries = {key: dict.get(ckpt, key) for key in ("dp", "train_args")}
    if not _plain(entries["dp"]):
        raise ValueError(f"{path} has a 'dp' entry that is not plain data; refusing to read it")
    args = entries["train_args"]
    if type(args) is dict:  # an argument that is not plain data is dropped, never used
        entries["train_args"] = {k: v for k, v in dict.items(args) if _plain(k) and _plain(v)}
    else:
        entries["train_args"] = None
    return entries


def write_dp_entry(paths: Iterable[str | Path], entry: dict[str, Any]) -> None:
    """Set ``entry`` as the ``dp`` entry of each checkpoint in ``paths`` (atomic replace each).
    The files are the ones this run's trainer has just written, so they are loaded in full.

    Loading and pickling a checkpoint costs ~0.1-0.2 s (a 5 MB detector on CPU), a visible part of a
    short run, so: files with the same bytes (Ultralytics writes last.pt and best.pt from one serialisation) are loaded and
    serialised once, and a file that already carries ``entry`` is left as it is."""
    done: dict[bytes, bytes | None] = {}  # a file's bytes -> its bytes with the entry (None: has it)
    for path in map(Path, paths):
        raw = path.read_bytes()
        if raw not in done:
            ckpt = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False)
            if pickle.dumps(ckpt.get("dp")) == pickle.dumps(entry):  # identical, not merely ==: 1 == 1.0 == True
                done[raw] = None
            else:
                ckpt["dp"] = entry
                buffer = io.BytesIO()
                torch.save(ckpt, buffer)
                done[raw] = buffer.getvalue()
        if done[raw] is not None:
            tmp = path.with_suffix(f".{time.time_ns()}.tmp")
            tmp.write_bytes(done[raw])
            tmp.replace(path)


def read_dp_entry(path: str | Path) -> dict[str, Any]:
    """The ``dp`` entry of a checkpoint (read without running code from it); a one-line error if
    it was not trained privately."""
    entry = read_entries(path)["dp"]
    if not entry:
        raise ValueError(f"{path} has no 'dp' entry: it was not trained with ultralytics-dp")
    return entry


def resumed_entry(path: str | Path, config: DPConfig, *, with_ledger: bool) -> dict[str, Any]:
    """The ``dp`` entry of a checkpoint a private run resumes: it must have one, the DP settings must be
    its own (N and q are checked once the training set is known) and so must the ledger setting."""
    entry = read_entries(path)["dp"]
    if not entry:
        raise ValueError(f"{path} has no 'dp' entry: it was not trained privately, so it cannot resume a private "
                         "run; start a new run instead")
    check_resume(config, entry)
    if entry.get("person_epsilon") and config.persons is None:
        raise ValueError("the run being resumed states each person's epsilon (it was given persons=); resume it with "
                         "the same persons file")
    if config.persons is not None and (not with_ledger or entry.get("run_id") is None):
        raise ValueError("a run with persons resumes only with the ledger it was recorded in (the ledger checks that "
                         "the persons are those it started with); a run trained with ledger=False cannot be resumed "
                         "with persons: start a new run")
    if (entry.get("run_id") is None) == with_ledger:
        raise ValueError("resume must keep the ledger setting of the run: it was trained with "
                         + ("ledger=False; resume with ledger=False" if entry.get("run_id") is None
                            else "the ledger on; resume with the ledger it was recorded in"))
    return entry


def summary_line(entry: dict[str, Any]) -> str:
    """'(eps, delta)-DP per image: ...' for logs and ``yolo-dp report``."""
    settings = entry["settings"]
    return (f"({entry['epsilon']:.4f}, {settings['delta']:g})-DP per {entry['privacy_unit']}: {entry['steps']} steps, "
            f"noise_multiplier={entry['noise_multiplier']:.4f}, q={entry['sample_rate']:.5g}, "
            f"C={settings['max_grad_norm']:g}, accountant={entry['accountant']}"
            + (", stopped by budget" if entry.get("stopped_by_budget") else "")
            + (f"; per person ({person['images_per_person']} images at most): epsilon <= {person['epsilon']:.4f}"
               if (person := entry.get("person_epsilon")) else ""))
