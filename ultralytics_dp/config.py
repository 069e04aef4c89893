"""The DP settings of a private run, each declared once: type, default, validation and help.

``DPConfig`` is a frozen dataclass validated once at construction; runtime state (the accountant,
the calibrated sigma, the ledger record) lives elsewhere. The Python API
(``DifferentialPrivacy(**settings)``), the command line (keys, parsing, help), the checkpoint's
``dp`` entry, the resume check and the ledger's run record all derive from ``SETTINGS``.

Privacy assumptions relied on here: delta is per record (one image, or one person with
``privacy_unit="person"``) and must also be < 1/N for N records (images or persons), which needs
N and is checked when the training set is known (``planning``); ``ledger`` and ``persons`` are
local paths and are never written into a released artifact (``released()`` leaves them out).
This module imports neither torch nor Ultralytics (``yolo-dp --help`` reads it).
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from . import checks

GRAD_METHODS = ("auto", "ghost", "vmap")
PRIVACY_UNITS = ("image", "person")
NORMS = ("auto", "group", "batch")  # see ``norms``
# what a setting added later meant in checkpoints written before it existed (for the resume check)
RECORDED_BEFORE = {"norm": "batch", "privacy_unit": "image"}


def _optional(check: Callable[[str, Any], None]) -> Callable[[str, Any], None]:
    return lambda name, value: None if value is None else check(name, value)


def _ledger(name: str, value: Any) -> None:
    if value is not None and value is not False and not isinstance(value, (str, Path)):
        raise ValueError(f"{name} must be a path, or False for no ledger, got {value!r}")


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _grad_method(name: str, value: Any) -> None:
    if value not in GRAD_METHODS:
        raise ValueError(f"{name} must be one of {', '.join(GRAD_METHODS)}, got {value!r}")


def _privacy_unit(name: str, value: Any) -> None:
    if value not in PRIVACY_UNITS:
        raise ValueError(f"{name} must be one of {', '.join(PRIVACY_UNITS)}, got {value!r}")


def _path(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, (str, Path)):
        raise ValueError(f"{name} must be a path, got {value!r}")


def _norm(name: str, value: Any) -> None:
    if value not in NORMS:
        raise ValueError(f"{name} must be one of {', '.join(NORMS)}, got {value!r}")


def parse_flag(text: str) -> bool:
    """'true'/'false' (any case), '1'/'0'."""
    lowered = text.strip().lower()
    if lowered not in {"true", "false", "1", "0"}:
        raise ValueError(f"expected true or false, got {text!r}")
    return lowered in {"true", "1"}


def parse_ledger(text: str) -> str | bool:
    """A path, or false/0 for no ledger (true/1 for the default one)."""
    lowered = text.strip().lower()
    if lowered in {"false", "0", "none", "off"}:
        return False
    return None if lowered in {"true", "1", ""} else text


def _setting(default: Any, check: Callable[[str, Any], None], parse: Callable[[str], Any], help: str, *,
             metavar: str, resume: bool = True, released: bool = True) -> Any:
    """A dataclass field with its validation, command-line parser and help. ``resume``: must be
    unchanged when a run is resumed; ``released``: written into checkpoints."""
    meta = dict(check=check, parse=parse, help=help, metavar=metavar, resume=resume, released=released)
    return field(default=default, metadata=meta) if default is not MISSING else field(metadata=meta)


@dataclass(frozen=True)
class DPConfig:
    """The DP settings of one private run (validated once; a bad value is a one-line ValueError)."""

    epsilon: float = _setting(MISSING, checks.finite_positive, float, metavar="EPS", help=(
        "the privacy budget (required); training stops before the step that would exceed it"))
    delta: float = _setting(1e-5, checks.delta, float, metavar="D", help=(
        "default 1e-5; must be < 1/N (N = training images, or persons), else an error"))
    privacy_unit: str = _setting("image", _privacy_unit, str, metavar="image|person", help=(
        "what the guarantee protects: one `image` with its labels (default), or one `person` with all of "
        "their images (needs `persons`)"))
    persons: str | Path | None = _setting(None, _path, str, metavar="CSV", released=False, help=(
        "a CSV `image,person` naming the person of every training and validation image (paths absolute or "
        "relative to the dataset root); with privacy_unit=image, the ledger and report also state the "
        "person-level epsilon"))
    max_images_per_person: int = _setting(16, checks.positive_int, int, metavar="K", resume=False, help=(
        "privacy_unit=person: a sampled person brings at most K of their images to a step, chosen at "
        "random (default 16; compute and memory only, the guarantee holds for any K)"))
    max_grad_norm: float = _setting(1.0, checks.finite_positive, float, metavar="C", help=(
        "C, the per-record gradient norm bound (default 1.0)"))
    noise_multiplier: float | None = _setting(None, _optional(checks.finite_positive), float, metavar="SIGMA", help=(
        "sigma; if omitted, calibrated so the planned epochs spend exactly `epsilon`"))
    physical_batch: int = _setting(64, checks.positive_int, int, metavar="B", resume=False, help=(
        "how many images' gradients are computed at once (default 64; memory only, does not change q)"))
    augmult: int = _setting(1, checks.positive_int, int, metavar="K", resume=False, help=(
        "augmentation multiplicity: each sampled image is augmented K times and its gradient is the mean "
        "of its K views, clipped once (same sensitivity; K times the compute)"))
    dataset_budget: float | None = _setting(None, _optional(checks.finite_positive), float, metavar="EPS", help=(
        "lifetime epsilon of every training image (or person), over all runs and dataset versions (needs the "
        "ledger)"))
    ledger: str | Path | bool | None = _setting(None, _ledger, parse_ledger, metavar="PATH", released=False, help=(
        "ledger path (default in the user config dir, or `$ULTRALYTICS_DP_LEDGER`); false for none"))
    secure_mode: bool = _setting(False, _flag, parse_flag, metavar="BOOL", resume=False, help=(
        "noise and sampling from the OS CSPRNG"))
    grad_method: str = _setting("auto", _grad_method, str, metavar="auto|ghost|vmap", resume=False, help=(
        "`auto` (default), `ghost` or `vmap`: how per-image clipping is computed"))
    norm: str = _setting("auto", _norm, str, metavar="auto|group|batch", help=(
        "`auto` (default): GroupNorm in place of BatchNorm when training from scratch, frozen BatchNorm when "
        "fine-tuning pretrained weights; `group` or `batch` to choose"))

    def __post_init__(self) -> None:
        for f in fields(self):
            f.metadata["check"](f.name, getattr(self, f.name))
        if self.privacy_unit == "person" and self.persons is None:
            raise ValueError("privacy_unit=person needs persons= (a CSV `image,person` naming the person of every "
                             "training and validation image)")
        if self.dataset_budget is not None and self.ledger is False:
            raise ValueError("dataset_budget needs the ledger (it sums every run on the dataset); remove "
                             "ledger=False or dataset_budget")

    @classmethod
    def from_strings(cls, pairs: dict[str, str]) -> "DPConfig":
        """From command-line ``key=value`` strings (only DP keys); errors name the key."""
        values = {}
        for key, text in pairs.items():
            parse = SETTINGS[key].metadata["parse"]
            try:
                values[key] = parse(text)
            except ValueError:
                raise ValueError(f"{key} must be {SETTINGS[key].metadata['metavar']}, got {text!r}") from None
        return cls(**values)

    def released(self) -> dict[str, Any]:
        """The settings written into checkpoints and the ledger's run record (no local paths)."""
        return {k: v for k, v in asdict(self).items() if SETTINGS[k].metadata["released"]}

    def changed_on_resume(self, recorded: dict[str, Any]) -> list[str]:
        """'key: old -> new' for each setting a resumed run may not change."""
        out = []
        for key, f in SETTINGS.items():
            if not f.metadata["resume"] or not f.metadata["released"]:
                continue
            old, new = recorded.get(key, RECORDED_BEFORE.get(key)), getattr(self, key)
            numbers = all(isinstance(v, (int, float)) for v in (old, new))
            same = math.isclose(old, new, rel_tol=1e-9) if numbers else old == new
            if not same:
                out.append(f"{key}: {old} -> {new}")
        return out


SETTINGS = {f.name: f for f in fields(DPConfig)}


def check_setting(key: str, value: Any) -> None:
    """The check ``DPConfig`` applies to one setting (for tools that take a few of them)."""
    SETTINGS[key].metadata["check"](key, value)


def defaults() -> dict[str, Any]:
    """Each setting's default (None for the required ``epsilon``)."""
    return {k: None if f.default is MISSING else f.default for k, f in SETTINGS.items()}


def usage() -> str:
    """``key=METAVAR`` for every setting, the required one first (for the command-line help)."""
    return " ".join(f"{k}={f.metadata['metavar']}" if f.default is MISSING else f"[{k}={f.metadata['metavar']}]"
                    for k, f in SETTINGS.items())
