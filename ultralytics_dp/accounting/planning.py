"""Planning a private run: N, q, sigma and the step budget, as a pure function of the settings, the
training set's size, a resumed run's state and the ledger's view of the dataset. No trainer.

Privacy assumptions relied on here:

* Poisson sampling at q = expected batch / N for every step (``mechanism.sampling``); the planned
  steps are ``ceil(epochs * N / batch)`` rounded to whole epochs (``pld.plan``).
* delta < 1/N: a delta of 1/N allows leaking one whole record.
* The step budget is the largest T whose released epsilon (``accountant``: the larger of two
  independent upper bounds) is <= the target; a resumed run continues its own accountant, so its
  steps count against the same budget.
* A record's lifetime budget (the smallest ``dataset_budget`` of any run that included it) composes
  every run the ledger recorded on that record with this run's steps, at this run's delta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .. import checks
from ..config import DPConfig
from . import accountant, pld
from .group import person_segment
from .pld import Segment, plan


@dataclass(frozen=True)
class BudgetGroup:
    """Records included by the same recorded runs: how many, their lifetime budget, those runs'
    segments. ``images`` > 0: the records are persons with that many images in a run whose unit is
    the image, whose steps they see as ``group.person_segment`` does; 0: the run's steps as they are."""

    records: int
    budget: float
    segments: tuple[Segment, ...]
    images: int = 0

    def new(self, sigma: float, q: float, steps: int) -> Segment:
        """``steps`` more steps of (sigma, q) as these records see them."""
        segment = Segment(sigma, q, steps)
        return person_segment(segment, self.images) if self.images else segment


@dataclass(frozen=True)
class RecordBudgets:
    """What the ledger knows of this run's records that have a lifetime budget, at ``delta``."""

    delta: float
    groups: tuple[BudgetGroup, ...]

    def over(self, sigma: float, q: float, steps: int) -> tuple[int, float]:
        """How many records ``steps`` more steps of (sigma, q) would take past their budget, and the
        worst released epsilon they would reach ((0, 0.0) if none)."""
        count, worst = 0, 0.0
        for group in self.groups:
            eps = accountant.release([*group.segments, group.new(sigma, q, steps)], self.delta).epsilon
            if eps > group.budget:
                count, worst = count + group.records, max(worst, eps)
        return count, worst

    def steps_within(self, sigma: float, q: float, upper: int) -> int:
        """Largest T <= upper whose addition keeps every record within its budget: a bisection on
        ``pld``, settled on the released figure (``accountant.settle`` scales the budgets down by the
        accountants' gap while the bisection's answer does not fit)."""
        def search(scale: float, cap: int | None) -> int:
            def fits(t: int) -> bool:
                return all(pld.compose([*g.segments, g.new(sigma, q, t)], self.delta) <= g.budget * scale
                           for g in self.groups)

            lo, hi = 0, cap
            if fits(hi):
                return hi
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if fits(mid) else (lo, mid)
            return lo

        return accountant.settle(search, lambda t: self.over(sigma, q, t)[0] == 0, 1.0, upper)


@dataclass(frozen=True)
class Plan:
    """A private run's sampling and budget. ``max_steps`` counts a resumed run's earlier steps."""

    num_samples: int
    sample_rate: float
    steps_per_epoch: int
    planned_steps: int
    noise_multiplier: float
    max_steps: int
    calibrated: bool

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.num_samples


def check_resume(config: DPConfig, entry: dict[str, Any], *, num_samples: int | None = None,
                 sample_rate: float | None = None) -> None:
    """A resumed run keeps its DP settings, N and q (any change is one error naming each)."""
    changed = config.changed_on_resume(entry.get("settings", {}))
    for key, new in (("num_samples", num_samples), ("sample_rate", sample_rate)):
        if new is not None and (entry.get(key) is None or not math.isclose(entry[key], new, rel_tol=1e-9)):
            changed.append(f"{key}: {entry.get(key)} -> {new}")
    if changed:
        raise ValueError(f"resume must keep the DP settings of the run ({', '.join(changed)}); start a new run "
                         "instead (the ledger composes it with this one)")


def plan_run(config: DPConfig, *, num_samples: int, batch: float, epochs: int, resumed: dict[str, Any] | None = None,
             records: RecordBudgets | None = None) -> Plan:
    """The plan of a run, or a one-line ValueError if it may not take a single step.

    ``resumed`` is the ``dp`` entry of a checkpoint being resumed: its settings, N and q must be
    unchanged, and its steps and sigma carry on. Otherwise sigma is the configured one or, if None,
    calibrated so the planned steps spend exactly ``config.epsilon``. With ``records`` budgets, a run
    whose planned steps would take any record past its budget is refused, unless sigma was given:
    then it trains until the first record reaches its budget."""
    checks.delta("delta", config.delta, num_samples)
    q, planned = plan(num_samples=num_samples, batch_size=float(batch), epochs=float(epochs))
    steps_taken, sigma = 0, config.noise_multiplier
    if resumed is not None:
        check_resume(config, resumed, num_samples=num_samples, sample_rate=q)
        steps_taken, sigma = resumed["steps"], resumed["noise_multiplier"]
    calibrated = sigma is None
    if calibrated:
        sigma = accountant.noise_multiplier(target_epsilon=config.epsilon, delta=config.delta, sample_rate=q,
                                            steps=planned)
    budget = accountant.max_steps(target_epsilon=config.epsilon, delta=config.delta, noise_multiplier=sigma,
                                  sample_rate=q, limit=planned) - steps_taken  # never more than planned
    if budget <= 0:
        raise ValueError(f"epsilon={config.epsilon:g} does not allow another step at noise_multiplier={sigma:g}, "
                         f"q={q:.4g}; raise epsilon or the noise multiplier")
    remaining = min(budget, planned - steps_taken)
    if records is not None:
        over, worst = records.over(sigma, q, remaining)
        if over:
            allowed = records.steps_within(sigma, q, remaining) if config.noise_multiplier is not None else 0
            if allowed == 0:
                unit = "person" if config.persons is not None else "image"
                raise ValueError(f"this run would take {over} training {unit}(s) past their lifetime budget (dataset_budget),"
                                 f" the worst to epsilon={worst:.4f} at delta={records.delta:g}; lower epsilon or "
                                 f"epochs, or give noise_multiplier to train until the first {unit} reaches its budget")
            remaining = allowed
    return Plan(num_samples, q, planned // epochs, planned, sigma, steps_taken + remaining, calibrated)

