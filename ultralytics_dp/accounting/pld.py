"""Privacy accounting for DP-SGD: the privacy loss distribution of the Poisson-subsampled Gaussian,
discretised so that it can only overstate delta, and composed by FFT.

Privacy assumptions relied on here:

* Every optimizer step is one Poisson-subsampled Gaussian mechanism: each record is in the batch
  independently with probability q, the summed clipped gradients have L2 sensitivity C under
  adding/removing one record, and the noise is N(0, (sigma*C)^2). The accountant sees only
  (sigma, q, steps); the caller must make those true (see ``sampling`` and ``mechanism``).
* One step is the pair P = (1-q) N(0, sigma^2) + q N(1, sigma^2) against Q = N(0, sigma^2), with
  privacy loss Y = log(dP/dQ)(X), X ~ P: the pair of Gopi et al. 2021 (``prv-accountant``) and Opacus.
  delta(eps) = E_P[(1 - e^(eps - Y))_+], so composing steps adds independent losses.
* delta is the caller's: it should be well below 1/N.
* The reported epsilon is an **upper** bound at any grid size (proved but for 3); the grid only sets how tight:
  1. ``_step``: each step's loss is replaced by one on the grid h*Z whose delta(eps) is >= the true
     one at every eps ("connect the dots", Doroshenko et al. 2022: each cell's mass goes to its two
     ends keeping its P- and Q-mass; (1 - e^eps u)_+ is convex in u = e^(-Y), so the ends' chord lies
     above). Loss above the grid's top is put at +infinity (it counts fully). Composing losses that
     dominate this way dominates the composition: delta of a sum is E_A[delta_B(eps - Y_A)], monotone
     in each factor.
  2. ``_window``: the composed loss is read off a circular FFT on [t_lo, t_hi], chosen by a Chernoff
     bound computed exactly from the discrete steps. Mass above t_hi wraps to the bottom and can lower
     delta by at most that bound, which is charged to delta; mass below t_lo wraps to the top, where
     it only raises delta.
  3. FFT rounding is charged to delta: raising the transform to the T-th power multiplies its
     relative error by T, so ``ROUNDING`` * (T + sqrt(N)) machine epsilons for N grid points, in
     long double where float64's charge would exceed delta/100 (a query whose long-double charge
     exceeds delta/10 is refused). This one is measured, not proved: against long double,
     float64's error in the composed probabilities, summed (a bound on its effect on delta), was
     at most 3.5 (T + sqrt(N)) epsilons over T = 1 to 1e7. (prv-accountant, dp_accounting and
     Opacus charge nothing.)

Tightness. Splitting a cell's mass between its ends raises the mean loss by at most h^2/8
and its variance by at most h^2/4, so over T steps (composed mean and variance T mean_1 and
T var_1) epsilon, (eps - mean) / sqrt(var) standard deviations out, moves by about
T h^2 (1 + (eps - mean) / var) / 8; ``_mesh`` picks h for
``REL_ERROR`` * epsilon from that (checked against grids six times finer and dp_accounting's PLD:
within 0.3% across the benchmark's grid, ``benchmarks/RESULTS.md``). Gopi et al.'s mean-preserving
grid (``prv-accountant``) needs its mesh to shrink as 1/sqrt(T) to *prove* its bound, which makes
grids of tens of millions of points at small epsilon over many steps; here the bound holds at any mesh and grids stay at thousands to
hundreds of thousands of points, so every query takes well under a second.
This module must not import Ultralytics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Sequence

import numpy as np
from scipy import special
from scipy.fft import irfft, next_fast_len, rfft

from .. import checks
from . import mixture

NAME = "pld"  # how the dp entry names this accountant's figure
REL_ERROR = 0.002  # what ``_mesh`` aims the upper bound's excess over the true epsilon at, relative
MIN_EPS_ERROR = 1e-6  # ... and absolute, where epsilon is near 0
MAX_NOISE_MULTIPLIER = 1e4
MAX_STEPS = 10**9
GRID_STEPS = 10**7  # above this many steps, max_steps answers with the RDP budget
MAX_GRID_POINTS = 2 * 10**7  # a grid holds at most this many points: beyond, its mesh is coarser (looser)
RDP_ORDERS = np.arange(2, 257)  # integer orders only: closed form, vectorised (see _rdp)
COARSE = 4.0  # searches steer on figures aimed at COARSE times the error (grids twice as coarse)
SIGMA_DIGITS = 5  # a calibrated sigma is rounded up to this many significant digits
ROUNDING = 16  # FFT rounding charged to delta, in machine epsilons per step (measured: <= 3.5)
# the FFT's arithmetic, and the share of delta its rounding may take: float64 first, long double after
ARITHMETIC = ((np.float64, 100), (np.longdouble, 10))
_MOMENT_POINTS = np.linspace(-12.0, 12.0, 4001)  # standard normal quadrature nodes for ``_moments``


@dataclass(frozen=True)
class Segment:
    """``steps`` compositions of the Poisson-subsampled Gaussian mechanism with (sigma, q); with
    ``images`` = k > 1, of the step as a person with k images in a per-image run sees it (each
    image sampled with probability q, so Binomial(k, q) of them at once: ``mixture``)."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    images: int = 1


