"""What a released epsilon costs: the two accountants on the queries the trainer, the ledger and
``yolo-dp privacy`` make (``accounting/accountant.py``).

For each query: seconds for the own accountant (``pld``) alone, for the released figure (``pld``
plus prv-accountant, cold caches), and for Google's ``dp_accounting`` PLD accountant (the library
that could replace ``pld``) at a value interval of 0.2% of epsilon (about ``pld``'s tightness), with
the upper bounds. The trainer asks at set-up (calibrate
sigma, the step budget: both settled on the released figure), at each epoch end and checkpoint (the
released epsilon of the steps so far) and per ledger group. Run on one core: ``taskset -c 0``.

Usage: python benchmarks/bench_release.py
"""

from __future__ import annotations

import time

from ultralytics_dp.accounting import accountant, pld
from ultralytics_dp.accounting.pld import Segment

DELTA = 1e-5
# (label, sigma, q, steps): the demo's and bench_run's kinds of run, then long runs and large epsilon
RELEASES = [
    ("demo: sigma 0.64, q 0.128, 8 steps", 0.63626, 0.128, 8),
    ("defaults: sigma 0.64, q 0.75, 27 steps", 0.64, 0.75, 27),
    ("sigma 1, q 0.01, 1e3 steps", 1.0, 0.01, 1_000),
    ("sigma 0.8, q 0.004, 1e4 steps", 0.8, 0.004, 10_000),
    ("sigma 0.5, q 1e-3, 1e5 steps (eps ~13)", 0.5, 1e-3, 100_000),
    ("sigma 2, q 1e-3, 1e5 steps (eps ~0.6)", 2.0, 1e-3, 100_000),
    ("sigma 0.3, q 0.5, 100 steps (eps ~300)", 0.3, 0.5, 100),
]
CALIBRATIONS = [("eps 8, q 0.128, 8 steps", 8.0, 0.128, 8), ("eps 1, q 0.01, 1e3 steps", 1.0, 0.01, 1_000),
                ("eps 3, q 0.004, 1e4 steps", 3.0, 0.004, 10_000)]


def dp_accounting_epsilon(sigma: float, q: float, steps: int, interval: float) -> float:
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval)
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(DELTA)


def timed(fn):  # noqa: ANN001, ANN201
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    print(f"{'released epsilon':<44} {'pld s':>7} {'both s':>7} {'dp_acc s':>8} {'pld eps':>9} {'prv upper':>10} "
          f"{'dp_acc':>9}")
    for label, sigma, q, steps in RELEASES:
        own, t_own = timed(lambda: pld.compose([Segment(sigma, q, steps)], DELTA))
        accountant._release.cache_clear()
        released, t_both = timed(lambda: accountant.release([Segment(sigma, q, steps)], DELTA))
        google, t_google = timed(lambda: dp_accounting_epsilon(sigma, q, steps, interval=0.002 * own))
        print(f"{label:<44} {t_own:7.2f} {t_both:7.2f} {t_google:8.2f} {own:9.4f} "
              f"{released.by_accountant['prv_accountant']:10.4f} {google:9.4f}")
    print(f"\n{'calibrate sigma, then its step budget':<44} {'pld s':>7} {'both s':>7} {'sigma pld':>9} {'released':>10}")
    for label, target, q, steps in CALIBRATIONS:
        own, t_own = timed(lambda: pld.get_noise_multiplier(target_epsilon=target, delta=DELTA, sample_rate=q,
                                                           steps=steps))
        accountant._release.cache_clear()

        def both() -> tuple[float, int]:
            sigma = accountant.noise_multiplier(target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps)
            return sigma, accountant.max_steps(target_epsilon=target, delta=DELTA, noise_multiplier=sigma,
                                               sample_rate=q, limit=steps)

        (sigma, budget), t_both = timed(both)
        print(f"{label:<44} {t_own:7.2f} {t_both:7.2f} {own:9.5g} {sigma:10.5g}  (budget {budget} of {steps})")


if __name__ == "__main__":
    main()
