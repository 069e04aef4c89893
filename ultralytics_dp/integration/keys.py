"""The DP keys in Ultralytics' configuration: which Ultralytics is supported, and whether the keys
are on in this process.

The keys (``config.SETTINGS``) join Ultralytics' default configuration unset (None), so ``yolo``
and ``get_cfg`` accept ``epsilon=8``. Fail closed: they go in only for the supported Ultralytics
version, and are withdrawn (with a warning saying why) if the trainer cannot be patched, so that
Ultralytics then rejects ``epsilon=`` as an unknown key rather than training without DP.
"""

from __future__ import annotations

from types import ModuleType

from ..config import SETTINGS

ULTRALYTICS_VERSION = "8.4.190"  # the version pinned in pyproject.toml (a test checks they agree)
off_reasons: list[str] = []  # why the keys are not (or no longer) accepted in this process


def active() -> bool:
    """Whether the stock command and ``YOLO.train`` accept the DP keys in this process."""
    import ultralytics.cfg as cfg

    return all(key in cfg.DEFAULT_CFG_DICT for key in SETTINGS)


def supported_version() -> bool:
    """Whether the imported Ultralytics is the supported one (else a warning, and the keys stay off)."""
    import ultralytics

    if ultralytics.__version__ == ULTRALYTICS_VERSION:
        return True
    _warn(f"this version supports Ultralytics {ULTRALYTICS_VERSION}, found {ultralytics.__version__}")
    return False


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
    from ultralytics.utils import LOGGER

    off_reasons.append(reason)
    LOGGER.warning(f"ultralytics-dp: the DP keys are off ({reason}); `epsilon=` is rejected as an unknown key")
