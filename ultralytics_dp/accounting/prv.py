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

A segment of a person's k images (``Segment.images`` > 1) is the Binomial mixture of
``mixture``: prv-accountant has no such mechanism, so ``_Mixture`` gives it the mixture's CDF (its
one required method) and, for sizing the domain only, an RDP upper bound (k subsampled Gaussians
at sigma / sqrt(k), a post-processing of which the step is); the discretisation and composition
are prv-accountant's own.

Privacy assumptions relied on here: every step is the Poisson-subsampled Gaussian mechanism with
sampling rate q and noise multiplier sigma (``PoissonSubsampledGaussianMechanism``, the same pair
as ``pld``), or the mixture above; segments with equal (sigma, q, images) are composed together,
distinct ones heterogeneously.
This module must not import torch or Ultralytics.
"""

from __future__ import annotations

import math
import warnings
from importlib.metadata import version
from typing import Sequence

import numpy as np
from scipy import integrate

from prv_accountant import composers, discretisers
from prv_accountant.accountant import compute_safe_domain_size
from prv_accountant.domain import Domain
from prv_accountant.privacy_random_variables import (PoissonSubsampledGaussianMechanism, PrivacyRandomVariable,
                                                     PrivacyRandomVariableTruncated)

from . import mixture
from .pld import Segment

NAME = "prv_accountant"
VERSION = version("prv-accountant")
REL_ERROR = 0.005  # eps_error, relative to the epsilon being bounded
MIN_EPS_ERROR = 1e-4  # ... and absolute, where epsilon is near 0
GAUSS_NODES = 96  # per piece, for a mixture's mean (checked against ``quad`` in tests/test_prv.py)
# a mixture's grid (sized by a loose RDP bound: k subsampled Gaussians at sigma / sqrt(k)) may not
# exceed this many points (about 15 s and 1 GiB at the cap on this project's CPU); beyond it
# prv-accountant finds no bound and the released epsilon is infinite: nothing is claimed. That is
# a person with 20 images over the 5,860 steps of an epsilon-8-per-image run (16.6 million points;
# 10 images: 3.5 million), whose epsilon is in the hundreds anyway, or an epsilon of ~0.03 at
# q ~ 1e-5 (a fine mesh)
MAX_MIXTURE_POINTS = 5 * 10**6
CDF_CHUNK = 1 << 20  # points per evaluation of a mixture's CDF (memory: points x (k + 1) floats)


class _Truncated(PrivacyRandomVariableTruncated):
    """A step's privacy loss truncated to the domain, its mean integrated piecewise on a log scale."""

    def mean(self) -> float:
        # E[Y] = [t F(t)] - integral of F, over pieces from 1e-5 out to |t_min| and to t_max, each
        # a smooth, well-scaled stretch of the CDF for ``quad``
        low = -np.logspace(np.log10(abs(self.t_min)), -5, 12)
        high = np.logspace(-5, np.log10(self.t_max), 12)
        points = np.concatenate([low, [0.0], high])
        if isinstance(self.prv, _Mixture):
            return self._mean_by_gauss_legendre(points)
        total = 0.0
        for left, right in zip(points[:-1], points[1:]):
            piece, _ = integrate.quad(self.cdf, left, right, limit=500)
            total += right * self.cdf(right) - left * self.cdf(left) - piece
        return float(total)

    def _mean_by_gauss_legendre(self, points: np.ndarray) -> float:
        """The same integral in one vectorised call of the CDF (a mixture's CDF costs a root-finding
        per point, too slow for ``quad``'s scalar calls): Gauss-Legendre on each piece, the CDF's
        lower end (log b_0, where the support starts) a piece boundary too."""
        bottom = float(mixture.log_weights(self.prv.q, self.prv.k)[0])
        if points[0] < bottom < points[-1]:
            points = np.sort(np.append(points, bottom))
        nodes, weights = np.polynomial.legendre.leggauss(GAUSS_NODES)
        half, mid = np.diff(points) / 2, (points[1:] + points[:-1]) / 2
        x = mid[:, None] + half[:, None] * nodes[None, :]
        integral = float((half[:, None] * weights[None, :] * self.cdf(x.ravel()).reshape(x.shape)).sum())
        return float(points[-1] * self.cdf(points[-1]) - points[0] * self.cdf(points[0]) - integral)


class _Mixture(PrivacyRandomVariable):
    """A person's k images in one step of a per-image run (``mixture``)."""

    def __init__(self, sample_rate: float, noise_multiplier: float, images: int) -> None:
        self.q, self.sigma, self.k = sample_rate, noise_multiplier, images
        self.split = PoissonSubsampledGaussianMechanism(sampling_probability=sample_rate,
                                                        noise_multiplier=noise_multiplier / np.sqrt(images))

    def cdf(self, t: np.ndarray) -> np.ndarray:
        flat = np.asarray(t, dtype=np.float64).ravel()
        out = np.empty_like(flat)
        for start in range(0, flat.size, CDF_CHUNK):
            log_p, _ = mixture.log_tails(flat[start:start + CDF_CHUNK], self.q, self.sigma, self.k)
            out[start:start + CDF_CHUNK] = -np.expm1(log_p)
        return out.reshape(np.shape(t))

    def rdp(self, alpha: float) -> float:
        return self.k * self.split.rdp(alpha)


def _mechanism(segment: Segment) -> PrivacyRandomVariable:
    if segment.images > 1:
        return _Mixture(segment.sample_rate, segment.noise_multiplier, segment.images)
    return PoissonSubsampledGaussianMechanism(sampling_probability=segment.sample_rate,
                                              noise_multiplier=segment.noise_multiplier)


def epsilon_bounds(segments: Sequence[Segment], delta: float, estimate: float) -> tuple[float, float, float]:
    """(lower, estimate, upper) bounds on epsilon of composing ``segments`` at ``delta``; ``estimate``
    (the own accountant's figure) sizes eps_error. Segments must be merged (one per (sigma, q))."""
    prvs = [_mechanism(s) for s in segments]
    counts = [s.steps for s in segments]
    eps_error, delta_error = max(REL_ERROR * estimate, MIN_EPS_ERROR), delta / 1000
    with warnings.catch_warnings():  # its RDP domain sizing warns on orders it cannot use
        warnings.simplefilter("ignore")
        size = compute_safe_domain_size(prvs, counts, eps_error=eps_error, delta_error=delta_error)
        mesh = eps_error / np.sqrt(sum(counts) / 2 * np.log(12 / delta_error))  # Theorem 5.5
        if any(isinstance(p, _Mixture) for p in prvs) and 2 * size / mesh > MAX_MIXTURE_POINTS:
            return math.inf, math.inf, math.inf  # no bound within memory: nothing is claimed
        domain = Domain.create_aligned(-size, size, mesh)
        steps = [discretisers.CellCentred().discretise(_Truncated(p, domain.t_min(), domain.t_max()), domain)
                 for p in prvs]
        composed = composers.Heterogeneous(steps).compute_composition(num_self_compositions=counts)
        lower, middle, upper = composed.compute_epsilon(delta, delta_error, eps_error)
    return float(lower), float(middle), float(upper)
