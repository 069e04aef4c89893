"""Time the accountant: compute_epsilon at T = 1e3, 1e5, 1e6, get_noise_multiplier and max_steps,
and Opacus' PRVAccountant on the same epsilon queries (``bench`` extra), then the queries a run's
set-up makes, the edge cases, and a sweep of issue 16's target grid (epsilon 0.1-1000, sigma
0.3-50, q 1e-4-0.7), each query with cold caches. Run on one core:

    taskset -c 0 .venv/bin/python benchmarks/bench_accounting.py
"""

from __future__ import annotations

import datetime
import platform
import time

from results_md import replace_section
from ultralytics_dp.accounting.pld import (Segment, _compute_epsilon, _moments, _rdp, _step, _upper, compute_epsilon,
                                      get_noise_multiplier, max_steps)

SIGMA, Q, DELTA = 1.0, 0.001, 1e-6


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def opacus_epsilon(steps: int) -> float:
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(SIGMA, Q, steps)]
    return acc.get_epsilon(delta=DELTA)


def main() -> None:
    lines = [
        "# Benchmark: accounting",
        "",
        f"- date: {datetime.date.today()}; machine: {platform.processor() or platform.machine()}, one core "
        "(`taskset -c 0`)",
        "- command: `taskset -c 0 python benchmarks/bench_accounting.py`",
        "",
        "| query | seconds | result |",
        "|---|---|---|",
    ]
    print(f"sigma={SIGMA} q={Q} delta={DELTA}")
    print(f"{'query':<34}{'ours (s)':>10}{'eps':>10}{'opacus (s)':>12}{'eps':>10}")
    for steps in (1_000, 100_000, 1_000_000):
        eps, t = timed(compute_epsilon, noise_multiplier=SIGMA, sample_rate=Q, steps=steps, delta=DELTA)
        try:
            o_eps, o_t = timed(opacus_epsilon, steps)
            peer = f"{o_t:>12.2f}{o_eps:>10.4f}"
        except Exception as err:  # the peer failing is a result worth printing
            peer = f"{'failed':>12} {type(err).__name__}"
        print(f"{'compute_epsilon T=' + format(steps, ','):<34}{t:>10.2f}{eps:>10.4f}{peer}")
        lines.append(f"| compute_epsilon sigma={SIGMA} q={Q} T={steps:,} delta={DELTA} | {t:.2f} | {eps:.4f} |")
    sigma, t = timed(get_noise_multiplier, target_epsilon=2.0, delta=DELTA, sample_rate=Q, steps=100_000)
    print(f"{'get_noise_multiplier eps=2 T=1e5':<34}{t:>10.2f}{'sigma=' + format(sigma, '.4f'):>10}")
    lines.append(f"| get_noise_multiplier eps=2 q={Q} T=100,000 delta={DELTA} | {t:.2f} | sigma={sigma:.4f} |")
    steps, t = timed(max_steps, target_epsilon=2.0, delta=DELTA, noise_multiplier=SIGMA, sample_rate=Q)
    print(f"{'max_steps eps=2':<34}{t:>10.2f}{'T=' + str(steps):>10}")
    lines.append(f"| max_steps eps=2 sigma={SIGMA} q={Q} delta={DELTA} | {t:.2f} | T={steps} |")
    print("\nthe queries of a training run's set-up and the edge cases (delta=1e-5, a cold cache for each):")
    for name, fn, kwargs in EDGE_CASES:
        try:
            out, t = cold(fn, **kwargs)
        except Exception as err:  # a failure is a result worth printing
            out, t = f"{type(err).__name__}", float("nan")
        print(f"{name:<46}{t:>8.2f} s  {out}")
        shown = f"{out:.6g}" if isinstance(out, float) else out
        lines.append(f"| {name} delta=1e-5 | {t:.2f} | {shown} |")
    lines += sweep()
    replace_section([*lines, ""])


def pld_epsilon(sigma: float, q: float, steps: int) -> float:
    """dp_accounting's PLD epsilon at delta=1e-5 (``test`` extra), on a grid 4 times finer than ours."""
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    mesh = _upper([Segment(sigma, q, steps)], 1e-5)[1]
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=mesh / 4)
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(1e-5)


def cold(fn, **kwargs):
    """(result, seconds) of one query with every cache emptied first."""
    for cache in (_rdp, _step, _moments, _compute_epsilon):
        cache.cache_clear()
    return timed(fn, delta=1e-5, **kwargs)


SIGMAS, RATES = (0.3, 0.6, 1.0, 2.0, 5.0, 15.0, 50.0), (1e-4, 1e-3, 1e-2, 0.1, 0.7)
TARGETS = (0.1, 0.3, 1.0, 3.0, 8.0, 30.0, 100.0, 1000.0)


