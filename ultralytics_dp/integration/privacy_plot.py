"""``privacy.png``: epsilon against optimizer steps, planned and spent, with the budget.

Privacy assumptions relied on here: everything drawn is public (sigma, q, the step counts, delta,
the target); no value depends on the training data beyond the number of steps taken, which the
checkpoint states anyway.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def plot_privacy(path: Path, curve: Sequence[tuple[int, float]], steps: int, epsilon: float, target: float,
                 delta: float) -> Path:
    """Draw the planned curve (upper bounds at ``curve``'s step counts), the part of it spent up to
    ``steps``, the run's exact ``epsilon`` there, and the ``target`` budget line."""
    from matplotlib.figure import Figure  # no pyplot: the user's backend and figures are left alone

    fig = Figure(figsize=(6, 4), tight_layout=True)
    ax = fig.subplots()
    if curve:
        ax.plot(*zip(*curve), "--", color="tab:gray", label="planned")
        spent = [(t, e) for t, e in curve if t < steps] + [(steps, epsilon)]
        ax.plot(*zip(*spent), "-", color="tab:blue", linewidth=2, label="spent")
    ax.plot([steps], [epsilon], "o", color="tab:blue")
    ax.annotate(f"epsilon={epsilon:.3g} after {steps} steps", (steps, epsilon), textcoords="offset points",
                xytext=(-8, -4), ha="right", va="top")
    ax.axhline(target, color="tab:red", linewidth=1, label=f"budget epsilon={target:g}")
    ax.set(xlabel="optimizer steps", ylabel=f"epsilon at delta={delta:g}", title="Privacy spent (PRV upper bound)")
    ax.set_ylim(0, 1.15 * max([target, epsilon, *(e for _, e in curve)]))
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=120)
    return path
