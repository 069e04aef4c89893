"""The privacy loss of one step as a person with k images sees a per-image run: a Binomial mixture
of Gaussians (Ganesh 2024, Thm 3.1; dp_accounting's ``MixtureOfGaussiansDpEvent``).

In units of C, with J ~ Binomial(k, q) of the person's images in the step (each clipped to C and
pointing, at worst, the same way), the step is the pair

    P = sum_j b_j N(j, sigma^2)   against   Q = N(0, sigma^2),   b_j = C(k, j) q^j (1 - q)^(k - j),

and its privacy loss Y = log(dP/dQ)(X) = log sum_j b_j exp((2 j X - j^2) / (2 sigma^2)), X ~ P. For
k = 1 it is the Poisson-subsampled Gaussian. Y grows with X (a log-sum-exp of increasing affine
functions, convex too), so Y >= t iff X >= x_t, the root of loss(x) = t, found by Newton's method
from a point above it (a convex increasing function: the iterates fall monotonically onto the
root); tails then follow from the normal tail of each component, in logs. Both accountants
(``pld``, ``prv``) read the step through these functions.

Privacy assumption relied on here: the person's images are sampled independently with
probability q each (``mechanism.sampling``), and the worst case puts their clipped gradients on one
line (the mixture's shifts add up), which is what Ganesh's theorem shows dominates.
This module must not import torch or Ultralytics.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy import special

NEWTON_STEPS = 60  # far more than the root needs from its upper bracket (quadratic convergence)


@lru_cache(maxsize=256)
def log_weights(q: float, k: int) -> np.ndarray:
    """[k + 1] log b_j = log P[Binomial(k, q) = j] (q < 1)."""
    j = np.arange(k + 1)
    return special.gammaln(k + 1) - special.gammaln(j + 1) - special.gammaln(k - j + 1) + j * math.log(q) + (
        k - j) * math.log1p(-q)


def loss(x: np.ndarray | float, q: float, sigma: float, k: int) -> np.ndarray:
    """The privacy loss log(dP/dQ) at x."""
    x = np.asarray(x, dtype=np.float64)
    j = np.arange(k + 1)
    return special.logsumexp(log_weights(q, k) + (2 * j * x[..., None] - j * j) / (2 * sigma**2), axis=-1)


def inverse(t: np.ndarray, q: float, sigma: float, k: int) -> np.ndarray:
    """x_t with loss(x_t) = t, for t > log b_0 (below it the loss never goes)."""
    t = np.asarray(t, dtype=np.float64)
    log_b, j = log_weights(q, k), np.arange(k + 1, dtype=np.float64)
    # above the root: loss(x) >= log b_k + (2 k x - k^2) / (2 sigma^2)
    x = ((sigma**2 * (t - log_b[-1])) / k + k / 2).ravel()
    target, active = t.ravel(), np.arange(x.size)
    for _ in range(NEWTON_STEPS):  # only the points not yet at their root
        terms = log_b + (2 * j * x[active, None] - j * j) / (2 * sigma**2)
        top = terms.max(axis=1, keepdims=True)
        weights = np.exp(terms - top)
        total = weights.sum(axis=1)
        value, slope = top[:, 0] + np.log(total), (weights @ j) / total / sigma**2
        step = np.maximum((value - target[active]) / slope, 0.0)  # from above, never past the root
        x[active] -= step
        active = active[step > 1e-15 * np.maximum(np.abs(x[active]), 1.0)]
        if not active.size:
            break
    return x.reshape(t.shape)


def log_tails(t: np.ndarray, q: float, sigma: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(log P[Y >= t], log Q[Y >= t]) for one step's loss Y; both 0 where t <= log b_0."""
    t = np.asarray(t, dtype=np.float64)
    inside = t > log_weights(q, k)[0]
    x = inverse(np.where(inside, t, 1.0), q, sigma, k)
    terms = log_weights(q, k) + special.log_ndtr((np.arange(k + 1) - x[..., None]) / sigma)
    top = terms.max(axis=-1)
    log_p = top + np.log(np.exp(terms - top[..., None]).sum(axis=-1))
    log_q = special.log_ndtr(-x / sigma)
    return np.where(inside, log_p, 0.0), np.where(inside, log_q, 0.0)
