"""One-run audits (``ultralytics_dp.audit``) of the real trainer path at claimed epsilon 1, 2, 4, 8:
gradient (white-box) and input (black-box) canaries, the lower bound epsilon_lb at 95 %, and the
seconds each audit took, beside the bound the same audit gets from a simulation of the exact
mechanism (the same sigma, q, steps and m: Gaussian noise, Poisson-sampled canaries, the same
likelihood-ratio scores and guesses; mean ± std of 5 simulations): what this audit can show at best.

The run: yolo26n-cls from scratch (GroupNorm) on the embedded digits-cls (1,438 training images at
32 px), expected batch 512 (q = 0.36 for the gradient audit), 4 epochs, m canaries.

Usage: python benchmarks/bench_audit.py [canaries=1000] [epsilons=1,2,4,8] [kinds=gradient,input]
"""

from __future__ import annotations

import math
import sys
import tempfile
import time

import numpy as np

import ultralytics_dp  # noqa: F401
from ultralytics_dp.auditing.bound import best_guess
from ultralytics_dp.auditing.run import audit


def simulated(sigma: float, q: float, steps: int, m: int, delta: float, trials: int = 5) -> tuple[float, float]:
    """The mean and standard deviation of the bounds of ``trials`` simulated audits of the exact
    subsampled Gaussian mechanism."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(trials):
        included = rng.random(m) < 0.5
        score = np.zeros(m)
        mu = 1 / sigma
        for _ in range(steps):
            z = mu * (included & (rng.random(m) < q)) + rng.standard_normal(m)
            score += np.logaddexp(z * mu - mu * mu / 2 + math.log(q), math.log1p(-q) if q < 1 else -np.inf)
        out.append(best_guess(score, included, delta, 0.95).epsilon_lb)
    return float(np.mean(out)), float(np.std(out))


def main(argv: list[str]) -> None:
    opts = dict(a.split("=", 1) for a in argv)
    m = int(opts.get("canaries", 1000))
    epsilons = [float(e) for e in opts.get("epsilons", "1,2,4,8").split(",")]
    kinds = opts.get("kinds", "gradient,input").split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            for eps in epsilons:
                start = time.perf_counter()
                r = audit("yolo26n-cls.yaml", "digits-cls", canaries=m, kind=kind, epsilon=eps, epochs=4, imgsz=32,
                          batch=512, workers=0, plots=False, project=tmp, name=f"{kind}-{eps:g}", verbose=False)
                rows.append((kind, eps, r, time.perf_counter() - start))
    print("| canaries | claimed epsilon | epsilon_lb (95 %) | simulated mechanism | correct / guesses | in | sigma | q | "
          "steps | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind, eps, r, sec in rows:
        ideal = simulated(r.noise_multiplier, r.sample_rate, r.steps, r.canaries, r.delta) if kind == "gradient" else None
        print(f"| {kind} ({r.canaries}) | {r.claimed_epsilon:.3f} | {r.epsilon_lb:.3f} | "
              f"{'' if ideal is None else f'{ideal[0]:.3f} ± {ideal[1]:.3f}'} | {r.correct} / {r.guesses} | {r.included} | "
              f"{r.noise_multiplier:.3f} | {r.sample_rate:.3f} | {r.steps} | {sec:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
