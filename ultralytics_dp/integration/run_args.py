"""A private run's training arguments: what the run will use, and the DP defaults for what the user
left unset (``recipe``), fitted to the training set and to sigma once those are known.

Privacy assumptions relied on here: none. Every value here is public (args.yaml records it) and
depends only on the user's arguments, N and sigma.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..accounting.planning import Plan
from ..console import log
from . import recipe
from .checkpoint import read_entries


def planned_args(model: Any, explicit: dict[str, Any]) -> dict[str, Any]:
    """The training arguments ``model.train(**explicit)`` will use, as far as they can be known in the
    launching process (a resumed run takes its checkpoint's, which the new ones may override)."""
    planned = dict(model.overrides)
    resume = explicit.get("resume")
    if resume:
        path = resume if isinstance(resume, (str, Path)) and Path(resume).exists() else model.ckpt_path
        if path and Path(path).exists():
            planned.update(read_entries(path)["train_args"] or {})
    return {**planned, **explicit}


class Defaults:
    """The DP defaults one run applies (``recipe.DEFAULTS``), and which arguments took them: only
    those are fitted later (an explicit value is always the user's)."""

    def __init__(self, augmult: int) -> None:
        self.augmult = augmult
        self.applied: list[str] = []  # arguments set from recipe.DEFAULTS (batch and lr0 are fitted to the run)

    def apply(self, args: dict[str, Any], explicit: dict[str, Any]) -> dict[str, Any]:
        """``args`` with the DP default for every key the user did not set (logged)."""
        args, self.applied = recipe.with_defaults(args, explicit, augmult=self.augmult)
        if self.applied:
            log("DP defaults for unset arguments: " + ", ".join(
                f"{k}={'(once sigma is known)' if recipe.DEFAULTS[k][0] is recipe.FITTED else args[k]}"
                for k in self.applied))
        return args

    def fit_batch(self, trainer: Any, records: int, unit: str) -> None:
        """A default expected batch above 3/4 of the training set's ``records`` (images or persons)
        becomes 3/4 of it; an explicit batch is the user's (``plan`` refuses one above N)."""
        batch = recipe.fit_batch(trainer.args.batch, records)
        if "batch" in self.applied and batch != trainer.args.batch:
            trainer.args.batch = batch
            log(f"batch={batch}: the default expected batch is at most 3/4 of the training {unit}s")

    def fit_learning_rate(self, trainer: Any, plan: Plan) -> None:
        """A default lr0 follows the noise once sigma is known (``recipe.learning_rate``): the
        optimizer and its schedule are set to it."""
        if "lr0" not in self.applied:
            return
        trainer.args.lr0 = lr = recipe.learning_rate(trainer.args.task, plan.expected_batch_size,
                                                     plan.noise_multiplier)
        for group in trainer.optimizer.param_groups:
            group["lr"] = group["initial_lr"] = lr
        trainer.scheduler.base_lrs = [lr] * len(trainer.optimizer.param_groups)
        log(f"lr0={lr:.4g}: the default learning rate for noise_multiplier={plan.noise_multiplier:.3g} at "
            f"expected batch {plan.expected_batch_size:g}")


def save_args(trainer: Any) -> None:
    """Rewrite args.yaml with the trainer's arguments (after the defaults were fitted)."""
    from ultralytics.utils import YAML

    YAML.save(Path(trainer.save_dir) / "args.yaml", vars(trainer.args))
