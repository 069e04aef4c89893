"""The own accountant (``pld``) against independent references: Google's dp_accounting PLD accountant and RDP."""

from __future__ import annotations

import json
import math

import pytest
from dp_accounting import dp_event, rdp
from dp_accounting.pld import pld_privacy_accountant

from ultralytics_dp.accounting.pld import (
    compute_epsilon,
    epsilon_curve,
    get_noise_multiplier,
    max_steps,
)


def pld_epsilon(segments, delta, interval=None):
    """Independent reference: Google's privacy-loss-distribution accountant, on a grid of 1e-4 or,
    for epsilon under 0.1, of epsilon / 1000 (its pessimistic grid is 2% high at epsilon 0.005)."""
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval or 1e-4)
    for sigma, q, steps in segments:
        acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    eps = acc.get_epsilon(delta)
    return pld_epsilon(segments, delta, eps / 1000) if interval is None and eps < 0.1 else eps


def rdp_epsilon(sigma, q, steps, delta):
    acc = rdp.RdpAccountant()
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


# (sigma, q, steps, delta): spans q in [0.001, 1], sigma in [0.5, 5], T in [1, 1e5]
GRID = [
    (0.5, 1.0, 1, 1e-5),
    (1.0, 1.0, 10, 1e-6),
    (5.0, 1.0, 100, 1e-5),
    (0.8, 0.1, 1000, 1e-5),   # large epsilon: prv-accountant 0.2.0 raises or is biased here
    (1.0, 0.01, 1000, 1e-5),
    (2.0, 0.01, 10000, 1e-6),
    (1.0, 0.004, 100000, 1e-5),
    (5.0, 0.001, 100, 1e-5),  # tiny epsilon: an absolute eps_error of 0.01 would be way off
    (3.0, 0.05, 1000, 1e-6),
    (0.7, 0.02, 500, 1e-6),
    (1.5, 0.001, 100000, 1e-6),
    (4.0, 0.3, 50, 1e-5),
    (1.2, 0.5, 1, 1e-6),
    (0.3, 0.01, 2000, 1e-5),  # small sigma: the grid's domain is sized by the fractional RDP orders
]


@pytest.mark.parametrize("sigma,q,steps,delta", GRID)
def test_agrees_with_pld_reference_and_is_not_optimistic(sigma, q, steps, delta):
    ours = compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta)
    ref = pld_epsilon([(sigma, q, steps)], delta)
    assert abs(ours - ref) <= 0.01 * ref, (ours, ref)
    assert ours >= ref * (1 - 0.005), f"optimistic: ours {ours} < reference {ref}"


@pytest.mark.parametrize("sigma,q,steps,delta", GRID[::3])
def test_tighter_than_rdp(sigma, q, steps, delta):
    ours = compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta)
    assert ours < rdp_epsilon(sigma, q, steps, delta)


def test_edge_cases():
    assert compute_epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=0, delta=1e-5) == 0.0
    full = compute_epsilon(noise_multiplier=2.0, sample_rate=1.0, steps=3, delta=1e-5)
    assert math.isfinite(full) and full > 0
    long = compute_epsilon(noise_multiplier=1.0, sample_rate=0.001, steps=1_000_000, delta=1e-6)
    assert math.isfinite(long) and long > compute_epsilon(
        noise_multiplier=1.0, sample_rate=0.001, steps=100_000, delta=1e-6
    )


@pytest.mark.slow
def test_get_noise_multiplier_round_trips():
    kw = dict(delta=1e-5, sample_rate=0.05, steps=200)
    sigma = get_noise_multiplier(target_epsilon=3.0, **kw)
    assert compute_epsilon(noise_multiplier=sigma, **kw) <= 3.0
    assert compute_epsilon(noise_multiplier=sigma - 0.01, **kw) > 3.0


@pytest.mark.slow
def test_max_steps_is_the_last_step_within_budget():
    kw = dict(delta=1e-5, noise_multiplier=1.0, sample_rate=0.02)
    t = max_steps(target_epsilon=1.5, **kw)
    assert t > 0
    assert compute_epsilon(steps=t, **kw) <= 1.5 < compute_epsilon(steps=t + 1, **kw)
    assert max_steps(target_epsilon=0.01, delta=1e-5, noise_multiplier=0.5, sample_rate=1.0) == 0


