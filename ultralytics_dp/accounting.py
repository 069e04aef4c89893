"""Privacy accounting for DP-SGD with the PRV accountant (Gopi, Lee, Wutschitz 2021).

Privacy assumptions relied on here:

* Every optimizer step is one Poisson-subsampled Gaussian mechanism: each record is in the batch
  independently with probability q, the summed clipped gradients have L2 sensitivity C under
  adding/removing one record, and the noise is N(0, (sigma*C)^2). The accountant sees only
  (sigma, q, steps); the caller must make those true (see ``sampling`` and ``mechanism``).
* delta is the caller's: it should be well below 1/N.
* The reported epsilon is the PRV accountant's rigorous **upper** bound, never the estimate.
* That bound holds if the grid's domain [-L, L] holds all but delta_error of the composed PRV's
  mass, read on the window where it lies (``_centred``). L comes from an RDP bound on the upper
  tail (remark 5.6 of Gopi et al. 2021); the lower tail needs none (P[Y <= -t] <= e^(-t) for any
  PRV). A sanity check refuses a composition whose tail visibly wrapped around the grid; it is
  blind for small domains, so the bound rests on the sizing and the window, not on the check.

We use ``prv_accountant``'s privacy random variable (the mechanism's CDF), its domain and its
Fourier/heterogeneous composers, with its grid sizes (mesh and domain, Gopi et al. 2021) unchanged,
and fix four numerical traps of its 0.2.0 release:

1. ``eps_error`` is absolute. We size it to the epsilon being computed (from the RDP bound,
   refined by a second pass if RDP was much looser), so the upper bound stays within 1% of the
   true epsilon at small and large epsilon alike.
2. Its truncated PRV forgets to subtract the CDF at the lower truncation point and integrates
   the mean on fixed points near 0, which fails at large epsilon ("Discrete mean differs from
   continuous mean significantly") or biases it. ``_TruncatedPRV`` fixes both.
3. Its Fourier composer reads the composed PRV on a window moved by T times one step's mean-keeping
   shift; with a tiny q over millions of steps that can exceed the domain's slack, and the upper tail
   wraps around the circular grid (epsilon too small). ``_centred`` reads it where it lies, and
   ``_Composition`` refuses a composition with mass where no PRV can put it (a domain too narrow).
4. Cost grows as ``eps_error`` shrinks, so searches are steered on a grid ``COARSE`` times coarser
   (sized to the search's target) and only their answer is settled with ``compute_epsilon``; a large
   grid's eps_error is sized from an estimate on such a grid rather than from the looser RDP bound.

Speed (issue 16; each piece computes what prv_accountant computes, tested against it):
* ``_rdp``: the RDP curve of one (sigma, q) once, integer orders 2-256 in closed form, cached
  (prv_accountant's pure-Python series used to be most of a query). The orders reach 256 so that
  RDP can bracket small epsilon. Where RDP is the answer itself (``max_steps`` beyond
  ``GRID_STEPS``), it is a valid bound at every order it uses: fewer orders only make it looser.
* ``_TruncatedPRV.mean``: a fixed Gauss-Legendre rule on the CDF's smooth pieces instead of
  adaptive quadrature (the same value to ~1e-7, tested).
* ``_discretise``: the CDF once per cell edge, and only on the mechanism's support.
* ``_solve_epsilon``: epsilon from the composed grid on a window located by tail sums, in float64.
* Grids are sized for the step count rounded up (``_sized``) with eps_error on a ladder, and kept
  (``_composition``), so the queries of one search (T and T + 1) share one discretisation.
* A large grid's domain is sized by RDP with fractional orders too (``_domain_epsilon``), as
  prv_accountant does: for small sigma, integer orders alone made domains, and grids, ~100x larger.
  A grid that integer orders already keep under ``CHEAP_GRID_POINTS`` skips their series (~20-90 ms
  a sigma, most of a run's set-up: calibrating sigma for 8 steps took 0.38 s, now 0.08 s).
What is left is the grid itself: its points grow as (epsilon + 3) * sqrt(T) / eps_error, so a
small epsilon over very many steps (epsilon 0.1 over 1e5 steps at q = 1e-4) still takes seconds.
This module must not import Ultralytics.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass
from functools import lru_cache, wraps
from typing import Callable, Iterable, Sequence

import numpy as np
from prv_accountant import PoissonSubsampledGaussianMechanism
from prv_accountant.composers import ConvolutionTree, Fourier
from prv_accountant.discrete_privacy_random_variable import DiscretePrivacyRandomVariable
from prv_accountant.domain import Domain
from scipy import special
from scipy.fft import next_fast_len

ACCOUNTANT_NAME = "prv"
REL_ERROR = 0.004  # eps_error as a fraction of epsilon: upper - true <= ~2 * eps_error < 1%
MIN_EPS_ERROR = 1e-4
MAX_NOISE_MULTIPLIER = 1e4
MAX_STEPS = 10**9
GRID_STEPS = 10**7  # above this many steps, max_steps answers with the RDP budget (a grid would not fit in memory)
# a PRV grid holds at most this many points (~100 bytes a point at its peak, a few seconds): beyond,
# its mesh is coarser and its eps_error larger (``_domain``)
MAX_GRID_POINTS = 2 * 10**7
CHEAP_GRID_POINTS = 2**17  # a grid this small costs less than sizing it with fractional RDP orders
RDP_ORDERS = np.arange(2, 257)  # integer orders only: closed form, vectorised (see _rdp)
FRACTIONAL_ORDERS = np.array([1.1, 1.25, 1.5, 1.75])  # only to size grids (see _domain_epsilon)
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(64)
COARSE = 8.0  # how much coarser than a reported figure's the grid that steers a search is
SIGMA_DIGITS = 5  # a calibrated sigma is rounded up to this many significant digits


@dataclass(frozen=True)
class Segment:
    """``steps`` compositions of the Poisson-subsampled Gaussian mechanism with (sigma, q)."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def _check_finite_positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_segment(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    _check_finite_positive("noise_multiplier", noise_multiplier)
    if not isinstance(sample_rate, (int, float)) or not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")


