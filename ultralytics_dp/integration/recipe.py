"""DP-aware training defaults: what a private run uses for every argument the user did not set.

Why: Ultralytics' defaults are tuned for long non-private runs (thousands of steps, batch 16,
heavy augmentation, warm-up over 3 epochs, ``optimizer=auto`` picking AdamW and ignoring
``lr0``). A DP run takes tens to hundreds of noisy steps over large Poisson batches; with those
defaults the same budget gives a far worse model, and every search for better values spends
privacy. ``DEFAULTS`` holds the values measured to work (``benchmarks/UTILITY.md``), each with the
reason; the table in docs/useful-models.md is checked against it. An explicit user value always wins.

Besides arguments, one trainer behaviour changes in DP mode (``guard.TrainerGuard``): Ultralytics'
clip of the batch gradient to norm 10 is skipped (after the noise it only rescales the learning
rate, which the rule below sets; it is post-processing either way, so privacy is unaffected). The
weight EMA stays Ultralytics': over the 20-100 steps of a DP run it is close to the last iterate,
and averaging the last third of the steps instead measured no better (``benchmarks/UTILITY.md``).

Privacy assumptions relied on here: none. Every value below is public (it is in args.yaml) and
was chosen without the private training set of a user; changing it changes utility, not the
guarantee.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..losses import TASKS

FITTED = "batch / sigma rule"  # set once the run's sigma is known (``learning_rate``)
# argument -> (DP default, Ultralytics default, why)
DEFAULTS: dict[str, tuple[Any, Any, str]] = {
    "batch": (1024, 16, "expected Poisson batch (at most 3/4 of the images): at a fixed epsilon and epochs a "
                        "step's noise-to-signal sigma / batch is least at the largest batch"),
    "epochs": (20, 100, "more steps at a larger sigma: 20 beat 10 by 0.5-1 point at epsilon 1, 3 and 8 and 10 "
                      "beat 5; 40 lost 1-5 points"),
    "optimizer": ("SGD", "auto", "'auto' picks AdamW at its own learning rate and ignores lr0"),
    "lr0": (FITTED, 0.01, "set once sigma is known, proportional to batch / sigma: the noise std of the "
                          "averaged gradient is sigma * C / batch"),
    "momentum": (0.9, 0.937, "momentum also averages the noise of consecutive steps"),
    "warmup_epochs": (0.0, 3.0, "a 3-epoch warm-up is most of a short DP run"),
    "warmup_bias_lr": (0.0, 0.1, "bias learning rate 0.1 at the start of a fine-tune undoes the pretraining"),
    "weight_decay": (0.0, 0.0005, "Ultralytics scales it by batch/64 (in DP mode it sees physical_batch, "
                                          "so an explicit value is used about as given)"),
    "fliplr": (0.0, 0.5, "per-image augmentation adds gradient variance the noise already dominates"),
    "hsv_h": (0.0, 0.015, "as fliplr"),
    "hsv_s": (0.0, 0.7, "as fliplr"),
    "hsv_v": (0.0, 0.4, "as fliplr"),
    "translate": (0.0, 0.1, "as fliplr"),
    "scale": (0.0, 0.5, "as fliplr"),
    "erasing": (0.0, 0.4, "as fliplr (classification)"),
    "auto_augment": (None, "randaugment", "as fliplr (classification)"),
}
# with augmult > 1: crop scale 0.8-1 (classification) or random scale +-20% (detection); measured at
# epsilon 3 on the tuning split, augmult 4: 96.2% with this alone, 92.4% with Ultralytics' augmentations
AUGMULT_DEFAULTS = {"scale": 0.2}
# task -> (lr0 * sigma / batch, largest lr0): measured on tuning splits (benchmarks/UTILITY.md)
# (the other tasks are the detection losses plus an angle, mask or keypoint term: not measured separately)
LR_NOISE = {task: (7e-4, 0.2) if task == "classify" else (2e-4, 0.05) for task in TASKS}


def with_defaults(args: Mapping[str, Any], explicit: Mapping[str, Any], augmult: int = 1
                  ) -> tuple[dict[str, Any], list[str]]:
    """``args`` with the DP default of every key in ``DEFAULTS`` not in ``explicit``; the keys set.
    With augmentation multiplicity (``augmult`` > 1) a mild random crop / scale is on
    (``AUGMULT_DEFAULTS``): averaging the views is what makes augmentation pay under DP."""
    changed = [key for key in DEFAULTS if key not in explicit]
    if explicit.get("optimizer", DEFAULTS["optimizer"][0]) != "SGD" and "lr0" in changed:
        changed.remove("lr0")  # the rule is measured for SGD; another optimizer keeps Ultralytics' lr0
    values = {key: DEFAULTS[key][0] for key in changed if DEFAULTS[key][0] is not FITTED}
    if augmult > 1:
        values.update({key: value for key, value in AUGMULT_DEFAULTS.items() if key not in explicit})
    return {**args, **values}, changed


def learning_rate(task: str, batch: float, noise_multiplier: float) -> float:
    """Default SGD lr0: proportional to batch / sigma, the inverse of the noise std per coordinate of
    the averaged gradient (sigma * C / batch), at the constant measured per task, and capped."""
    scale, cap = LR_NOISE[task]
    return min(cap, scale * batch / noise_multiplier)


def fit_batch(batch: int, num_samples: int) -> int:
    """The default expected batch for ``num_samples`` images: at most 3/4 of them (q <= 0.75)."""
    return max(1, min(batch, num_samples * 3 // 4))