def test_max_steps_within_a_limit_is_the_last_step_within_budget_below_it():
    kw = dict(delta=1e-5, noise_multiplier=1.0, sample_rate=0.05)
    assert max_steps(target_epsilon=2.0, limit=10, **kw) == 10 and compute_epsilon(steps=10, **kw) <= 2.0
    t = max_steps(target_epsilon=2.0, limit=10_000, **kw)  # the budget binds, not the limit
    assert pld_epsilon([(1.0, 0.05, t)], 1e-5) <= 2.0 < compute_epsilon(steps=t + 1, **kw)
    assert 10 < t == max_steps(target_epsilon=2.0, **kw)


def test_a_small_epsilon_is_calibrated_close_to_the_pld_optimal_sigma():
    """RDP (orders up to 63) cannot certify epsilon=0.1 here at any sigma; calibration used to raise."""
    kw = dict(delta=1e-5, sample_rate=0.01, steps=1000)
    sigma = get_noise_multiplier(target_epsilon=0.1, **kw)
    assert pld_epsilon([(sigma, 0.01, 1000)], 1e-5) <= 0.1  # the reference agrees it is within budget
    assert pld_epsilon([(sigma / 1.005, 0.01, 1000)], 1e-5) > 0.1  # and within 0.5% of the smallest sigma that is


def test_an_astronomical_step_budget_is_a_safe_lower_bound_not_a_memory_error():
    t = max_steps(target_epsilon=0.1, delta=1e-5, noise_multiplier=50.0, sample_rate=1e-4)
    assert t > 10**7
    ref = rdp.RdpAccountant(orders=list(range(2, 257)))  # an independent RDP implementation
    ref.compose(dp_event.PoissonSampledDpEvent(1e-4, dp_event.GaussianDpEvent(50.0)), t)
    assert ref.get_epsilon(1e-5) <= 0.1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(noise_multiplier=0.0, sample_rate=0.1, steps=1, delta=1e-5), "noise_multiplier"),
        (dict(noise_multiplier=-1.0, sample_rate=0.1, steps=1, delta=1e-5), "noise_multiplier"),
        (dict(noise_multiplier=1.0, sample_rate=0.0, steps=1, delta=1e-5), "sample_rate"),
        (dict(noise_multiplier=1.0, sample_rate=1.5, steps=1, delta=1e-5), "sample_rate"),
        (dict(noise_multiplier=1.0, sample_rate=0.1, steps=-1, delta=1e-5), "steps"),
        (dict(noise_multiplier=1.0, sample_rate=0.1, steps=1, delta=0.0), "delta"),
        (dict(noise_multiplier=1.0, sample_rate=0.1, steps=1, delta=1.0), "delta"),
    ],
)
def test_compute_epsilon_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compute_epsilon(**kwargs)