def _check_delta(delta: float) -> None:
    if not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _mechanism_cdf(t: np.ndarray, q: float, sigma: float) -> np.ndarray:
    """CDF of the Poisson-subsampled Gaussian PRV (Gopi et al. 2021, Prop. B4), in float64.

    The same formula as ``prv_accountant``'s ``PoissonSubsampledGaussianMechanism.cdf``, which
    evaluates it through long-double logs; written with ``expm1``/``log1p`` it is as accurate in
    float64 and several times faster, which matters on grids of millions of points.
    """
    t = np.asarray(t, dtype=np.float64)
    support = t > (math.log1p(-q) if q < 1 else -np.inf)
    ts = np.where(support, t, 1.0)
    with np.errstate(over="ignore", divide="ignore"):
        # z = log((e^t + q - 1) / q), stable on both sides of 0
        z = np.where(ts > 0, ts + np.log1p((q - 1) * np.exp(-ts)) - math.log(q), np.log1p(np.expm1(ts) / q))
    a = (2 * z * sigma**2 - 1) / (2 * math.sqrt(2) * sigma)
    b = (2 * z * sigma**2 + 1) / (2 * math.sqrt(2) * sigma)
    return np.where(support, 1.0 - q / 2 * special.erfc(a) - (1 - q) / 2 * special.erfc(b), 0.0)


