"""The second, independent accountant: Microsoft's ``prv-accountant`` (Gopi, Lee, Wutschitz 2021,
"Numerical composition of differential privacy"), the reference implementation of the privacy
random variable accountant, on the package's segments.

It discretises each step's privacy loss on a mean-preserving grid whose error it bounds
(Theorem 5.5 of the paper), and returns a lower bound, an estimate and an upper bound on epsilon;
``eps_error`` (their half-width) is set here to ``REL_ERROR`` of the epsilon the own accountant
found, and ``delta_error`` to delta / 1000. Its grid grows as sqrt(T) / eps_error, so it is called
where a number is released (plans, epoch ends, checkpoints, ledger queries), not per step.

``epsilon_bounds`` is ``PRVAccountant``'s pipeline, step for step (safe domain, mesh, truncation,
cell-centred discretisation, heterogeneous composition, epsilon bounds), with one repair: the
mean of a truncated step, which the discretisation matches, is integrated over logarithmically
spaced pieces on both sides of 0. prv-accountant 0.2.0 integrates [0.1, t_max] in one piece, and
at small sigma over a wide domain (e.g. sigma 0.64, q 0.128: epsilon 8 over 8 steps, the demo's
run) that integral is so far off that it refuses ("Discrete mean differs from continuous mean
significantly"). Opacus' copy of the same code integrates as here.

Privacy assumptions relied on here: every step is the Poisson-subsampled Gaussian mechanism with
sampling rate q and noise multiplier sigma (``PoissonSubsampledGaussianMechanism``, the same pair
as ``pld``); segments with equal (sigma, q) are composed together, distinct ones heterogeneously.
This module must not import torch or Ultralytics.
"""

from __future__ import annotations

import warnings
from importlib.metadata import version
from typing import Sequence

import numpy as np
from scipy import integrate

from prv_accountant import composers, discretisers
from prv_accountant.accountant import compute_safe_domain_size
from prv_accountant.domain import Domain
from prv_accountant.privacy_random_variables import PoissonSubsampledGaussianMechanism, PrivacyRandomVariableTruncated

from .pld import Segment

NAME = "prv_accountant"
VERSION = version("prv-accountant")
REL_ERROR = 0.005  # eps_error, relative to the epsilon being bounded
MIN_EPS_ERROR = 1e-4  # ... and absolute, where epsilon is near 0


class _Truncated(PrivacyRandomVariableTruncated):
    """A step's privacy loss truncated to the domain, its mean integrated piecewise on a log scale."""

    def mean(self) -> float:
        # E[Y] = [t F(t)] - integral of F, over pieces from 1e-5 out to |t_min| and to t_max, each
        # a smooth, well-scaled stretch of the CDF for ``quad``
        low = -np.logspace(np.log10(abs(self.t_min)), -5, 12)
        high = np.logspace(-5, np.log10(self.t_max), 12)
        points = np.concatenate([low, [0.0], high])
        total = 0.0
        for left, right in zip(points[:-1], points[1:]):
            piece, _ = integrate.quad(self.cdf, left, right, limit=500)
            total += right * self.cdf(right) - left * self.cdf(left) - piece
        return float(total)


def epsilon_bounds(segments: Sequence[Segment], delta: float, estimate: float) -> tuple[float, float, float]:
    """(lower, estimate, upper) bounds on epsilon of composing ``segments`` at ``delta``; ``estimate``
    (the own accountant's figure) sizes eps_error. Segments must be merged (one per (sigma, q))."""
    prvs = [PoissonSubsampledGaussianMechanism(sampling_probability=s.sample_rate, noise_multiplier=s.noise_multiplier)
            for s in segments]
    counts = [s.steps for s in segments]
    eps_error, delta_error = max(REL_ERROR * estimate, MIN_EPS_ERROR), delta / 1000
    with warnings.catch_warnings():  # its RDP domain sizing warns on orders it cannot use
        warnings.simplefilter("ignore")
        size = compute_safe_domain_size(prvs, counts, eps_error=eps_error, delta_error=delta_error)
        mesh = eps_error / np.sqrt(sum(counts) / 2 * np.log(12 / delta_error))  # Theorem 5.5
        domain = Domain.create_aligned(-size, size, mesh)
        steps = [discretisers.CellCentred().discretise(_Truncated(p, domain.t_min(), domain.t_max()), domain)
                 for p in prvs]
        composed = composers.Heterogeneous(steps).compute_composition(num_self_compositions=counts)
        lower, middle, upper = composed.compute_epsilon(delta, delta_error, eps_error)
    return float(lower), float(middle), float(upper)