@pytest.mark.parametrize("target", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_targets_raise(target):
    with pytest.raises(ValueError, match="target_epsilon"):
        get_noise_multiplier(target_epsilon=target, delta=1e-5, sample_rate=0.1, steps=10)
    with pytest.raises(ValueError, match="target_epsilon"):
        max_steps(target_epsilon=target, delta=1e-5, noise_multiplier=1.0, sample_rate=0.1)


def test_unreachable_target_says_so():
    with pytest.raises(ValueError, match="unreachable"):
        get_noise_multiplier(target_epsilon=1e-9, delta=1e-5, sample_rate=1.0, steps=1000)


@pytest.mark.parametrize("sigma,q,top", [(1.0, 0.25, 40), (0.7, 0.05, 300), (3.0, 0.01, 2000)])
def test_epsilon_curve_bounds_the_pld_reference_at_every_count(sigma, q, top):
    """The display curve shares one grid sized for its largest count: every point must still be an
    upper bound (never optimistic) and close at the largest count."""
    counts = [0, 1, top // 7, top // 2, top]
    curve = epsilon_curve(noise_multiplier=sigma, sample_rate=q, steps=counts, delta=1e-5)
    assert curve[0] == 0.0
    for t, ours in zip(counts[1:], curve[1:]):
        ref = pld_epsilon([(sigma, q, t)], 1e-5)
        assert ours >= ref * (1 - 0.005), (t, ours, ref)
    assert curve[-1] <= 1.01 * pld_epsilon([(sigma, q, top)], 1e-5)
    assert curve == sorted(curve)


@pytest.mark.parametrize("sigma,q", [(1.0, 0.128), (10.0, 0.01), (50.0, 1e-4), (0.3, 0.7), (2.0, 1.0)])
def test_the_closed_form_rdp_curve_matches_prv_accountants_per_order_series(sigma, q):
    import numpy as np
    from prv_accountant import PoissonSubsampledGaussianMechanism

    from ultralytics_dp.accounting.pld import RDP_ORDERS, _rdp

    reference = np.array([PoissonSubsampledGaussianMechanism(q, sigma).rdp(float(a)) for a in RDP_ORDERS])
    assert np.allclose(_rdp(q, sigma), reference, rtol=1e-5, atol=0)


def _exact_delta(eps, sigma, q):
    """The step's hockey-stick divergence E_P[(1 - e^(eps - Y))_+] = P(A) - e^eps Q(A) on the optimal
    set A = {x >= x_eps}, from scipy's normal tails (Mironov et al. 2019's pair)."""
    import numpy as np
    from scipy import stats

    if q < 1 and eps <= np.log1p(-q):
        return 1 - np.exp(eps)
    x = sigma**2 * np.log((np.exp(eps) - 1 + q) / q) + 0.5
    return (1 - q) * stats.norm.sf(x / sigma) + q * stats.norm.sf((x - 1) / sigma) - np.exp(eps) * stats.norm.sf(x / sigma)


def _delta_of(step, h, eps):
    import numpy as np

    t = h * (step.first + np.arange(len(step.pmf)))
    return step.infinity + float(step.pmf @ np.clip(-np.expm1(eps - t), 0, None))


@pytest.mark.parametrize("sigma,q,h", [(1.0, 0.128, 0.02), (0.3, 0.7, 0.3), (5.0, 1e-3, 1e-4), (2.0, 1.0, 0.05),
                                       (1.0, 1e-4, 2e-5)])
def test_one_discretised_step_overstates_delta_everywhere_and_matches_it_on_the_grid(sigma, q, h):
    """Connect-the-dots: the discrete step's delta(eps) is >= the mechanism's at every eps (the upper
    bound rests on this) and equal to it at grid points (what makes it tight), against an
    independent closed form; at most ``tail`` is lost off the grid's ends."""
    import numpy as np

    from ultralytics_dp.accounting.pld import _step

    tail = 1e-12
    step = _step(sigma, q, h, tail)
    assert step.pmf.min() >= 0 and abs(step.pmf.sum() + step.infinity - 1) < 1e-12 and step.infinity <= tail
    t = h * (step.first + np.arange(len(step.pmf)))
    between = np.random.default_rng(0).uniform(t[0], t[-1], 300)
    for eps in between:
        assert _delta_of(step, h, eps) >= _exact_delta(eps, sigma, q) - 1e-15, eps
    for eps in t[:: max(len(t) // 300, 1)]:
        assert _delta_of(step, h, eps) == pytest.approx(_exact_delta(eps, sigma, q), abs=2 * tail + 1e-13), eps


def test_the_window_holds_all_but_its_tail_of_the_composed_loss():
    """The Chernoff window against the composed loss computed by direct convolution."""
    import numpy as np

    from ultralytics_dp.accounting.pld import _step, _window

    h, steps, tail = 0.01, 8, 1e-6
    step = _step(1.0, 0.128, h, 1e-12)
    composed = step.pmf
    for _ in range(steps - 1):
        composed = np.convolve(composed, step.pmf)
    t = h * (steps * step.first + np.arange(len(composed)))
    lo, hi = _window([step], [steps], h, tail)
    assert composed[t >= hi].sum() <= tail and composed[t <= lo].sum() <= tail
    assert composed[t >= hi - 1].sum() > tail and composed[t <= lo + 1].sum() > tail  # and not far out


@pytest.mark.parametrize("sigma,q,steps,h", [(1.0, 0.128, 20, 0.01), (0.3, 0.7, 100, 0.2), (50.0, 1e-4, 1000, 1e-6),
                                             (2.0, 1.0, 3, 0.01), (9.8, 0.01, 300, 1e-4)])
def test_epsilon_from_a_composed_loss_is_prv_accountants(sigma, q, steps, h):
    """The windowed float64 solve (and its long-double fallback) against prv_accountant's
    ``DiscretePrivacyRandomVariable.compute_epsilon`` on the same composed loss: epsilon from
    about 0.0002 to about 500 (where e^t overflows float64)."""
    import numpy as np
    from prv_accountant.discrete_privacy_random_variable import DiscretePrivacyRandomVariable
    from prv_accountant.domain import Domain

    from ultralytics_dp.accounting.pld import _solve_epsilon, _step

    step = _step(sigma, q, h, 1e-12)
    size = steps * (len(step.pmf) - 1) + 2
    size += size % 2
    composed = np.fft.irfft(np.fft.rfft(step.pmf, size) ** steps, size)  # linear: no wrap at this size
    t_min = steps * step.first * h
    theirs = DiscretePrivacyRandomVariable(composed, Domain(t_min, t_min + (size - 1) * h, size))
    _, estimate, _ = theirs.compute_epsilon(1e-5, 0.0, 0.0)
    assert _solve_epsilon(composed, t_min, h, 1e-5) == pytest.approx(estimate, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("target,q,steps", [(1.0, 1e-3, 20000), (8.0, 0.7, 15), (50.0, 0.128, 100),
                                           (0.01, 0.01, 100), (500.0, 0.5, 10), (0.003, 1.0, 1)])
def test_a_calibrated_sigma_is_within_budget_and_close_to_the_smallest(target, q, steps):
    """The last three (from a review) came out 0.5-0.9% above the smallest sigma: eps_error's floor
    is a large part of a small epsilon, and the coarse grid can land high at large epsilon."""
    kw = dict(delta=1e-5, sample_rate=q, steps=steps)
    sigma = get_noise_multiplier(target_epsilon=target, **kw)
    assert compute_epsilon(noise_multiplier=sigma, **kw) <= target < compute_epsilon(noise_multiplier=sigma / 1.003, **kw)
    if target <= 50:  # the reference's grid grows with epsilon
        assert pld_epsilon([(sigma, q, steps)], 1e-5, interval=min(1e-4, target / 1000)) <= target


def test_a_tiny_delta_is_answered():
    """float64's epsilon times this grid's size exceeds delta = 1e-12, which was refused; the check
    is prv_accountant's (long double's epsilon), and the answer agrees with the reference."""
    eps = compute_epsilon(noise_multiplier=1.0, sample_rate=0.05, steps=100, delta=1e-12)
    ref = pld_epsilon([(1.0, 0.05, 100)], 1e-12)
    assert ref * (1 - 0.005) <= eps <= 1.01 * ref


@pytest.mark.parametrize("sigma,q,steps,delta", [(1.0, 1e-3, 1_000_000, 1e-5), (0.46, 1.04e-4, 22, 2.6e-7)])
def test_the_charge_for_fft_rounding_covers_the_float64_error(sigma, q, steps, delta):
    """Raising the transform to the T-th power multiplies its rounding by T: against the same
    composition in long double, float64's error summed over the grid (a bound on its effect on
    delta) stays within ROUNDING / 4 = 4 machine epsilons per (T + sqrt(N)) (measured: up to 3.5;
    the second case, from a review, is where T + log2(N) fell short)."""
    import math

    import numpy as np
    from scipy.fft import next_fast_len

    from ultralytics_dp.accounting.pld import ROUNDING, Segment, _compose, _step, _upper, _window

    h = _upper([Segment(sigma, q, steps)], delta)[1]
    step = _step(sigma, q, h, 1e-16)
    lo, hi = _window([step], [steps], h, delta / 4000)
    size = next_fast_len(math.ceil((hi - lo) / h) + 2, real=True)
    single = _compose([step], [steps], math.floor(lo / h), size, np.float64)
    extended = _compose([step], [steps], math.floor(lo / h), size, np.longdouble)
    error = float(np.abs(single - extended).sum())
    assert 0 < error <= ROUNDING / 4 * (steps + math.sqrt(size)) * float(np.finfo(np.float64).eps), error
    assert float(extended.sum()) == pytest.approx(1.0, abs=1e-9)


def test_too_small_a_delta_for_the_arithmetic_is_refused_with_the_delta_needed():
    with pytest.raises(ValueError, match="too small to account 121299 steps.*at least"):
        compute_epsilon(noise_multiplier=2.3267, sample_rate=3.516e-3, steps=121299, delta=1.01e-12)


def test_a_small_delta_is_tight_and_answered():
    """The old rounding allowance (4 machine epsilons of the largest probability per grid point)
    took half of delta = 1e-10 here, 11% on epsilon; at 1e5 steps it refused the query."""
    from scipy import optimize

    exact = optimize.brentq(lambda e: _exact_delta(e, 0.5, 1e-4) - 1e-10, 0.01, 20, xtol=1e-12)
    ours = compute_epsilon(noise_multiplier=0.5, sample_rate=1e-4, steps=1, delta=1e-10)
    assert exact <= ours <= 1.005 * exact, (ours, exact)
    ours = compute_epsilon(noise_multiplier=1.0, sample_rate=1e-3, steps=100_000, delta=1e-10)
    ref = pld_epsilon([(1.0, 1e-3, 100_000)], 1e-10)
    assert ref * (1 - 0.005) <= ours <= 1.01 * ref


def test_a_budget_beyond_the_grid_steps_is_at_least_the_grid_steps():
    """When even GRID_STEPS steps stay within the target, max_steps used to answer RDP's budget,
    which can be below GRID_STEPS (9,462,293 here, where 10^7 steps spend 7.65 of 7.931)."""
    from ultralytics_dp.accounting.pld import GRID_STEPS

    kw = dict(delta=2.72e-6, noise_multiplier=5.7698, sample_rate=2.764e-3)
    t = max_steps(target_epsilon=7.931, **kw)
    assert t >= GRID_STEPS and compute_epsilon(steps=GRID_STEPS, **kw) <= 7.931
    # at delta 1.18e-9 the search went past what floating point can account and raised (review)
    kw = dict(delta=1.18e-9, noise_multiplier=1.2554, sample_rate=2.541e-4)
    t = max_steps(target_epsilon=4.624, **kw)
    assert t >= GRID_STEPS and compute_epsilon(steps=t, **kw) <= 4.624


def test_a_query_whose_grid_would_not_fit_in_memory_is_answered_on_a_coarser_one(monkeypatch):
    """Past ``MAX_GRID_POINTS`` the mesh is coarsened: still an upper bound, only looser (here capped
    at 2,000 points, where the mesh wants ~20,000), and still far tighter than RDP's."""
    from ultralytics_dp.accounting import pld as accounting

    monkeypatch.setattr(accounting, "MAX_GRID_POINTS", 2000)
    eps = accounting._upper([accounting.Segment(1.0, 1e-3, 10_000)], 1e-5)[0]
    ref = pld_epsilon([(1.0, 1e-3, 10_000)], 1e-5)
    assert ref <= eps < rdp_epsilon(1.0, 1e-3, 10_000, 1e-5) and eps > 1.01 * ref


def test_the_composed_privacy_loss_is_read_where_it_lies_over_millions_of_steps():
    """sigma=0.3, q=1e-4: one step's loss sits in one grid cell, so the shift that keeps its mean is
    near half a cell; over 1.7e6 steps prv_accountant's window had moved by far more than the domain's
    slack, the upper tail wrapped around, and max_steps answered 134,365 steps, where RDP (looser
    than PRV) already allows more than 1.7e6."""
    kw = dict(delta=1e-5, noise_multiplier=0.3, sample_rate=1e-4)
    t = max_steps(target_epsilon=100, **kw)
    assert compute_epsilon(steps=t, **kw) <= 100 < rdp_epsilon(0.3, 1e-4, t + 1, 1e-5)
    ref = pld_epsilon([(0.3, 1e-4, 1_000_000)], 1e-5)
    assert ref <= compute_epsilon(steps=1_000_000, **kw) <= 1.01 * ref


def test_float64_rounding_below_the_grid_is_not_taken_for_wrapped_mass():
    """At delta=1e-9 the cells below the check's floor hold ~2e-17 of rounding each, 2e-12 in all:
    more than delta_error / 2 = 5e-13, so the check used to refuse this ordinary query."""
    kw = dict(noise_multiplier=1.0, sample_rate=0.01, steps=100_000, delta=1e-9)
    ref = pld_epsilon([(1.0, 0.01, 100_000)], 1e-9)
    assert ref <= compute_epsilon(**kw) <= 1.01 * ref
