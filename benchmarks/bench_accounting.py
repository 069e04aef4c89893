"""Time the accountant: compute_epsilon at T = 1e3, 1e5, 1e6, get_noise_multiplier and max_steps,
and Opacus' PRVAccountant on the same epsilon queries (``bench`` extra). Run on one core:

    taskset -c 0 .venv/bin/python benchmarks/bench_accounting.py
"""

from __future__ import annotations

import time

from ultralytics_dp.accounting import compute_epsilon, get_noise_multiplier, max_steps

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
    sigma, t = timed(get_noise_multiplier, target_epsilon=2.0, delta=DELTA, sample_rate=Q, steps=100_000)
    print(f"{'get_noise_multiplier eps=2 T=1e5':<34}{t:>10.2f}{'sigma=' + format(sigma, '.4f'):>10}")
    steps, t = timed(max_steps, target_epsilon=2.0, delta=DELTA, noise_multiplier=SIGMA, sample_rate=Q)
    print(f"{'max_steps eps=2':<34}{t:>10.2f}{'T=' + str(steps):>10}")


if __name__ == "__main__":
    main()
