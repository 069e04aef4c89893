"""A person's k images in a per-image step: the mixture's loss, its inverse, and the discretised
step against delta computed by direct numerical integration of the two densities."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate, stats

from ultralytics_dp.accounting import mixture
from ultralytics_dp.accounting.pld import _step


def exact_delta(eps: float, sigma: float, q: float, k: int) -> float:
    """delta(eps) = integral of (p(x) - e^eps q(x))_+, p the Binomial(k, q) mixture of N(j, sigma^2),
    q = N(0, sigma^2): the densities themselves, no loss function, no root-finding."""
    weights = stats.binom.pmf(np.arange(k + 1), k, q)

    def excess(x: float) -> float:
        p = float(weights @ stats.norm.pdf(x, loc=np.arange(k + 1), scale=sigma))
        return max(p - np.exp(eps) * stats.norm.pdf(x, scale=sigma), 0.0)

    lo, hi = -12 * sigma, k + 12 * sigma
    return integrate.quad(excess, lo, hi, limit=400, points=np.linspace(lo, hi, 40), epsabs=1e-13)[0]


@pytest.mark.parametrize("sigma, q, k, h", [(1.0, 0.1, 3, 0.02), (0.7, 0.05, 5, 0.05), (2.0, 0.3, 2, 0.01)])
def test_a_discretised_mixture_step_overstates_delta_everywhere_and_matches_it_on_the_grid(sigma, q, k, h):
    tail = 1e-12
    step = _step(sigma, q, h, tail, k)
    assert step.pmf.min() >= 0 and abs(step.pmf.sum() + step.infinity - 1) < 1e-12 and step.infinity <= tail
    t = h * (step.first + np.arange(len(step.pmf)))

    def delta_of(eps: float) -> float:
        return step.infinity + float(step.pmf @ np.clip(-np.expm1(eps - t), 0, None))

    for eps in np.random.default_rng(0).uniform(max(t[0], -0.5), min(t[-1], 8.0), 25):
        assert delta_of(eps) >= exact_delta(eps, sigma, q, k) - 1e-10, eps
    for eps in t[(t > -0.5) & (t < 8.0)][::40]:
        assert delta_of(eps) == pytest.approx(exact_delta(eps, sigma, q, k), abs=1e-9), eps


def test_the_inverse_finds_the_loss_root_across_its_range():
    for q, sigma, k in ((0.00512, 0.6123, 5), (0.3, 2.0, 10), (0.5, 0.3, 20)):
        t = np.concatenate([mixture.log_weights(q, k)[0] + np.logspace(-12, 0, 50), np.linspace(0, 300, 200)])
        x = mixture.inverse(t, q, sigma, k)
        assert np.abs(mixture.loss(x, q, sigma, k) - t).max() <= 1e-12 * max(1.0, np.abs(t).max())


def test_one_image_is_the_subsampled_gaussian():
    from ultralytics_dp.accounting.pld import _log_tails

    t = np.linspace(-0.004, 50, 500)
    ours, closed = mixture.log_tails(t, 0.004, 0.8, 1), _log_tails(t, 0.004, 0.8)
    assert np.allclose(ours[0], closed[0], atol=1e-10) and np.allclose(ours[1], closed[1], atol=1e-10)
