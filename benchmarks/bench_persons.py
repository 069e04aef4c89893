"""What an image-level run means for a person with k images: the numbers behind the README's
"Choosing the privacy unit".

For the run the persons issue names (epsilon 8 per image at delta 1e-5: N = 50,000 images, expected
batch 256, 30 epochs, sigma calibrated), each k gets: generic group privacy (k epsilon, with its
delta_k = delta (e^(k eps) - 1) / (e^eps - 1)), the tight per-person epsilon of the mixture (Ganesh
2024; Google's dp_accounting ``MixtureOfGaussiansDpEvent``, a test extra, as an independent check),
and the epsilon this package releases for that person (``accounting.group``: the same mixture,
composed by both of its accountants), with the seconds each took.

Usage: python benchmarks/bench_persons.py
"""

from __future__ import annotations

import math
import time

from ultralytics_dp.accounting import accountant
from ultralytics_dp.accounting.group import person_segments
from ultralytics_dp.accounting.pld import Segment, plan

N, BATCH, EPOCHS, DELTA, EPSILON = 50_000, 256, 30, 1e-5, 8.0


def tight(sigma: float, q: float, k: int, steps: int) -> float:
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant
    from scipy.stats import binom

    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    weights = [float(binom.pmf(j, k, q)) for j in range(k + 1)]
    acc.compose(dp_event.MixtureOfGaussiansDpEvent(sigma, list(range(k + 1)), weights), steps)
    return acc.get_epsilon(DELTA)


def main() -> None:
    q, steps = plan(num_samples=N, batch_size=BATCH, epochs=EPOCHS)
    sigma = accountant.noise_multiplier(target_epsilon=EPSILON, delta=DELTA, sample_rate=q, steps=steps)
    released = accountant.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA).epsilon
    print(f"per image: sigma={sigma:g}, q={q:.5g}, {steps} steps, epsilon={released:.3f} at delta={DELTA:g}")
    print("| images per person k | group privacy (k eps, delta_k) | mixture, dp_accounting | released here "
          "(mixture, both accountants) |")
    print("|---|---|---|---|")
    for k in (1, 2, 5, 10):
        delta_k = DELTA * math.expm1(k * released) / math.expm1(released)
        start = time.perf_counter()
        exact = tight(sigma, q, k, steps)
        t_tight = time.perf_counter() - start
        start = time.perf_counter()
        ours = accountant.release(person_segments([Segment(sigma, q, steps)], k), DELTA).epsilon
        t_ours = time.perf_counter() - start
        print(f"| {k} | ({k * released:.1f}, {delta_k:.2g}) | {exact:.1f} ({t_tight:.1f} s) | {ours:.1f} ({t_ours:.1f} s) |")


if __name__ == "__main__":
    main()
