"""The DP keys in Ultralytics' configuration: which Ultralytics releases are supported (a tested
window), and whether the keys are on in this process.

The keys (``config.SETTINGS``) join Ultralytics' default configuration unset (None), so ``yolo``
and ``get_cfg`` accept ``epsilon=8``. Fail closed: they go in only for an Ultralytics release in
the window, and are withdrawn (with a warning saying why) if the trainer cannot be patched, so that
Ultralytics then rejects ``epsilon=`` as an unknown key rather than training without DP.
"""

from __future__ import annotations

import sys
from types import ModuleType

from ..config import SETTINGS

# the Ultralytics releases this package is tested with (benchmarks/COMPAT.md), oldest and newest:
# pyproject.toml states the same window (a test checks they agree)
ULTRALYTICS_WINDOW = ("8.4.187", "8.4.190")
off_reasons: list[str] = []  # why the keys are not (or no longer) accepted in this process


def active() -> bool:
    """Whether the stock command and ``YOLO.train`` accept the DP keys in this process."""
    import ultralytics.cfg as cfg

    return all(key in cfg.DEFAULT_CFG_DICT for key in SETTINGS)


def supported_version() -> bool:
    """Whether the imported Ultralytics is in the tested window (else a warning, and the keys stay off)."""
    import ultralytics

    if in_window(ultralytics.__version__):
        return True
    low, high = ULTRALYTICS_WINDOW
    _warn(f"this version supports Ultralytics {low} to {high}, found {ultralytics.__version__}")
    return False


def in_window(version: str) -> bool:
    """Whether a release number (``major.minor.patch``; anything else is outside) is in the window."""
    def parts(text: str) -> tuple[int, ...] | None:
        pieces = text.split(".")
        return tuple(int(p) for p in pieces) if len(pieces) == 3 and all(p.isdigit() for p in pieces) else None

    found, (low, high) = parts(version), map(parts, ULTRALYTICS_WINDOW)
    return found is not None and low <= found <= high


def add(cfg: ModuleType) -> None:
    """The DP keys, unset, in Ultralytics' default configuration."""
    for key in SETTINGS:
        cfg.DEFAULT_CFG_DICT[key] = None  # the same dict as ultralytics.utils' (DEFAULT_CFG_KEYS is its view)
        setattr(cfg.DEFAULT_CFG, key, None)


def withdraw(cfg: ModuleType, reason: str) -> None:
    """The DP keys out of Ultralytics' configuration again, with a warning naming ``reason``."""
    for key in SETTINGS:
        cfg.DEFAULT_CFG_DICT.pop(key, None)
        cfg.DEFAULT_CFG.__dict__.pop(key, None)
    _warn(reason)


def _warn(reason: str) -> None:
    """Straight to stderr: Ultralytics' logger (silenced by YOLO_VERBOSE=False) and Python's warnings
    (PYTHONWARNINGS=ignore) could both hide why a private run is refused."""
    off_reasons.append(reason)
    print(f"WARNING ultralytics-dp: the DP keys are off ({reason}); `epsilon=` is rejected as an unknown key",
          file=sys.stderr)
