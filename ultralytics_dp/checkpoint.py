"""The ``dp`` entry of a checkpoint: the guarantee a released model carries.

Privacy assumptions relied on here: everything in the entry is public (the DP settings without
local paths, N, q, sigma, the steps and the accountant's segments, the epsilon they give, a random
run id); nothing in it is computed from the training data except through the number of steps,
which the budget fixes. A checkpoint states every step taken before it was written.
"""

from __future__ import annotations

import io
import pickle
import time
from pathlib import Path
from typing import Any, Iterable

import torch


def write_dp_entry(paths: Iterable[str | Path], entry: dict[str, Any]) -> None:
    """Set ``entry`` as the ``dp`` entry of each checkpoint in ``paths`` (atomic replace each).

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
    """The ``dp`` entry of a checkpoint; a one-line error if it was not trained privately."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a file that is not a checkpoint: torch raises pickle and zip errors of every kind
        raise ValueError(f"{path} is not a checkpoint ({type(err).__name__}: {err})") from None
    entry = ckpt.get("dp") if isinstance(ckpt, dict) else None
    if not entry:
        raise ValueError(f"{path} has no 'dp' entry: it was not trained with ultralytics-dp")
    return entry


def summary_line(entry: dict[str, Any]) -> str:
    """'(eps, delta)-DP per image: ...' for logs and ``yolo-dp report``."""
    settings = entry["settings"]
    return (f"({entry['epsilon']:.4f}, {settings['delta']:g})-DP per {entry['privacy_unit']}: {entry['steps']} steps, "
            f"noise_multiplier={entry['noise_multiplier']:.4f}, q={entry['sample_rate']:.5g}, "
            f"C={settings['max_grad_norm']:g}, accountant={entry['accountant']}"
            + (", stopped by budget" if entry.get("stopped_by_budget") else ""))