class _TruncatedPRV:
    """The mechanism's PRV conditioned on [t_min, t_max], with a correct CDF and a mean whose
    integration points follow the domain (log-spaced out to both truncation points)."""

    pm_inf = 0.0

    def __init__(self, prv: PoissonSubsampledGaussianMechanism, t_min: float, t_max: float) -> None:
        self.q, self.sigma = float(prv.p), float(prv.sigma)
        self.t_min, self.t_max = t_min, t_max
        self._cdf_min = float(_mechanism_cdf(t_min, self.q, self.sigma))
        self._mass = float(_mechanism_cdf(t_max, self.q, self.sigma)) - self._cdf_min

    def cdf(self, t: np.ndarray | float) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        inside = (_mechanism_cdf(np.clip(t, self.t_min, self.t_max), self.q, self.sigma) - self._cdf_min) / self._mass
        return np.where(t < self.t_min, 0.0, np.where(t < self.t_max, inside, 1.0))

    def probability(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self.cdf(b) - self.cdf(a)

    def mean(self) -> float:
        # E[X] = t_max - integral of the CDF over [t_min, t_max], split where the CDF bends (log-spaced
        # towards 0 and the truncation points, and at the support's edge log(1-q), where it has a
        # kink); on each piece the CDF is smooth, so a 64-point Gauss-Legendre rule is exact to
        # rounding (tested against adaptive quadrature), in one vectorised CDF evaluation
        lo = np.log10(max(abs(self.t_min), 1e-4))
        hi = np.log10(max(self.t_max, 1e-4))
        edge = [math.log1p(-self.q)] if self.q < 1 else []
        points = np.concatenate(
            [[self.t_min], -np.logspace(lo, -5, 12), [0.0], np.logspace(-5, hi, 12), [self.t_max], edge]
        )
        points = np.unique(np.clip(points, self.t_min, self.t_max))
        a, b = points[:-1, None], points[1:, None]
        x = (b - a) / 2 * _GL_NODES + (a + b) / 2
        integral = float(((b - a) / 2 * _GL_WEIGHTS * self.cdf(x)).sum())
        return float(self.t_max - integral)


def _discretise(prv: _TruncatedPRV, domain: Domain) -> DiscretePrivacyRandomVariable:
    """Cell-centred discretisation with the mean preserved (prv_accountant's ``CellCentred``), faster.

    Each cell's mass is CDF(right edge) - CDF(left edge); neighbouring cells share an edge, so the
    CDF is evaluated once per edge (N + 1 points, not 2N), and the masses telescope to exactly 1.
    Below the mechanism's support (t <= log(1 - q)) the CDF is exactly 0, so it is not evaluated
    there: for small q that is the whole left half of the grid.
    """
    size, h = len(domain), domain.dt()
    edges = domain.t_min() - h / 2 + h * np.arange(size + 1)
    support = math.log1p(-prv.q) if prv.q < 1 else -math.inf
    start = max(int(np.searchsorted(edges, support, side="right")) - 1, 0)
    cdf = np.zeros(size + 1)
    cdf[start:] = prv.cdf(edges[start:])
    pmf = np.diff(cdf)
    # the continuous mean, kept by shifting the grid (what makes the rounding errors cancel over
    # compositions, Gopi et al. 2021); the shift must stay within half a cell
    centres = edges[:-1] + h / 2
    shift = prv.mean() - float(np.dot(centres, pmf))
    if not abs(shift) < h / 2:
        raise RuntimeError(f"discrete mean differs from the continuous mean by {shift:g} (cell {h:g})")
    return DiscretePrivacyRandomVariable(pmf, domain.shift_right(shift))


def _solve_epsilon(f_n: DiscretePrivacyRandomVariable, delta: float) -> float:
    """The epsilon at which a composed discrete PRV's delta(epsilon) equals ``delta``.

    prv_accountant's ``DiscretePrivacyRandomVariable.compute_epsilon``, the same formula: on
    [t_(i-1), t_i], delta(eps) = sum_{s >= t_i} p_s (1 - e^(eps - s)), solved for eps at the first i
    where delta(t_i) <= delta (the mass at infinity is 0 here). Faster: for any PRV Y,
    (1 - 1/e) P[Y >= eps + 1] <= delta(eps) <= P[Y >= eps], so the answer lies in a window that the
    tail sums P[Y >= t] locate; within it the sums are taken relative to the window's start, so no
    e^t overflows float64 (prv_accountant uses long double on the whole grid, slow at large epsilon).
    Long double where the window is wider than float64's exponent allows; if the answer is not
    strictly inside the window (FFT rounding in the tails), the whole grid is the window.
    """
    pmf, size = f_n.pmf, len(f_n.pmf)
    t_min, h = float(f_n.domain.t_min()), float(f_n.domain.dt())
    if np.finfo(np.longdouble).eps * size > delta:  # prv_accountant's check
        raise ValueError(f"delta={delta:g} is too small for a grid of {size} points; raise delta")
    tail = np.cumsum(pmf[::-1])[::-1]  # P[Y >= t_i]
    above = np.flatnonzero(tail >= delta)
    below = np.flatnonzero(tail <= delta / (1 - math.exp(-1)))
    windows = [(0, size)]
    if len(above) and len(below):
        first = max(int(below[0]) - math.ceil(1 / h) - 2, 0)  # epsilon >= t - 1 where the tail is that small
        last = min(int(above[-1]) + 2, size)  # epsilon <= the last t whose tail still holds delta
        windows.insert(0, (first, last))
    for first, last in windows:
        width = (last - first) * h
        if width < 11000:  # e^width fits long double (float64 up to e^700)
            eps = _solve_window(pmf, tail, t_min, h, first, last, delta, np.float64 if width < 600 else np.longdouble)
            if eps is not None:
                return eps
    raise RuntimeError(f"cannot compute epsilon at delta={delta:g} on this grid; please report it")


def _solve_window(pmf: np.ndarray, tail: np.ndarray, t_min: float, h: float, first: int, last: int,
                  delta: float, dtype: type) -> float | None:
    """The solution of delta(eps) = delta if it lies strictly inside grid points [first, last), else None.

    With r = t_first, e^(t_i) sum_{s >= i} p_s e^(-t_s) = e^(t_i - r) * D_i, D_i = sum_{s >= i} p_s e^(-(t_s - r)).
    """
    t = h * np.arange(len(pmf) - first, dtype=dtype)  # t_s - t_first
    weighted = np.cumsum((pmf[first:].astype(dtype) * np.exp(-t))[::-1])[::-1]  # D_i for i >= first
    n = last - first
    d1, d2 = tail[first:last].astype(dtype), weighted[:n]
    i = int(np.searchsorted(np.exp(t[:n]) * d2 - d1, -delta, side="left"))
    if i == 0 or i >= n:
        return None
    return float(np.log((d1[i] - delta) / d2[i]) + (t_min + h * first))


def _domain(segments: Sequence[Segment], eps_error: float, delta_error: float) -> tuple[Domain, float]:
    """prv_accountant's grid for the segments, and the eps_error it achieves: half-width from
    ``_safe_domain_size``, mesh eps_error / sqrt(T/2 log(12/delta_error)) (Gopi et al. 2021), widened
    symmetrically to an FFT-friendly even size (a larger domain is only safer; an awkward size, with
    large prime factors, makes every FFT several times slower). A grid that would exceed
    about ``MAX_GRID_POINTS`` gets a coarser mesh instead, and the eps_error that mesh guarantees: the
    upper bound stays rigorous, only looser (tiny epsilon over very many steps, or sigma so small
    that RDP sizes the domain very loosely)."""
    spread = math.sqrt(sum(s.steps for s in segments) / 2 * math.log(12 / delta_error))
    # integer RDP orders first; the fractional ones (a slow series) only where they may shrink a large grid
    length = _safe_domain_size(segments, eps_error, delta_error, False)
    fractional = 2 * length * spread / eps_error > CHEAP_GRID_POINTS
    if fractional:
        length = _safe_domain_size(segments, eps_error, delta_error, True)
    eps_error = max(eps_error, 2 * length * spread / MAX_GRID_POINTS)
    length = _safe_domain_size(segments, eps_error, delta_error, fractional)  # the domain grows with eps_error
    mesh = eps_error / spread
    size = len(Domain.create_aligned(-length, length, mesh))
    while (fast := next_fast_len(size, real=True)) % 2:
        size = fast + 1
    half = (fast // 2 - 1) * mesh
    return Domain.create_aligned(-half, half, mesh), eps_error


class _Composition:
    """Discretised PRVs for a list of segments, able to compose any step counts up to theirs.

    The grid is sized for the segments' step counts: composing fewer steps on it is as safe (its mesh
    is finer and its domain wider than those fewer steps need), which is what lets several queries
    share one discretisation."""

    def __init__(self, segments: Sequence[Segment], eps_error: float, delta_error: float) -> None:
        domain, self.eps_error = _domain(segments, eps_error, delta_error)
        self.size, self.delta_error = len(domain), delta_error
        prvs = [PoissonSubsampledGaussianMechanism(s.sample_rate, s.noise_multiplier) for s in segments]
        self.composers = [Fourier([_discretise(_TruncatedPRV(p, domain.t_min(), domain.t_max()), domain)])
                          for p in prvs]

    def compose(self, counts: Sequence[int]) -> DiscretePrivacyRandomVariable:
        """The discrete PRV of composing ``counts[i]`` steps of segment i: each segment by FFT
        (re-centred, ``_centred``), then the segments by linear convolution, as prv_accountant's
        ``Heterogeneous`` composer does."""
        parts = [_centred(c.compute_composition([n])) for c, n in zip(self.composers, counts)]
        f_n = ConvolutionTree(parts).compute_composition([1] * len(parts))
        self._check_nothing_wrapped(f_n)
        return f_n

    def _check_nothing_wrapped(self, f_n: DiscretePrivacyRandomVariable) -> None:
        """Refuse a composition whose upper tail visibly wrapped around the circular grid.

        A sanity check of the two things the bound rests on (the domain's RDP sizing and
        ``_centred``'s window), not part of the proof: mass beyond L would wrap to the grid's bottom
        and lower epsilon. Any PRV Y has P[Y <= -t] = E_Q[e^Y 1{Y <= -t}] <= e^(-t), and the grid's
        values are within eps_error of the true loss but for a fraction of delta_error (the mesh is
        chosen for that, Gopi et al. 2021). So below -(log(1/delta_error) + 3) - eps_error a correct
        grid holds under delta_error / 2, plus the FFT's float64 rounding, which is spread over the
        whole grid, of both signs and sometimes in smooth bumps (measured: up to ~5 machine epsilons
        per cell on large grids, hundreds on small ones): allowed for, per cell, at 4 times the most
        negative entry anywhere (no probability is negative) or 16 machine epsilons, whichever is
        larger. More is wrapped mass.
        Blind where L is below that floor (most queries: epsilon up to ~20 at delta 1e-5), to mass
        that overshoots L by more than L minus the floor, and, at small delta over large grids, to
        wraps smaller than the rounding allowance.
        """
        floor = -(math.log(1 / self.delta_error) + 3) - self.eps_error
        cells = max(math.ceil((floor - float(f_n.domain.t_min())) / float(f_n.domain.dt())), 0)
        stray = float(f_n.pmf[:cells].sum())
        rounding = max(16 * float(np.finfo(np.float64).eps), -4 * float(f_n.pmf.min()))
        allowed = self.delta_error / 2 + cells * rounding
        if stray > allowed:
            raise RuntimeError(f"the composed privacy loss left its grid ({stray:.3g} of mass below {floor:.4g}, "
                               f"where a correct grid holds less than {allowed:.3g}); please report it")

    def estimate(self, delta: float, counts: Sequence[int]) -> float:
        """Epsilon's estimate: within eps_error of the true value (Gopi et al. 2021)."""
        return _solve_epsilon(self.compose(counts), delta)

    def upper(self, delta: float, f_n: DiscretePrivacyRandomVariable) -> float:
        """Epsilon's rigorous upper bound: the estimate at delta - delta_error, plus eps_error
        (Gopi et al. 2021; prv_accountant's ``compute_epsilon``)."""
        return _solve_epsilon(f_n, delta - self.delta_error) + self.eps_error


def _centred(f_n: DiscretePrivacyRandomVariable) -> DiscretePrivacyRandomVariable:
    """The self-composed PRV ``f_n`` read on the window where its mass is.

    FFT composition is circular: it knows each sum of n grid values only modulo the grid's period.
    prv_accountant's ``Fourier`` composer reads the sums on the original domain [-L, L] and then
    moves that window by n * s, where s is the shift that keeps one step's mean (at most half a
    cell). The composed PRV itself lies in [-L, L] (L is sized for that), so once n * s is a
    sizeable part of L (a tiny q puts one step's mass in one cell, so s is near h / 2, over
    millions of steps) mass beyond the window's top wraps around to its bottom, and epsilon is
    underestimated: on a domain sized by fractional RDP orders, max_steps(epsilon=100, sigma=0.3,
    q=1e-4) answered 134,365 steps where 1.7e6 are allowed. Rolling the array by the whole cells
    of n * s puts the window back on [-L, L] (to within half a cell), which is the same reading
    wherever n * s is small.
    """
    domain = f_n.domain
    h = domain.dt()
    cells = round(domain.shifts() / h)
    if not cells:
        return f_n
    return DiscretePrivacyRandomVariable(np.roll(f_n.pmf, cells), domain.shift_right(-cells * h), f_n.log_pmc_inf)


_GRIDS: OrderedDict[tuple, _Composition] = OrderedDict()  # the last 2 grids, during one public query
_DEPTH = [0]  # how deep in public queries we are: the grids are dropped when the outermost returns


def _composition(segments: tuple[Segment, ...], eps_error: float, delta_error: float) -> _Composition:
    """The composition for this grid, cached during one public query: its evaluations (T and T + 1,
    a sigma's two passes) share a discretisation; afterwards the memory is freed (``_query``)."""
    key = (segments, eps_error, delta_error)
    if key not in _GRIDS:
        _GRIDS[key] = _Composition(segments, eps_error, delta_error)
        while len(_GRIDS) > 2:
            _GRIDS.popitem(last=False)
    _GRIDS.move_to_end(key)
    return _GRIDS[key]


def _query(fn: Callable) -> Callable:
    """A public query: the grids it cached are dropped when it (the outermost one) returns."""
    @wraps(fn)
    def query(*args, **kwargs):
        _DEPTH[0] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _DEPTH[0] -= 1
            if not _DEPTH[0]:
                _GRIDS.clear()
    return query


def _sized(steps: int) -> int:
    """``steps`` rounded up to 17-32 values per doubling: the step count a grid is sized for, so that
    nearby counts share one grid (a grid sized for more steps is finer, ~3% more points)."""
    steps = int(steps)  # a numpy integer has no bit_length
    unit = 1 << max(steps.bit_length() - 5, 0)
    return -(-steps // unit) * unit


def _round_down(x: float) -> float:
    """x rounded down to a power of 2^(1/4): eps_error on a coarse ladder, so grids can be shared."""
    return 2.0 ** (math.floor(4 * math.log2(x)) / 4)


def _active(segments: Iterable[Segment]) -> list[Segment]:
    return [s for s in segments if s.steps > 0]


@lru_cache(maxsize=1024)
def _rdp(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """Per-step RDP of the Poisson-subsampled Gaussian at ``RDP_ORDERS`` (Mironov, Talwar, Zhang 2019).

    Integer orders in closed form, all at once: A_a = sum_k C(a,k) (1-q)^(a-k) q^k exp((k^2-k)/(2 sigma^2)),
    summed in log space. Fractional orders are left out: their series (prv_accountant's) was most
    of the cost of calibrating sigma, and RDP here only sizes grids and brackets searches, where a
    looser bound costs a little time, never correctness. Cached: every query of one (sigma, q)
    shares it.
    """
    q, sigma = sample_rate, noise_multiplier
    if q == 1:
        return RDP_ORDERS / (2 * sigma**2)
    a, k, log_binomial = _LOG_BINOMIAL
    terms = log_binomial + k * math.log(q) + (a - k) * math.log1p(-q) + (k * k - k) / (2 * sigma**2)
    return special.logsumexp(terms, axis=1) / (RDP_ORDERS - 1)


def _log_binomial() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, k, log C(a, k)) for a in ``RDP_ORDERS``, k in 0..max order, with -inf where k > a: the
    part of ``_rdp``'s terms that depends on neither sigma nor q, computed once."""
    a = RDP_ORDERS[:, None]
    k = np.arange(RDP_ORDERS[-1] + 1)[None, :]
    with np.errstate(invalid="ignore"):
        table = special.gammaln(a + 1) - special.gammaln(k + 1) - special.gammaln(a - k + 1)
    return a, k, np.where(k <= a, table, -np.inf)


_LOG_BINOMIAL = _log_binomial()


@lru_cache(maxsize=1024)
def _rdp_fractional(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """Per-step RDP at ``FRACTIONAL_ORDERS``, by prv_accountant's series for fractional orders
    (Mironov, Talwar, Zhang 2019): ~10-30 ms per (sigma, q), so used only to size grids."""
    mechanism = PoissonSubsampledGaussianMechanism(sample_rate, noise_multiplier)
    return np.array([mechanism.rdp(float(a)) for a in FRACTIONAL_ORDERS])


def _rdp_to_epsilon(rdp: np.ndarray, delta: float, orders: np.ndarray = RDP_ORDERS) -> float:
    """Epsilon from total RDP at each order (the conversion prv_accountant and TF Privacy use)."""
    eps = rdp - np.log(delta * orders) / (orders - 1) + np.log1p(-1 / orders)
    return float(np.nanmin(eps))


def rdp_epsilon(segments: Sequence[Segment], delta: float) -> float:
    """RDP upper bound on epsilon (looser than PRV): sizes the PRV grid, brackets searches."""
    segs = _active(segments)
    if not segs:
        return 0.0
    return _rdp_to_epsilon(sum(s.steps * _rdp(s.sample_rate, s.noise_multiplier) for s in segs), delta)


def _domain_epsilon(segments: Sequence[Segment], delta: float, fractional: bool) -> float:
    """RDP's epsilon bound over the integer orders and, if ``fractional``, the fractional ones too
    (the smaller; each is a valid bound). prv_accountant sizes its grids with orders from 1.1 up:
    for small sigma, orders 1-2 give a bound many times tighter than order 2 does (sigma=0.3,
    q=0.01: RDP 0.02 at order 1.1 against 2.0 at order 2), hence a domain, and a grid, many times
    smaller. Their series costs ~20-90 ms per (sigma, q), more than a small grid does."""
    integer = rdp_epsilon(segments, delta)
    if not fractional:
        return integer
    rdp = sum(s.steps * _rdp_fractional(s.sample_rate, s.noise_multiplier) for s in segments)
    return min(integer, _rdp_to_epsilon(rdp, delta, FRACTIONAL_ORDERS))


def _safe_domain_size(segments: Sequence[Segment], eps_error: float, delta_error: float, fractional: bool) -> float:
    """Half-width L of a grid that holds all but delta_error of the composed PRV's mass: remark 5.6
    of Gopi et al. 2021, as prv_accountant's ``compute_safe_domain_size``, on the cached RDP."""
    total = sum(s.steps for s in segments)
    widest = _domain_epsilon(segments, delta_error / 4, fractional)
    for s in segments:
        one = [Segment(s.noise_multiplier, s.sample_rate, 1)]
        widest = max(widest, _domain_epsilon(one, delta_error / 8 / total, fractional))
    return max(widest, eps_error) + 3


def _answer(segments: Sequence[Segment], delta: float) -> tuple[_Composition, DiscretePrivacyRandomVariable, float]:
    """The grid a query is answered on, the composition there, and epsilon's estimate from it.

    eps_error is sized to epsilon: first from the RDP bound (an upper bound, so usually fine enough
    already), and if RDP was much looser than PRV, again from PRV's estimate (for a large grid, from
    an estimate on a grid ``COARSE`` times coarser, before building it). The grid is sized for
    each segment's step count rounded up (``_sized``) and eps_error is on a ladder, so nearby
    queries reuse one grid.
    """
    delta_error = delta / 1000
    counts = [s.steps for s in segments]
    sized = tuple(Segment(s.noise_multiplier, s.sample_rate, _sized(s.steps)) for s in segments)
    eps_error = _round_down(max(REL_ERROR * rdp_epsilon(sized, delta), MIN_EPS_ERROR))
    domain, achieved = _domain(sized, eps_error, delta_error)
    if len(domain) > CHEAP_GRID_POINTS and achieved == eps_error:  # (a capped grid gets no finer)
        # RDP can be several times looser than PRV, which cost a second large grid: ask an estimate
        # on a grid COARSE times coarser (an eighth of the cost) first
        rough = _composition(sized, _round_down(COARSE * eps_error), delta_error).estimate(delta, counts)
        eps_error = _refined(eps_error, rough)
    comp = _composition(sized, eps_error, delta_error)
    f_n = comp.compose(counts)
    estimate = _solve_epsilon(f_n, delta)
    if (finer := _refined(eps_error, estimate)) != eps_error:
        comp = _composition(sized, finer, delta_error)
        f_n = comp.compose(counts)
        estimate = _solve_epsilon(f_n, delta)
    return comp, f_n, estimate


def _refined(eps_error: float, estimate: float) -> float:
    """``eps_error``, or a finer one (on the ladder) if it is over 1.25 times what an epsilon near
    ``estimate`` needs: RDP, which sized it, was much looser than PRV."""
    wanted = max(REL_ERROR * estimate, MIN_EPS_ERROR)
    return _round_down(wanted) if eps_error > 1.25 * wanted else eps_error


def _upper(segments: Sequence[Segment], delta: float) -> float:
    """Rigorous upper bound on epsilon of composing the (checked, non-empty) segments, >= 0."""
    comp, f_n, _ = _answer(segments, delta)
    return max(comp.upper(delta, f_n), 0.0)


@_query
def compose(segments: Sequence[Segment], delta: float) -> float:
    """Upper bound on epsilon of composing ``segments`` (heterogeneous sigma and q) at ``delta``.

    Composition is commutative, so segments with the same (sigma, q) are merged first: the cost
    grows with the number of distinct (sigma, q), not of segments (a ledger records one per epoch)."""
    _check_delta(delta)
    steps: dict[tuple[float, float], int] = {}
    for s in segments:
        _check_segment(s.noise_multiplier, s.sample_rate, s.steps)
        steps[(s.noise_multiplier, s.sample_rate)] = steps.get((s.noise_multiplier, s.sample_rate), 0) + s.steps
    merged = [Segment(sigma, q, t) for (sigma, q), t in steps.items() if t > 0]
    return _upper(merged, delta) if merged else 0.0


@_query
def compute_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Upper bound on epsilon after ``steps`` Poisson-subsampled Gaussian steps (sigma, q) at delta."""
    _check_segment(noise_multiplier, sample_rate, steps)
    _check_delta(delta)
    return _compute_epsilon(float(noise_multiplier), float(sample_rate), int(steps), float(delta))


@lru_cache(maxsize=256)
def _compute_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """A pure function of its arguments, cached: a run's planning asks for the calibrated sigma's
    epsilon twice (calibration, then the step budget)."""
    return _upper([Segment(sigma, q, steps)], delta) if steps else 0.0


@_query
def epsilon_curve(*, noise_multiplier: float, sample_rate: float, steps: Sequence[int], delta: float) -> list[float]:
    """Upper bounds on epsilon after each count in ``steps``, from one discretisation sized for the
    largest count (for progress displays and plots: one grid and one FFT per count instead of a
    grid per count; each value is a rigorous upper bound, looser than ``compute_epsilon``'s at
    small counts because the grid's error is sized to the largest epsilon)."""
    _check_delta(delta)
    top = max(steps, default=0)
    _check_segment(noise_multiplier, sample_rate, top)
    if top == 0:
        return [0.0 for _ in steps]
    eps_error = max(REL_ERROR * rdp_epsilon([Segment(noise_multiplier, sample_rate, top)], delta), MIN_EPS_ERROR)
    comp = _Composition([Segment(noise_multiplier, sample_rate, top)], eps_error, delta / 1000)
    return [max(comp.upper(delta, comp.compose([t])), 0.0) if t else 0.0 for t in steps]


def _check_target(target_epsilon: float) -> None:
    _check_finite_positive("target_epsilon", target_epsilon)


@_query
def get_noise_multiplier(*, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """A sigma (5 significant digits) whose epsilon upper bound after ``steps`` steps is <= target,
    within about 0.3% of the smallest such sigma.

    Searching is done on a grid ``COARSE`` times coarser (cheap estimates; epsilon is smooth and
    falls with sigma, close to a power law, so a secant on log-log axes lands in a few evaluations).
    The answer is then settled on ``compute_epsilon`` itself: raised if it overspends, lowered while
    that stays within the target, so what is returned is never less noise than a rigorous upper
    bound says the target allows.
    """
    _check_target(target_epsilon)
    _check_delta(delta)
    _check_segment(1.0, sample_rate, steps)
    if steps == 0:
        raise ValueError("steps must be >= 1 to calibrate a noise multiplier, got 0")

    def upper(sigma: float) -> float:
        return compute_epsilon(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta)

    # steering estimates: on a grid ``COARSE`` times coarser than the target's figure, as ``_steer``
    # (sized to the target, not to each sigma's own epsilon: far from the target a rougher estimate
    # steers as well, and sizing to a much smaller epsilon there made grids of millions of points)
    steering_error = _round_down(COARSE * max(REL_ERROR * target_epsilon, MIN_EPS_ERROR))

    def rough(sigma: float) -> float:
        segment = Segment(sigma, sample_rate, steps)
        return _composition((segment,), steering_error, delta / 1000).estimate(delta, [steps])

    # aim the estimate where the reported upper bound (estimate + its eps_error) meets the target
    aim = target_epsilon * (1 - 1.5 * REL_ERROR)
    # RDP bounds epsilon from above: its sigma is a start on the safe side. Where RDP cannot certify
    # the target (small epsilon), take its sigma for the smallest 2^k * target it can, times 2^k
    # (epsilon falls about as 1/sigma there)
    scale, start = 1.0, None
    while start is None and scale < 1e6:
        start = _rdp_noise_multiplier(sample_rate, steps, delta, target_epsilon * scale)
        scale *= 2
    start = min((start or MAX_NOISE_MULTIPLIER) * scale / 2, MAX_NOISE_MULTIPLIER)
    points = [(math.log(start), math.log(max(rough(start), 1e-300)))]
    if start == MAX_NOISE_MULTIPLIER and points[0][1] > math.log(target_epsilon):
        raise ValueError(
            f"target_epsilon={target_epsilon} is unreachable: even noise_multiplier={MAX_NOISE_MULTIPLIER:g} "
            f"spends more over {steps} steps at q={sample_rate}; raise the target, or use fewer steps or a "
            "smaller sampling rate"
        )
    slope = -1.0  # d log(eps) / d log(sigma): -1 in the Gaussian regime, steeper at large epsilon
    for _ in range(12):
        x, y = points[-1]
        if abs(y - math.log(aim)) < 1e-4:
            break
        if len(points) > 1 and points[-2][0] != x:
            slope = min((y - points[-2][1]) / (x - points[-2][0]), -0.05)
        step = (math.log(aim) - y) / slope
        x_new = x + max(min(step, 0.25), -0.25)  # at most a factor 1.28 per move: grids grow fast as sigma falls
        points.append((x_new, math.log(max(rough(math.exp(x_new)), 1e-300))))
    sigma = _round_up(math.exp(points[-1][0]))
    while (eps := upper(sigma)) > target_epsilon:  # the rigorous check; rare, a small raise
        if sigma >= MAX_NOISE_MULTIPLIER:
            raise ValueError(f"target_epsilon={target_epsilon} is unreachable with noise_multiplier<="
                             f"{MAX_NOISE_MULTIPLIER:g}")
        sigma = _round_up(sigma * math.exp((math.log(eps) - math.log(aim)) / -slope) * (1 + 1e-4))
    # the coarse grid can land a few tenths of a percent high (or, at small epsilon, eps_error's floor
    # is a large part of epsilon): step down towards the target on the reported figure itself while
    # the gain is predicted to exceed 0.1%, keeping only candidates it checks within the target
    for _ in range(4):
        shrink = math.log(target_epsilon / eps) / -slope if eps > 0 else 0.0
        if shrink < 1e-3:
            break
        candidate = _round_up(sigma * math.exp(-0.8 * shrink))
        if candidate >= sigma or (candidate_eps := upper(candidate)) > target_epsilon:
            break
        sigma, eps = candidate, candidate_eps
    return sigma


def _round_up(sigma: float) -> float:
    """sigma rounded up to ``SIGMA_DIGITS`` significant digits (rounding up only adds noise)."""
    unit = 10.0 ** (math.floor(math.log10(sigma)) - SIGMA_DIGITS + 1)
    return float(f"{math.ceil(sigma / unit - 1e-9) * unit:.{SIGMA_DIGITS}g}")


def _rdp_noise_multiplier(q: float, steps: int, delta: float, target: float) -> float | None:
    """The smallest sigma (to 0.1%) whose RDP epsilon bound is <= target, or None if RDP's orders
    cannot certify the target at any sigma up to ``MAX_NOISE_MULTIPLIER``. Cheap: closed-form RDP."""
    def fits(sigma: float) -> bool:
        return rdp_epsilon([Segment(sigma, q, steps)], delta) <= target

    lo, hi = 1e-2, 1.0
    while not fits(hi):
        lo, hi = hi, hi * 2
        if hi > MAX_NOISE_MULTIPLIER:
            return None
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


@_query
def max_steps(*, target_epsilon: float, delta: float, noise_multiplier: float, sample_rate: float,
              limit: int | None = None) -> int:
    """Largest T (at most ``limit``) with compute_epsilon(T) <= target (0 if one step already exceeds it).

    The trainer calls this once with its planned steps as ``limit`` and stops before step T+1:
    no accounting in the hot loop, and a run planned within its budget costs one evaluation.
    The search steers on one coarse grid sized for the largest T tried (``COARSE``), then settles
    on ``compute_epsilon``, the figure every report uses, so that epsilon(T) <= target <
    epsilon(T + 1) holds for it (T and T + 1 share its grid). Budgets beyond ``GRID_STEPS`` steps
    are RDP's closed form: a lower bound on PRV's (never a step too many), since a grid for that
    many compositions would not fit in memory.
    """
    _check_target(target_epsilon)
    _check_delta(delta)
    _check_segment(noise_multiplier, sample_rate, 1)
    if limit is not None:
        _check_segment(noise_multiplier, sample_rate, limit)
        eps = compute_epsilon(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=limit, delta=delta)
        if eps <= target_epsilon:
            return limit

    # RDP bounds epsilon from above, so its step budget (closed form per order) is a lower
    # bracket; search upwards from it on one coarse grid
    lo = _rdp_max_steps(noise_multiplier, sample_rate, delta, target_epsilon)
    if limit is not None:  # epsilon(limit) > target: the answer is below limit
        lo, cap = min(lo, limit - 1), limit
    elif lo >= GRID_STEPS:
        return lo
    else:
        cap = GRID_STEPS
    steered = _steer(noise_multiplier, sample_rate, delta, target_epsilon, lo, cap, limit is not None)
    if steered is None:
        return lo  # PRV allows more than GRID_STEPS; RDP's figure is a safe answer
    guess, rate = steered

    @lru_cache(maxsize=None)
    def excess(t: int) -> float:
        if t == 0:
            return -target_epsilon
        eps = compute_epsilon(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=t, delta=delta)
        return eps - target_epsilon

    # secant steps on the reported figure from the guess (the first with the coarse grid's rate),
    # while they move; then the tightest bracket they found, or one grown by doubling from the last
    top = cap if limit is None else limit - 1
    tried = [guess]
    if rate > 0:
        tried.append(min(max(round(guess - excess(guess) / rate), 0), top))
    while len(tried) < 5 and len(tried) > 1 and excess(tried[-1]) != excess(tried[-2]):
        (t0, e0), (t1, e1) = ((t, excess(t)) for t in tried[-2:])
        step = min(max(round(t1 - e1 * (t1 - t0) / (e1 - e0)), 0), top)
        if step in tried:
            break
        tried.append(step)
    within = [t for t in tried if excess(t) <= 0]
    over = [t for t in tried if excess(t) > 0]
    if within and over and max(within) < min(over):
        return _bracket_search(excess, max(within), min(over))
    guess = tried[-1]
    width = 1
    if excess(guess) <= 0:
        lo, hi = guess, guess + 1
        while excess(hi) <= 0:
            lo, hi, width = hi, hi + 2 * width, 2 * width
    else:
        lo, hi = max(guess - 1, 0), guess
        while excess(lo) > 0:
            lo, hi, width = max(lo - 2 * width, 0), lo, 2 * width
    return _bracket_search(excess, lo, hi)


def _steer(sigma: float, q: float, delta: float, target: float, lo: int, cap: int,
           limited: bool) -> tuple[int, float] | None:
    """(a guess of max_steps' answer, epsilon's growth per step there), from a grid ``COARSE`` times
    coarser, sized for the largest T tried (from RDP's budget ``lo`` up, at most ``cap``); None if
    even ``cap`` steps stay within the target and ``cap`` is not the caller's limit."""
    aim = target * (1 - 1.5 * REL_ERROR)  # where the reported upper bound meets the target
    eps_error = COARSE * max(REL_ERROR * target, MIN_EPS_ERROR)
    hi = min(2 * lo + 2, cap)
    while True:
        comp = _Composition([Segment(sigma, q, hi)], eps_error, delta / 1000)
        if comp.estimate(delta, [hi]) > aim:
            guess = _bracket_search(lambda t: comp.estimate(delta, [t]) - aim if t else -aim, lo, hi)
            break
        if hi == cap:
            if not limited:
                return None
            guess = cap - 1
            break
        lo, hi = hi, min(4 * hi, cap)
    d = max(guess // 100, 1)
    below, above = max(guess - d, 1), min(guess + d, hi)
    rate = (comp.estimate(delta, [above]) - comp.estimate(delta, [below])) / (above - below) if above > below else 0.0
    return guess, rate


def _bracket_search(f: Callable[[int], float], lo: int, hi: int) -> int:
    """Largest integer t in [lo, hi) with f(t) <= 0, given f(lo) <= 0 < f(hi) and f increasing.

    Illinois-style false position (epsilon grows smoothly, roughly like sqrt(T)), falling back to
    bisection, so it takes a handful of evaluations instead of log2(hi - lo).
    """
    f_lo, f_hi = f(lo), f(hi)
    side = 0
    while hi - lo > 1:
        guess = lo + (hi - lo) * (-f_lo) / (f_hi - f_lo) if f_hi > f_lo else (lo + hi) / 2
        mid = min(max(int(round(guess)), lo + 1), hi - 1)
        f_mid = f(mid)
        if f_mid <= 0:
            lo, f_lo = mid, f_mid
            f_hi = f_hi / 2 if side == -1 else f_hi  # Illinois: stop one end from sticking
            side = -1
        else:
            hi, f_hi = mid, f_mid
            f_lo = f_lo / 2 if side == 1 else f_lo
            side = 1
    return lo


def _rdp_max_steps(sigma: float, q: float, delta: float, target: float) -> int:
    """Largest T whose RDP epsilon bound (the conversion of ``_rdp_to_epsilon``) is <= target; RDP
    is looser than PRV, so PRV allows at least this many steps."""
    orders, per_step = RDP_ORDERS, _rdp(q, sigma)
    room = target + np.log(delta * orders) / (orders - 1) - np.log1p(-1 / orders)
    with np.errstate(divide="ignore", invalid="ignore"):
        steps = np.where((room > 0) & (per_step > 0), np.floor(room / per_step), 0)
    return int(min(np.nanmax(steps), MAX_STEPS))


def plan(*, num_samples: int, batch_size: float, epochs: float) -> tuple[float, int]:
    """(q, steps) of a Poisson-sampled run: q = expected batch / N, ceil(1/q) steps per epoch."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"dataset size must be an integer >= 1, got {num_samples!r}")
    _check_finite_positive("batch", batch_size)
    _check_finite_positive("epochs", epochs)
    if batch_size > num_samples:
        raise ValueError(f"expected batch {batch_size:g} exceeds the dataset size {num_samples}; lower batch")
    q = batch_size / num_samples
    return q, math.ceil(epochs * math.ceil(1 / q - 1e-9) - 1e-9)


class PrivacyAccountant:
    """Records the (sigma, q, steps) segments a run took and composes them into one epsilon.

    Segments with different sigma or q (a resume, a schedule change) compose heterogeneously.
    """

    name = ACCOUNTANT_NAME

    def __init__(self) -> None:
        self.history: list[Segment] = []

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` more steps of (sigma, q); merged into the last segment if it matches."""
        _check_segment(noise_multiplier, sample_rate, steps)
        last = self.history[-1] if self.history else None
        if last and last.noise_multiplier == noise_multiplier and last.sample_rate == sample_rate:
            self.history[-1] = Segment(noise_multiplier, sample_rate, last.steps + steps)
        elif steps:
            self.history.append(Segment(float(noise_multiplier), float(sample_rate), int(steps)))

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.history)

    def get_epsilon(self, delta: float) -> float:
        """Upper bound on epsilon of everything recorded, at ``delta``."""
        return compose(self.history, delta)

    def state_dict(self) -> dict:
        """Plain, JSON-serialisable state."""
        return {"accountant": self.name, "history": [asdict(s) for s in self.history]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("accountant") != self.name:
            raise ValueError(f"state is from accountant {state.get('accountant')!r}, expected {self.name!r}")
        history = []
        for s in state["history"]:
            _check_segment(s["noise_multiplier"], s["sample_rate"], s["steps"])
            history.append(Segment(float(s["noise_multiplier"]), float(s["sample_rate"]), int(s["steps"])))
        self.history = history
