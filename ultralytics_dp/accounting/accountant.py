"""The epsilon a private run releases: two independent upper bounds that must agree, and the larger.

Two accountants compose the same Poisson-subsampled Gaussian steps (``Segment``s):

* ``pld``: the package's own privacy loss distribution, discretised so that it can only overstate
  delta (a bound at any grid, within about 0.2% of the truth; fast, so every search steers on it;
  its allowance for FFT rounding is measured, not proved);
* ``prv``: Microsoft's ``prv-accountant``, whose grid error is proved, with lower and upper bounds
  0.5% of epsilon either side of its estimate.

The released epsilon (``release``) is the larger of the two upper bounds: the figure of the
stopping rule, of ``DifferentialPrivacy.epsilon``, of checkpoints, of the ledger and of
``yolo-dp privacy``. Disagreement is a bug detector: if prv-accountant's *lower* bound is above
the own upper bound (the own one would understate), or the own bound is above prv-accountant's
upper bound by more than its stated looseness (``PLD_LOOSENESS``), nothing is released:
``AccountantsDisagree`` names both values and the segments. Where prv-accountant finds no finite
bound (a loss too large for its domain: a person's steps at sigma / k, ``group``), the released
epsilon is infinite: no guarantee is claimed. Searches (calibrating sigma, the step
budget, what a record's budget allows) steer on ``pld`` and are settled on the released figure.

Privacy assumptions relied on here: those of ``pld`` and ``prv`` (every step a Poisson-subsampled
Gaussian mechanism with sensitivity C, the caller's sigma, q and steps true); delta is the
caller's. This module must not import torch or Ultralytics.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Callable, Sequence

from . import pld, prv
from .pld import Segment

NAME = f"max({pld.NAME}, {prv.NAME})"  # what the dp entry's "accountant" says computed "epsilon"
STATE = "segments"  # a PrivacyAccountant's state: the steps themselves, which any accountant can compose
LEGACY_STATES = ("prv",)  # what checkpoints written before both accountants named the same state
PLD_LOOSENESS = (0.01, 1e-4)  # (relative, absolute): how far above the truth ``pld`` may land, with margin
SEARCHES = 8  # settling a search on the released figure: at most this many corrections


class AccountantsDisagree(ValueError):
    """The two accountants disagree beyond their stated errors: no epsilon is released."""


@dataclass(frozen=True)
class Released:
    """A released epsilon and each accountant's upper bound, keyed by accountant name."""

    epsilon: float
    by_accountant: dict[str, float]


def release(segments: Sequence[Segment], delta: float) -> Released:
    """The released epsilon of composing ``segments`` at ``delta`` (see the module's docstring)."""
    return _release(pld.merge(segments), float(delta))


@lru_cache(maxsize=512)
def _release(segments: tuple[Segment, ...], delta: float) -> Released:
    own = pld.compose(segments, delta)
    if not segments:
        return Released(0.0, {pld.NAME: 0.0, prv.NAME: 0.0})
    lower, _, upper = prv.epsilon_bounds(segments, delta, own)
    if not math.isfinite(upper):  # prv-accountant found no finite bound (its domain cannot hold the loss)
        return Released(math.inf, {pld.NAME: own, prv.NAME: upper})
    relative, absolute = PLD_LOOSENESS
    if lower > own or own > upper + relative * upper + absolute:
        steps = ", ".join(f"(sigma={s.noise_multiplier:g}, q={s.sample_rate:g}, steps={s.steps}"
                          + (f", images={s.images})" if s.images > 1 else ")") for s in segments)
        raise AccountantsDisagree(
            f"the accountants disagree on {steps} at delta={delta:g}: {pld.NAME} gives epsilon <= {own:.6g}, "
            f"{prv.NAME} {lower:.6g} <= epsilon <= {upper:.6g}; refusing to release an epsilon (a bug in one of "
            "them: please report it)")
    return Released(max(own, upper), {pld.NAME: own, prv.NAME: upper})


def epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> Released:
    """The released epsilon of ``steps`` steps of (sigma, q) at ``delta``."""
    return release([Segment(noise_multiplier, sample_rate, steps)], delta)