def _check_segment(noise_multiplier: float, sample_rate: float, steps: int, images: int = 1) -> None:
    checks.finite_positive("noise_multiplier", noise_multiplier)
    checks.sample_rate("sample_rate", sample_rate)
    checks.positive_int("steps", steps, allow_zero=True)
    checks.positive_int("images", images)
    if images > 1 and sample_rate == 1:
        raise ValueError("a segment of several images at q = 1 is the Gaussian of k C: give sigma / k and images=1")


def _log_tails(t: np.ndarray | float, q: float, sigma: float, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(log P[Y >= t], log Q[Y >= t]) for one step's loss Y (k > 1: ``mixture.log_tails``).

    Y = log(1 - q + q e^((2x - 1) / (2 sigma^2))) grows with x, so Y >= t iff x >= x_t =
    sigma^2 log((e^t - 1 + q) / q) + 1/2 (for t > log(1 - q), below which Y never is). In logs
    (``log_ndtr``), so far tails keep their relative precision: ``_step`` multiplies Q's by e^t.
    """
    if k > 1:
        return mixture.log_tails(np.asarray(t, dtype=np.float64), q, sigma, k)
    t = np.asarray(t, dtype=np.float64)
    inside = t > (math.log1p(-q) if q < 1 else -math.inf)
    ts = np.where(inside, t, 1.0)
    with np.errstate(over="ignore", divide="ignore"):
        # log((e^t - 1 + q) / q), stable on both sides of 0
        z = np.where(ts > 0, ts + np.log1p((q - 1) * np.exp(-ts)) - math.log(q), np.log1p(np.expm1(ts) / q))
    x = sigma**2 * z + 0.5
    log_q = special.log_ndtr(-x / sigma)
    absent = math.log1p(-q) + log_q if q < 1 else np.full_like(log_q, -np.inf)
    log_p = np.logaddexp(absent, math.log(q) + special.log_ndtr((1 - x) / sigma))
    return np.where(inside, log_p, 0.0), np.where(inside, log_q, 0.0)


@dataclass(frozen=True)
class _Step:
    """One step's loss on the grid h*i, i = first, first + 1, ...: ``pmf`` there, ``infinity`` at +inf."""

    first: int
    pmf: np.ndarray
    infinity: float


@lru_cache(maxsize=16)
def _step(sigma: float, q: float, h: float, tail: float, k: int = 1) -> _Step:
    """One step's loss discretised so that its delta(eps) is >= the true one at every eps (see the
    module's docstring, 1): each cell [t_i, t_i + h) sends to t_i + h the share that keeps its
    P-mass m and Q-mass n, (m - n e^(t_i)) / (1 - e^(-h)), and the rest to t_i. The grid reaches up to
    where P[Y >= t] <= ``tail`` (that mass goes to +infinity) and down below all of Y's support; for
    q = 1, whose loss is Gaussian, down to where P[Y < t] <= ``tail``, that mass moved up to the
    grid's first point (raising a loss only raises delta). Cached: the queries of a search share it."""
    # P[X >= x] <= Pbar((x - k) / sigma) for every one of P's components, and Y grows with x
    top = float(_loss(k - sigma * float(special.ndtri(tail)), q, sigma, k))
    bottom = k * math.log1p(-q) if q < 1 else float(_loss(1 + sigma * float(special.ndtri(tail)), q, sigma))
    first = math.floor(bottom / h)
    t = h * np.arange(first, math.ceil(top / h) + 1)
    log_p, log_q = _log_tails(t, q, sigma, k)
    above = np.exp(log_p)
    mass = -np.diff(above)
    scaled_q = np.exp(log_q[:-1] + t[:-1]) - np.exp(log_q[1:] + t[:-1])  # n e^(t_i) <= m: no overflow
    up = np.clip((mass - scaled_q) / -math.expm1(-h), 0.0, mass)
    pmf = np.zeros(len(t))
    pmf[:-1] = mass - up
    pmf[1:] += up
    pmf[0] += 1.0 - above[0]  # below the grid (q = 1 only)
    return _Step(first, pmf, float(above[-1]))


def _loss(x: np.ndarray | float, q: float, sigma: float, k: int = 1) -> np.ndarray | float:
    """One step's privacy loss log(dP/dQ) at x."""
    if k > 1:
        return mixture.loss(x, q, sigma, k)
    return np.logaddexp(math.log1p(-q) if q < 1 else -math.inf, math.log(q) + (2 * x - 1) / (2 * sigma**2))


@lru_cache(maxsize=1024)
def _moments(sigma: float, q: float, k: int = 1) -> tuple[float, float]:
    """Mean and variance of one step's loss under P, by quadrature (they only size grids)."""
    x = sigma * _MOMENT_POINTS
    weight = np.exp(-_MOMENT_POINTS**2 / 2)
    weight /= weight.sum()
    shares = np.exp(mixture.log_weights(q, k)) if k > 1 else np.array([1 - q, q])
    first = second = 0.0
    for shift, share in enumerate(shares):  # P's components: Binomial(k, q) images at once
        y = _loss(x + shift, q, sigma, k)
        first, second = first + share * float(weight @ y), second + share * float(weight @ y**2)
    return first, max(second - first**2, 0.0)


def _mesh(segments: Sequence[Segment], epsilon: float, rel_error: float) -> float:
    """The grid step h that should put the upper bound within about ``rel_error`` * ``epsilon`` of the
    true epsilon (module docstring, Tightness), rounded down to a ladder so that nearby queries share
    their steps' discretisations."""
    steps = sum(s.steps for s in segments)
    moments = [(s.steps, *_moments(s.noise_multiplier, s.sample_rate, s.images)) for s in segments]
    mean, var = sum(n * m for n, m, _ in moments), sum(n * v for n, _, v in moments)
    error = max(rel_error * epsilon, MIN_EPS_ERROR)
    spread = steps * (1 + (max(epsilon - mean, 0.0) / var if var > 0 else math.inf))
    return _round_down(math.sqrt(8 * error / spread)) if math.isfinite(spread) else 0.0


def _window(steps: Sequence[_Step], counts: Sequence[int], h: float, tail: float) -> tuple[float, float]:
    """[t_lo, t_hi] outside which the composed (finite) loss S has at most ``tail`` at each end.

    Chernoff: P[S >= t] <= exp(sum_s T_s K_s(l) - l t) for every l > 0, K_s the log-MGF of step s's
    discrete loss (computed exactly, so any l gives a valid bound); l is picked by golden section on
    log l ((K(l) + log(1/tail)) / l is quasi-convex in l). The lower end likewise with -l.
    """
    terms = [(np.log(s.pmf[s.pmf > 0]), h * (s.first + np.flatnonzero(s.pmf > 0)), n) for s, n in zip(steps, counts)]
    var = sum(n * float(np.exp(lp) @ (t - np.exp(lp) @ t) ** 2) for lp, t, n in terms)
    scale = 1 / (math.sqrt(var) + h)

    def edge(sign: float) -> float:
        def reach(u: float) -> float:  # the t whose bound is exactly ``tail``, for l = e^u
            lam = math.exp(u)
            log_mgf = 0.0
            for lp, t, n in terms:
                exponent = lp + sign * lam * t
                peak = exponent.max()
                log_mgf += n * (peak + math.log(np.exp(exponent - peak).sum()))
            return (log_mgf - math.log(tail)) / lam

        lo, hi = math.log(1e-4 * scale), math.log(1e4 * scale)
        golden = (math.sqrt(5) - 1) / 2
        a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
        fa, fb = reach(a), reach(b)
        for _ in range(16):  # any l gives a valid bound: no need for the exact optimum
            if fa < fb:
                hi, b, fb = b, a, fa
                a = hi - golden * (hi - lo)
                fa = reach(a)
            else:
                lo, a, fa = a, b, fb
                b = lo + golden * (hi - lo)
                fb = reach(b)
        return min(fa, fb)

    return -edge(-1.0), edge(1.0)


def _epsilon(segments: Sequence[Segment], h: float, delta: float) -> float:
    """Upper bound on epsilon of composing the segments (steps > 0), on the grid h*Z.

    delta is spent as: at most delta/4000 on the steps' mass at +infinity, delta/4000 on the
    window's upper tail, at most delta/100 (float64) or delta/10 (long double) on FFT rounding
    (``ROUNDING``), the rest on the discretised composition."""
    counts = [s.steps for s in segments]
    total = sum(counts)
    tail = delta / 4000
    while True:
        steps = [_step(s.noise_multiplier, s.sample_rate, h, tail / _sized(total), s.images) for s in segments]
        lo, hi = _window(steps, counts, h, tail)
        size = max(math.ceil((hi - lo) / h) + 1, 2)
        if max(size, *(len(s.pmf) for s in steps)) <= MAX_GRID_POINTS:
            break
        h *= 2  # a coarser grid: still an upper bound, only looser
    while (size := next_fast_len(size, real=True)) % 2:
        size += 1
    # float64 unless its rounding would take more than delta/100; long double (~4x slower) then,
    # up to delta/10 (epsilon is then read at 0.9 delta, a little looser)
    rounding = _rounding(total, size)
    dtype = next((d for d, share in ARITHMETIC if rounding * float(np.finfo(d).eps) <= delta / share), None)
    if dtype is None:
        raise ValueError(f"delta={delta:g} is too small to account {total} steps in floating point; raise delta "
                         f"(at least {rounding * float(np.finfo(np.longdouble).eps) * 10:.2g})")
    first = math.floor(lo / h)
    composed = _compose(steps, counts, first, size, dtype)
    infinity = -math.expm1(sum(s.steps * math.log1p(-step.infinity) for s, step in zip(segments, steps)))
    budget = delta - infinity - tail - rounding * float(np.finfo(dtype).eps)
    return _solve_epsilon(composed, first * h, h, budget)


def _rounding(steps: int, size: int) -> float:
    """The FFT rounding charged to delta, in machine epsilons, for ``steps`` steps on ``size`` points."""
    return ROUNDING * (steps + math.sqrt(size))


def _compose(steps: Sequence[_Step], counts: Sequence[int], first: int, size: int, dtype: type) -> np.ndarray:
    """The composition of ``counts[i]`` copies of each step on grid points first .. first + size - 1,
    by one circular FFT of ``size`` points in ``dtype`` (mass outside the window wraps round)."""
    spectrum = None
    for step, count in zip(steps, counts):
        index = (step.first + np.arange(len(step.pmf))) % size
        folded = np.bincount(index, weights=step.pmf, minlength=size).astype(dtype)
        power = rfft(folded) ** count
        spectrum = power if spectrum is None else spectrum * power
    return np.roll(irfft(spectrum, size), -(first % size))  # [j]: the probability of loss (first + j) h


def _solve_epsilon(pmf: np.ndarray, t_min: float, h: float, delta: float) -> float:
    """The smallest epsilon at which a discrete loss on t_i = t_min + i h has delta(epsilon) <= ``delta``.

    On [t_(i-1), t_i], delta(eps) = sum_{s >= t_i} p_s (1 - e^(eps - s)), solved for eps at the first
    i where delta(t_i) <= delta (prv_accountant's formula); t_min itself if delta(t_min) already is.
    For any loss Y, (1 - 1/e) P[Y >= eps + 1] <= delta(eps) <= P[Y >= eps], so the answer lies in a
    window that the tail sums P[Y >= t] locate; within it the sums are taken relative to the window's
    start, so no e^t overflows float64. Long double where the window is wider than float64's exponent
    allows; if the answer is not strictly inside the window (rounding in the tails), the whole grid is.
    """
    size = len(pmf)
    if np.finfo(np.longdouble).eps * size > delta:
        raise ValueError(f"delta={delta:g} is too small for a grid of {size} points; raise delta")
    tail = np.cumsum(pmf[::-1])[::-1]  # P[Y >= t_i]
    if tail[0] - float(pmf @ np.exp(-h * np.arange(size))) <= delta:
        return t_min
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


def _sized(steps: int) -> int:
    """``steps`` rounded up to 17-32 values per doubling: the step count a step's tail cut-off is
    sized for (``_epsilon``), so that nearby counts share one discretisation of the step."""
    steps = int(steps)  # a numpy integer has no bit_length
    unit = 1 << max(steps.bit_length() - 5, 0)
    return -(-steps // unit) * unit


def _round_down(x: float) -> float:
    """x rounded down to a power of 2^(1/4): a mesh on a coarse ladder, so discretisations can be shared."""
    return 2.0 ** (math.floor(4 * math.log2(x)) / 4)


def _active(segments: Iterable[Segment]) -> list[Segment]:
    return [s for s in segments if s.steps > 0]


@lru_cache(maxsize=1024)
def _rdp(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """Per-step RDP of the Poisson-subsampled Gaussian at ``RDP_ORDERS`` (Mironov, Talwar, Zhang 2019).

    Integer orders in closed form, all at once: A_a = sum_k C(a,k) (1-q)^(a-k) q^k exp((k^2-k)/(2 sigma^2)),
    summed in log space. Fractional orders are left out (a slow series): RDP here only sizes a
    query's first grid and brackets searches, where a looser bound costs a little time, never
    correctness. Cached: every query of one (sigma, q) shares it.
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


def _rdp_to_epsilon(rdp: np.ndarray, delta: float) -> float:
    """Epsilon from total RDP at each order (the conversion prv_accountant and TF Privacy use)."""
    orders = RDP_ORDERS
    eps = rdp - np.log(delta * orders) / (orders - 1) + np.log1p(-1 / orders)
    return float(np.nanmin(eps))


def rdp_epsilon(segments: Sequence[Segment], delta: float) -> float:
    """RDP upper bound on epsilon (looser than the PLD's): sizes a query's first grid, brackets searches."""
    segs = _active(segments)
    if not segs:
        return 0.0
    # k images: their step is a post-processing of k subsampled Gaussians at sigma / sqrt(k) (split
    # noise), whose RDP bounds the mixture's
    return _rdp_to_epsilon(sum(s.steps * s.images * _rdp(s.sample_rate, s.noise_multiplier / math.sqrt(s.images))
                               for s in segs), delta)



def _upper(segments: Sequence[Segment], delta: float) -> tuple[float, float]:
    """(rigorous upper bound on epsilon of composing the checked, non-empty segments, >= 0; the mesh).

    The mesh is sized to epsilon (``_mesh``): first to RDP's bound (an upper bound, so the first grid
    is the coarser), then, while that was much looser than the answer, again to the answer."""
    h = _mesh(segments, rdp_epsilon(segments, delta), REL_ERROR)
    for _ in range(4):
        epsilon = max(_epsilon(segments, h, delta), 0.0)
        finer = _mesh(segments, epsilon, REL_ERROR)
        if h <= 1.25 * finer:
            break
        h = finer
    return epsilon, h


def merge(segments: Iterable[Segment]) -> tuple[Segment, ...]:
    """``segments`` with equal (sigma, q, images) merged, in order of first appearance, empty ones
    dropped.

    Composition is commutative, so this changes no epsilon: the cost of composing grows with the
    number of distinct (sigma, q, images), not of segments (a ledger records one per epoch)."""
    steps: dict[tuple[float, float, int], int] = {}
    for s in segments:
        _check_segment(s.noise_multiplier, s.sample_rate, s.steps, s.images)
        key = (s.noise_multiplier, s.sample_rate, s.images)
        steps[key] = steps.get(key, 0) + s.steps
    return tuple(Segment(float(sigma), float(q), int(t), int(k)) for (sigma, q, k), t in steps.items() if t > 0)


def compose(segments: Sequence[Segment], delta: float) -> float:
    """Upper bound on epsilon of composing ``segments`` (heterogeneous sigma and q) at ``delta``."""
    checks.delta("delta", delta)
    merged = merge(segments)
    return _upper(list(merged), delta)[0] if merged else 0.0


def compute_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Upper bound on epsilon after ``steps`` Poisson-subsampled Gaussian steps (sigma, q) at delta."""
    _check_segment(noise_multiplier, sample_rate, steps)
    checks.delta("delta", delta)
    return _compute_epsilon(float(noise_multiplier), float(sample_rate), int(steps), float(delta))


@lru_cache(maxsize=256)
def _compute_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """A pure function of its arguments, cached: a run's planning asks for the calibrated sigma's
    epsilon twice (calibration, then the step budget)."""
    return _upper([Segment(sigma, q, steps)], delta)[0] if steps else 0.0


def epsilon_curve(*, noise_multiplier: float, sample_rate: float, steps: Sequence[int], delta: float) -> list[float]:
    """Upper bounds on epsilon after each count in ``steps``, on the mesh sized for the largest count
    (for progress displays and plots: one discretisation of the step for all counts). Each value is
    a rigorous upper bound; at the smaller counts it can differ slightly from ``compute_epsilon``'s,
    whose mesh is sized for that count."""
    checks.delta("delta", delta)
    top = max(steps, default=0)
    _check_segment(noise_multiplier, sample_rate, top)
    if top == 0:
        return [0.0 for _ in steps]
    sigma, q = float(noise_multiplier), float(sample_rate)
    h = _upper([Segment(sigma, q, top)], delta)[1]
    return [max(_epsilon([Segment(sigma, q, int(t))], h, delta), 0.0) if t else 0.0 for t in steps]


def _check_target(target_epsilon: float) -> None:
    checks.finite_positive("target_epsilon", target_epsilon)


def get_noise_multiplier(*, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """A sigma (5 significant digits) whose epsilon upper bound after ``steps`` steps is <= target,
    within about 0.3% of the smallest such sigma.

    Searching is done on grids aimed at ``COARSE`` times the error (cheaper upper bounds; epsilon is
    smooth and falls with sigma, close to a power law, so a secant on log-log axes lands in a few
    evaluations).
    The answer is then settled on ``compute_epsilon`` itself: raised if it overspends, lowered while
    that stays within the target, so what is returned is never less noise than a rigorous upper
    bound says the target allows.
    """
    _check_target(target_epsilon)
    checks.delta("delta", delta)
    _check_segment(1.0, sample_rate, steps)
    if steps == 0:
        raise ValueError("steps must be >= 1 to calibrate a noise multiplier, got 0")

    def upper(sigma: float) -> float:
        return compute_epsilon(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta)

    # steering figures: upper bounds on a grid aimed at COARSE times the reported figure's error,
    # sized to the target (far from it a rougher figure steers as well); they are looser than the
    # reported figure, so aiming them at the target lands the reported one just within it
    def rough(sigma: float) -> float:
        segment = [Segment(sigma, sample_rate, steps)]
        return _epsilon(segment, _mesh(segment, target_epsilon, COARSE * REL_ERROR), delta)

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
        if abs(y - math.log(target_epsilon)) < 1e-4:
            break
        if len(points) > 1 and points[-2][0] != x:
            slope = min((y - points[-2][1]) / (x - points[-2][0]), -0.05)
        step = (math.log(target_epsilon) - y) / slope
        x_new = x + max(min(step, 0.25), -0.25)  # at most a factor 1.28 per move: grids grow fast as sigma falls
        points.append((x_new, math.log(max(rough(math.exp(x_new)), 1e-300))))
    sigma = round_up_sigma(math.exp(points[-1][0]))
    while (eps := upper(sigma)) > target_epsilon:  # the rigorous check; rare, a small raise
        if sigma >= MAX_NOISE_MULTIPLIER:
            raise ValueError(f"target_epsilon={target_epsilon} is unreachable with noise_multiplier<="
                             f"{MAX_NOISE_MULTIPLIER:g}")
        sigma = round_up_sigma(sigma * math.exp((math.log(eps) - math.log(target_epsilon)) / -slope) * (1 + 1e-4))
    # the steering figure is looser than the reported one, so that lands a few tenths of a percent
    # under the target: step down towards it on the reported figure itself while the gain is
    # predicted to exceed 0.1%, keeping only candidates it checks within the target
    for _ in range(4):
        shrink = math.log(target_epsilon / eps) / -slope if eps > 0 else 0.0
        if shrink < 1e-3:
            break
        candidate = round_up_sigma(sigma * math.exp(-0.8 * shrink))
        if candidate >= sigma or (candidate_eps := upper(candidate)) > target_epsilon:
            break
        sigma, eps = candidate, candidate_eps
    return sigma


def round_up_sigma(sigma: float) -> float:
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


def max_steps(*, target_epsilon: float, delta: float, noise_multiplier: float, sample_rate: float,
              limit: int | None = None) -> int:
    """Largest T (at most ``limit``) with compute_epsilon(T) <= target (0 if one step already exceeds it).

    The trainer calls this once with its planned steps as ``limit`` and stops before step T+1:
    no accounting in the hot loop, and a run planned within its budget costs one evaluation.
    The search steers on a coarser grid sized for the largest T tried (``COARSE``), then settles
    on ``compute_epsilon``, the figure every report uses, so that epsilon(T) <= target <
    epsilon(T + 1) holds for it (T and T + 1 share a discretisation of the step). If even
    ``GRID_STEPS`` steps (or, at a tiny delta, as many as floating point can account, ``_accountable``)
    stay within the target, the answer is the larger of that and RDP's closed-form budget: a lower
    bound on the budget (never a step too many), not its last step.
    """
    _check_target(target_epsilon)
    checks.delta("delta", delta)
    _check_segment(noise_multiplier, sample_rate, 1)
    if limit is not None:
        _check_segment(noise_multiplier, sample_rate, limit)
        eps = compute_epsilon(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=limit, delta=delta)
        if eps <= target_epsilon:
            return limit

    # RDP bounds epsilon from above, so its step budget (closed form per order) is a lower
    # bracket; search upwards from it on one coarse grid
    budget = _rdp_max_steps(noise_multiplier, sample_rate, delta, target_epsilon)
    if limit is not None:  # epsilon(limit) > target: the answer is below limit
        lo, cap = min(budget, limit - 1), limit
    else:  # up to GRID_STEPS, and no more steps than floating point can account at this delta
        lo, cap = budget, min(GRID_STEPS, _accountable(delta))
        if budget >= cap:
            return budget

    @lru_cache(maxsize=None)
    def excess(t: int) -> float:
        if t == 0:
            return -target_epsilon
        eps = compute_epsilon(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=t, delta=delta)
        return eps - target_epsilon

    steered = _steer(noise_multiplier, sample_rate, delta, target_epsilon, lo, cap, limit is not None)
    if steered is None:  # more than cap steps are allowed
        return max(budget, cap) if excess(cap) <= 0 else budget
    guess, rate = steered

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
            if hi >= top:  # within the target up to the cap, as when steering finds so
                return top if limit is not None else max(budget, top)
            lo, hi, width = hi, min(hi + 2 * width, top), 2 * width
    else:
        lo, hi = max(guess - 1, 0), guess
        while excess(lo) > 0:
            lo, hi, width = max(lo - 2 * width, 0), lo, 2 * width
    return _bracket_search(excess, lo, hi)


def _steer(sigma: float, q: float, delta: float, target: float, lo: int, cap: int,
           limited: bool) -> tuple[int, float] | None:
    """(a guess of max_steps' answer, epsilon's growth per step there), from upper bounds on a grid
    aimed at ``COARSE`` times the reported figure's error, sized for the largest T tried (from RDP's
    budget ``lo`` up, at most ``cap``); None if even ``cap`` steps stay within the target and ``cap``
    is not the caller's limit."""
    hi = min(2 * lo + 2, cap)
    while True:
        h = _mesh([Segment(sigma, q, hi)], target, COARSE * REL_ERROR)

        def rough(t: int) -> float:
            return _epsilon([Segment(sigma, q, t)], h, delta) if t else 0.0

        if rough(hi) > target:
            guess = _bracket_search(lambda t: rough(t) - target, lo, hi)
            break
        if hi == cap:
            if not limited:
                return None
            guess = cap - 1
            break
        lo, hi = hi, min(4 * hi, cap)
    d = max(guess // 100, 1)
    below, above = max(guess - d, 1), min(guess + d, hi)
    rate = (rough(above) - rough(below)) / (above - below) if above > below else 0.0
    return guess, rate


def _accountable(delta: float) -> int:
    """The most steps whose FFT rounding charge (``_rounding``), in the last of ``ARITHMETIC`` on the
    largest grid, fits that arithmetic's share of delta: ``_epsilon`` refuses more."""
    dtype, share = ARITHMETIC[-1]
    room = delta / share / float(np.finfo(dtype).eps)  # the charge may reach this many epsilons
    return max(int(room / ROUNDING - math.sqrt(MAX_GRID_POINTS)), 0)


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
    is looser than the PLD, so the PLD allows at least this many steps."""
    orders, per_step = RDP_ORDERS, _rdp(q, sigma)
    room = target + np.log(delta * orders) / (orders - 1) - np.log1p(-1 / orders)
    with np.errstate(divide="ignore", invalid="ignore"):
        steps = np.where((room > 0) & (per_step > 0), np.floor(room / per_step), 0)
    return int(min(np.nanmax(steps), MAX_STEPS))


def plan(*, num_samples: int, batch_size: float, epochs: float) -> tuple[float, int]:
    """(q, steps) of a Poisson-sampled run: q = expected batch / N, ceil(1/q) steps per epoch."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"dataset size must be an integer >= 1, got {num_samples!r}")
    checks.finite_positive("batch", batch_size)
    checks.finite_positive("epochs", epochs)
    if batch_size > num_samples:
        raise ValueError(f"expected batch {batch_size:g} exceeds the dataset size {num_samples}; lower batch")
    q = batch_size / num_samples
    return q, math.ceil(epochs * math.ceil(1 / q - 1e-9) - 1e-9)
