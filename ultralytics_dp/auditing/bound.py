"""The lower bound of a one-run privacy audit (Steinke, Nasr and Jagielski, NeurIPS 2023,
"Privacy Auditing with One (1) Training Run", Theorem 5.2 and its Algorithm for delta > 0).

Setting: m canaries, each included in the training run independently with probability 1/2. After
the run the auditor guesses "in" or "out" for r of them (abstaining on the rest) and gets v right.
If the run is (epsilon, delta)-DP with respect to each canary, then

    P[v or more correct] <= beta(eps) + 2 m delta * alpha(eps),
    beta  = P[Binomial(r, p) >= v],            p = e^eps / (1 + e^eps)  (eps-randomised response),
    alpha = max_{1 <= i <= v} P[v - i <= Binomial(r, p) < v] / i.

So when that probability is below 1 - confidence, the run is not (eps, delta)-DP, at that
confidence. ``epsilon_lower_bound`` returns the largest such eps. A run that is not (eps, delta)-DP
is not (eps', delta)-DP for any eps' < eps either, so the sup over a bisection's accepted points is
a valid bound even where the tail is not monotone in eps (the bisection is then conservative).

Choosing how many to guess after looking at the scores would void the confidence; ``best_guess``
tries a fixed list of guesses and splits the confidence over them (Bonferroni), so the bound it
reports holds at the stated confidence whichever wins.

This module needs scipy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

from .. import checks

# "in" guesses tried, as fractions of m/2 (each with as many "out" guesses, and with none)
GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
_BISECTION_STEPS = 60
_EPS_CAP = 100.0  # no audit of m < 1e40 canaries can show more


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses correct] under (epsilon, delta)-DP, bounded as in the theorem."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got {v}, {r}, {m}")
    checks.finite_positive("epsilon", epsilon, allow_zero=True)
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    p = 1.0 / (1.0 + math.exp(-epsilon))
    beta = stats.binom.sf(v - 1, r, p)
    if delta == 0 or v == 0:
        return float(min(beta, 1.0))
    # P[v - i <= B < v] for i = 1..v, as cumulative sums of the pmf below v
    below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, p))
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return float(min(beta + 2 * m * delta * alpha, 1.0))


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float) -> float:
    """The largest epsilon that v correct of r guesses refute at ``confidence`` (0 if none)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    level = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) > level:
        return 0.0
    lo, hi = 0.0, _EPS_CAP  # p_value(lo) <= level throughout
    if p_value(m, r, v, hi, delta) <= level:
        return hi
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) <= level else (lo, mid)
    return lo


@dataclass(frozen=True)
class Guess:
    """The winning guess count: ``guesses`` made, ``correct`` among them, and the bound."""

    canaries: int
    guesses: int
    correct: int
    epsilon_lb: float
    confidence: float


def _candidates(m: int) -> list[tuple[int, int]]:
    """The (k_in, k_out) guess sets tried on m canaries: k_in "in" guesses on the highest scores,
    and k_out = k_in or 0 "out" guesses on the lowest."""
    ks = sorted({min(max(1, round(f * m / 2)), m // 2) for f in GUESS_FRACTIONS})
    return [(k, out) for k in ks for out in (k, 0)]


def ceiling(m: int, delta: float, confidence: float) -> float:
    """The largest bound an audit of m canaries can show (every guess right): a claimed epsilon at or
    above it can never be refuted by ``best_guess``, however broken the mechanism."""
    candidates = _candidates(m)
    each = 1.0 - (1.0 - confidence) / len(candidates)
    return max(epsilon_lower_bound(m, k_in + k_out, k_in + k_out, delta, each) for k_in, k_out in candidates)


def best_guess(scores: Sequence[float], included: Sequence[bool], delta: float, confidence: float) -> Guess:
    """Guess "in" for the k highest scores, and either "out" for the k lowest too or abstain on
    them, for every k of ``GUESS_FRACTIONS`` (of m/2). A canary that was in but never sampled looks
    like one that was out, so in a subsampled run the "in" guesses alone are often the sharper test.
    Each of the candidate guesses is tested at confidence 1 - (1 - confidence)/candidates, so the
    best bound holds at ``confidence``."""
    s = np.asarray(scores, dtype=float)
    inc = np.asarray(included, dtype=bool)
    m = len(s)
    if m < 2 or len(inc) != m:
        raise ValueError(f"need at least 2 canaries with one score each, got {m} scores for {len(inc)} canaries")
    if not np.all(np.isfinite(s)):
        raise ValueError("canary scores must be finite")
    candidates = _candidates(m)
    each = 1.0 - (1.0 - confidence) / len(candidates)
    order = np.argsort(s, kind="stable")
    best = Guess(m, 0, 0, 0.0, confidence)
    for k_in, k_out in candidates:
        v = int(inc[order[m - k_in:]].sum() + (~inc[order[:k_out]]).sum())
        eps = epsilon_lower_bound(m, k_in + k_out, v, delta, each)
        if eps > best.epsilon_lb or best.guesses == 0:
            best = Guess(m, k_in + k_out, v, eps, confidence)
    return best
