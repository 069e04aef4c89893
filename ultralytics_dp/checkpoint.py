"""The ``dp`` entry of a checkpoint: the guarantee a released model carries.

Privacy assumptions relied on here: everything in the entry is public (the DP settings without
local paths, N, q, sigma, the steps and the accountant's segments, the epsilon they give, a random
run id); nothing in it is computed from the training data except through the number of steps,
which the budget fixes. A checkpoint states every step taken before it was written.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch


def write_dp_entry(path: str | Path, entry: dict[str, Any]) -> None:
    """Set ``entry`` as the ``dp`` entry of the checkpoint at ``path`` (atomic replace)."""
    path = Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    ckpt["dp"] = entry
    tmp = path.with_suffix(f".{time.time_ns()}.tmp")
    torch.save(ckpt, tmp)
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