def sweep() -> list[str]:
    """Every query of the grid; a case is in range when its epsilon (and sigma) lie in the targets'."""
    cases, excess, calibrated = [], [], []
    for sigma in SIGMAS:
        for q in RATES:
            eps, t = cold(compute_epsilon, noise_multiplier=sigma, sample_rate=q, steps=100_000)
            cases.append(("compute_epsilon T=1e5", f"sigma={sigma} q={q}", t, 0.1 <= eps <= 1000, f"{eps:.4g}"))
            if 0.1 <= eps <= 1000:
                excess.append(eps / pld_epsilon(sigma, q, 100_000) - 1)
    for target in TARGETS:
        for q in RATES:
            try:
                sigma, t = cold(get_noise_multiplier, target_epsilon=target, sample_rate=q, steps=10_000)
            except ValueError:  # unreachable with sigma <= 1e4: out of range
                continue
            cases.append(("get_noise_multiplier T=1e4", f"eps={target} q={q}", t, 0.3 <= sigma <= 50, f"{sigma:.5g}"))
            if 0.3 <= sigma <= 50:  # within the target by PLD, and sigma / 1.005 is over it
                calibrated.append((pld_epsilon(sigma, q, 10_000) <= target, pld_epsilon(sigma / 1.005, q, 10_000) > target))
    for target in TARGETS[::2] + (1000.0,):
        for sigma in SIGMAS[::2]:
            for q in RATES[::2]:
                steps, t = cold(max_steps, target_epsilon=target, noise_multiplier=sigma, sample_rate=q)
                cases.append(("max_steps", f"eps={target} sigma={sigma} q={q}", t, True, str(steps)))
    lines = ["", "Issue 16's target grid, every query with cold caches (delta=1e-5; compute_epsilon at 1e5 steps, "
             "get_noise_multiplier at 1e4 steps; in range: epsilon in [0.1, 1000] and sigma in [0.3, 50]):", "",
             "| query | cases | in range | in range under 1 s | slowest in range (s) | the in-range cases over 1 s |",
             "|---|---|---|---|---|---|"]
    for kind in dict.fromkeys(c[0] for c in cases):
        mine = [c for c in cases if c[0] == kind]
        inside = [c for c in mine if c[3]]
        slow = sorted((c for c in inside if c[2] >= 1.0), key=lambda c: -c[2])
        listed = "; ".join(f"{c[1]} ({c[2]:.1f} s, {c[4]})" for c in slow) or "none"
        row = (f"| {kind} | {len(mine)} | {len(inside)} | {sum(c[2] < 1.0 for c in inside)} | "
               f"{max(c[2] for c in inside):.2f} | {listed} |")
        print(row)
        lines.append(row)
    accuracy = [
        "", "Accuracy on the same grid, against dp_accounting's PLD accountant on a grid 4 times finer than ours:",
        f"- compute_epsilon, in range: ours / PLD - 1 from {min(excess):+.3%} to {max(excess):+.3%} ({len(excess)} cases)",
        f"- get_noise_multiplier, in range: PLD epsilon of sigma within the target in "
        f"{sum(a for a, _ in calibrated)}/{len(calibrated)}, of sigma / 1.005 over it in "
        f"{sum(b for _, b in calibrated)}/{len(calibrated)}",
    ]
    print("\n".join(accuracy))
    return lines + accuracy


EDGE_CASES = [  # (name, query, arguments): the cases of issue 16, then the extremes of its target grid
    ("get_noise_multiplier eps=8 q=0.128 T=8", get_noise_multiplier, dict(target_epsilon=8, sample_rate=0.128, steps=8)),
    ("max_steps eps=8 sigma=1 q=0.128 limit=8", max_steps,
     dict(target_epsilon=8, noise_multiplier=1.0, sample_rate=0.128, limit=8)),
    ("max_steps eps=8 sigma=1 q=0.128", max_steps, dict(target_epsilon=8, noise_multiplier=1.0, sample_rate=0.128)),
    ("max_steps eps=1000 sigma=1 q=0.128", max_steps,
     dict(target_epsilon=1000, noise_multiplier=1.0, sample_rate=0.128)),
    ("get_noise_multiplier eps=1000 q=0.128 T=100", get_noise_multiplier,
     dict(target_epsilon=1000, sample_rate=0.128, steps=100)),
    ("get_noise_multiplier eps=0.1 q=0.01 T=1000", get_noise_multiplier,
     dict(target_epsilon=0.1, sample_rate=0.01, steps=1000)),
    ("max_steps eps=0.1 sigma=50 q=1e-4", max_steps, dict(target_epsilon=0.1, noise_multiplier=50.0, sample_rate=1e-4)),
    ("compute_epsilon sigma=0.3 q=0.7 T=100", compute_epsilon, dict(noise_multiplier=0.3, sample_rate=0.7, steps=100)),
    ("compute_epsilon sigma=50 q=1e-4 T=1e5", compute_epsilon,
     dict(noise_multiplier=50.0, sample_rate=1e-4, steps=100_000)),
    ("get_noise_multiplier eps=1 q=0.001 T=1e5", get_noise_multiplier,
     dict(target_epsilon=1.0, sample_rate=0.001, steps=100_000)),
]


if __name__ == "__main__":
    main()