def noise_multiplier(*, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """A sigma (5 significant digits) whose released epsilon after ``steps`` steps is <= target:
    calibrated on ``pld`` for a target lowered by prv-accountant's half-width (its upper bound sits
    about that far above the truth, so the released figure then usually fits at once: one call of
    the slower accountant), then raised while the released figure exceeds the target (epsilon
    falls about as 1/sigma)."""
    aim = target_epsilon * (1 - 1.5 * prv.REL_ERROR)
    sigma = pld.get_noise_multiplier(target_epsilon=aim, delta=delta, sample_rate=sample_rate, steps=steps)
    for _ in range(SEARCHES):
        spent = epsilon(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta).epsilon
        if spent <= target_epsilon:
            return sigma
        sigma = pld.round_up_sigma(sigma * (spent / target_epsilon) * (1 + 1e-4))
    raise ValueError(f"could not calibrate a noise multiplier for epsilon={target_epsilon:g} over {steps} steps at "
                     f"q={sample_rate:g}, delta={delta:g}")


def max_steps(*, target_epsilon: float, delta: float, noise_multiplier: float, sample_rate: float,
              limit: int | None = None) -> int:
    """Largest T (at most ``limit``) whose released epsilon is <= target, found on ``pld`` and settled
    on the released figure (0 if one step already exceeds it). See ``pld.max_steps`` for the search."""
    def fits(steps: int) -> bool:
        return epsilon(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps,
                       delta=delta).epsilon <= target_epsilon

    return settle(lambda aim, cap: pld.max_steps(target_epsilon=aim, delta=delta, noise_multiplier=noise_multiplier,
                                                 sample_rate=sample_rate, limit=cap), fits, target_epsilon, limit)


def settle(search: Callable[[float, int | None], int], fits: Callable[[int], bool], target: float,
           limit: int | None) -> int:
    """The largest step count that ``fits`` on the released figure: ``search(aim, cap)`` finds it on
    ``pld`` for an epsilon ``aim``; while its answer does not fit, the aim is lowered by the
    accountants' measured gap (at most ``SEARCHES`` times; then 0: fail closed)."""
    aim, cap = target, limit
    for _ in range(SEARCHES):
        steps = search(aim, cap)
        if steps == 0 or fits(steps):
            return steps
        aim *= 1 - max(prv.REL_ERROR, 1e-3)
        cap = steps - 1
    return 0


class PrivacyAccountant:
    """The (sigma, q, steps) segments a run took; composes them into the released epsilon.

    Segments with different sigma or q (a resume, a schedule change) compose heterogeneously.
    """

    def __init__(self) -> None:
        self.history: list[Segment] = []

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` more steps of (sigma, q); merged into the last segment if it matches."""
        pld.merge([Segment(noise_multiplier, sample_rate, steps)])  # checks the values
        sigma, q, steps = float(noise_multiplier), float(sample_rate), int(steps)  # plain numbers (JSON state)
        last = self.history[-1] if self.history else None
        if last and last.noise_multiplier == sigma and last.sample_rate == q:
            self.history[-1] = Segment(sigma, q, last.steps + steps)
        elif steps:
            self.history.append(Segment(sigma, q, steps))

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.history)

    def epsilon(self, delta: float) -> Released:
        """The released epsilon of everything recorded, at ``delta``."""
        return release(self.history, delta)

    def state_dict(self) -> dict:
        """Plain, JSON-serialisable state."""
        return {"accountant": STATE, "history": [asdict(s) for s in self.history]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("accountant") not in (STATE, *LEGACY_STATES):
            raise ValueError(f"state is from accountant {state.get('accountant')!r}, expected {STATE!r}")
        history = [Segment(float(s["noise_multiplier"]), float(s["sample_rate"]), int(s["steps"]))
                   for s in state["history"]]
        pld.merge(history)  # checks the values
        self.history = history


def curve_scale(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """released / pld at ``steps`` (>= 1): what a display curve computed on ``pld`` is scaled by so
    that it never shows less than the released figure at its end."""
    released = epsilon(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta)
    own = released.by_accountant[pld.NAME]
    return released.epsilon / own if own > 0 and math.isfinite(own) else 1.0
