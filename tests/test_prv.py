"""prv-accountant through ``accounting.prv``: the library's own pipeline, and where it refuses."""

from __future__ import annotations

import warnings

import pytest
from prv_accountant import PRVAccountant
from prv_accountant.privacy_random_variables import PoissonSubsampledGaussianMechanism

from test_pld import pld_epsilon
from ultralytics_dp.accounting import prv
from ultralytics_dp.accounting.pld import Segment


@pytest.mark.parametrize("sigma,q,steps,delta", [(1.25, 0.128, 6, 1e-5), (0.64, 0.75, 27, 1e-5),
                                                 (1.0, 0.01, 1000, 1e-5), (5.0, 1.0, 100, 1e-6)])
def test_the_bounds_are_prv_accountants_own(sigma, q, steps, delta):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        library = PRVAccountant(prvs=[PoissonSubsampledGaussianMechanism(q, sigma)], max_self_compositions=[steps],
                                eps_error=0.01, delta_error=delta / 1000).compute_epsilon(delta, [steps])
    ours = prv.epsilon_bounds([Segment(sigma, q, steps)], delta, 0.01 / prv.REL_ERROR)  # the same eps_error
    assert ours == pytest.approx(library, rel=1e-6)


def test_bounds_where_prv_accountant_0_2_refuses_bracket_an_independent_reference():
    """epsilon 8 over 8 steps at q 0.128 (the demo's kind of run): the library's one-piece integral of
    the mean makes it refuse; integrated piecewise, its bounds bracket dp_accounting's PLD."""
    sigma, q, steps, delta = 0.63626, 0.128, 8, 1e-5
    with pytest.raises(RuntimeError, match="Discrete mean"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PRVAccountant(prvs=[PoissonSubsampledGaussianMechanism(q, sigma)], max_self_compositions=[steps],
                      eps_error=0.04, delta_error=delta / 1000).compute_epsilon(delta, [steps])
    lower, _, upper = prv.epsilon_bounds([Segment(sigma, q, steps)], delta, 8.0)
    reference = pld_epsilon([(sigma, q, steps)], delta)
    assert lower <= reference <= upper and upper - lower <= 2.1 * prv.REL_ERROR * 8.0


@pytest.mark.parametrize("q, sigma, k", [(0.00512, 0.6123, 5), (0.1, 0.7, 2)])
def test_a_mixtures_truncated_mean_by_gauss_legendre_is_quads(q, sigma, k):
    """A person's mixture (``prv._Mixture``) takes its truncated mean from one vectorised
    Gauss-Legendre sum; ``quad``, piece by piece on the same pieces, agrees to 1e-9."""
    import numpy as np
    from scipy import integrate

    from ultralytics_dp.accounting import mixture, prv

    truncated = prv._Truncated(prv._Mixture(q, sigma, k), -30.0, 60.0)
    low, high = -np.logspace(np.log10(30.0), -5, 12), np.logspace(-5, np.log10(60.0), 12)
    points = np.sort(np.append(np.concatenate([low, [0.0], high]), float(mixture.log_weights(q, k)[0])))
    cdf = lambda t: float(truncated.cdf(np.array([t]))[0])  # noqa: E731
    by_quad = sum(r * cdf(r) - l * cdf(l) - integrate.quad(cdf, l, r, limit=500)[0]
                  for l, r in zip(points[:-1], points[1:]))
    assert truncated.mean() == pytest.approx(by_quad, abs=1e-9)


def test_a_mixture_too_large_for_memory_claims_nothing_rather_than_crash():
    """A person with 50 images over an epsilon-8-per-image run: prv-accountant's grid would hold
    hundreds of millions of points (a review ran out of memory); the release claims no epsilon."""
    import math

    from ultralytics_dp.accounting.accountant import release

    released = release([Segment(0.61202, 256 / 50_000, 5860, images=50)], 1e-5)
    assert released.epsilon == math.inf and released.by_accountant["pld"] > 1000
