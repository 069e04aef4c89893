"""Checks of the numbers every layer takes (stdlib only): one message for each kind of bad value.

The settings (``config``), the mechanism, the accountant and the planner all check the same
things (a finite positive number, a probability, delta against N); each check lives here once.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any


def finite_positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    """A real number (not a bool), finite and > 0 (>= 0 with ``allow_zero``)."""
    number = isinstance(value, Real) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def positive_int(name: str, value: Any, *, allow_zero: bool = False) -> None:
    """An integer (not a bool), >= 1 (>= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be an integer >= {0 if allow_zero else 1}, got {value!r}")


def sample_rate(name: str, value: Any) -> None:
    """A Poisson sampling rate q in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")


def delta(name: str, value: Any, num_samples: int | None = None) -> None:
    """delta in (0, 1) and, once the number of records N is known, < 1/N: a delta of 1/N allows
    releasing one whole record."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value < 1:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    if num_samples is not None and value >= 1 / num_samples:
        raise ValueError(f"{name}={value:g} must be < 1/N = {1 / num_samples:.3g} for N={num_samples} training "
                         f"records (a delta of 1/N allows leaking one whole record); use {name} <= "
                         f"{0.1 / num_samples:.1g}")
