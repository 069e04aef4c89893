"""Privacy accounting for DP-SGD with the PRV accountant (Gopi, Lee, Wutschitz 2021).

Privacy assumptions relied on here:

* Every optimizer step is one Poisson-subsampled Gaussian mechanism: each record is in the batch
  independently with probability q, the summed clipped gradients have L2 sensitivity C under
  adding/removing one record, and the noise is N(0, (sigma*C)^2). The accountant sees only
  (sigma, q, steps); the caller must make those true (see ``sampling`` and ``mechanism``).
* delta is the caller's: it should be well below 1/N.
* The reported epsilon is the PRV accountant's rigorous **upper** bound, never the estimate.

We use ``prv_accountant``'s privacy random variable (the mechanism's CDF), its domain, discrete
PRV and Fourier/heterogeneous composers, and fix three numerical traps of its 0.2.0 release:

1. ``eps_error`` is absolute. We size it to the epsilon being computed (from the RDP bound,
   refined by a second pass if RDP was much looser), so the upper bound stays within 1% of the true epsilon at small and large epsilon alike.
2. Its truncated PRV forgets to subtract the CDF at the lower truncation point and integrates
   the mean on fixed points near 0, which fails at large epsilon ("Discrete mean differs from
   continuous mean significantly") or biases it. ``_TruncatedPRV`` fixes both.
3. Cost grows as ``eps_error`` shrinks: ``max_steps`` builds one discretisation for the largest
   candidate T and reuses its Fourier transform for every T it tries.

Speed: most of a query used to be prv_accountant's pure-Python RDP series, computed three times
per query (grid error, domain size, search bracket). ``_rdp`` computes the RDP curve of one
(sigma, q) once, integer orders 2-256 in closed form, and caches it; the orders reach 256 so that
RDP can bracket small epsilon (orders up to 63 cannot certify epsilon=0.1 at delta=1e-5 at any sigma).
Where RDP is the answer itself (``max_steps`` beyond ``GRID_STEPS``), it is a valid bound at every
order it uses, so fewer orders only make it more conservative. The truncated PRV's mean, needed by
every discretisation, is a fixed Gauss-Legendre rule on the CDF's smooth pieces instead of adaptive
quadrature (the same value to ~1e-7, tested, in one vectorised call instead of hundreds).
This module must not import Ultralytics.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Callable, Iterable, Sequence

import numpy as np
from prv_accountant import PoissonSubsampledGaussianMechanism
from prv_accountant.composers import Heterogeneous
from prv_accountant.discrete_privacy_random_variable import DiscretePrivacyRandomVariable
from prv_accountant.discretisers import CellCentred
from prv_accountant.domain import Domain
from scipy import special
from scipy.fft import next_fast_len

ACCOUNTANT_NAME = "prv"
REL_ERROR = 0.004  # eps_error as a fraction of epsilon: upper - true <= ~2 * eps_error < 1%
MIN_EPS_ERROR = 1e-4
MAX_NOISE_MULTIPLIER = 1e4
MAX_STEPS = 10**9
GRID_STEPS = 10**7  # above this many steps, max_steps answers with the RDP budget (a grid would not fit in memory)
RDP_ORDERS = np.arange(2, 257)  # integer orders only: closed form, vectorised (see _rdp)
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(64)
SIGMA_RESOLUTION = 1e-4


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


class _Composition:
    """Discretised PRVs for a list of segments, able to compose any step counts up to theirs."""

    def __init__(self, segments: Sequence[Segment], eps_error: float, delta_error: float) -> None:
        prvs = [PoissonSubsampledGaussianMechanism(s.sample_rate, s.noise_multiplier) for s in segments]
        counts = [s.steps for s in segments]
        length = _safe_domain_size(segments, eps_error, delta_error)
        mesh = eps_error / math.sqrt(sum(counts) / 2 * math.log(12 / delta_error))
        # widen [-length, length] symmetrically to an FFT-friendly even size: a larger domain is
        # only safer, and an awkward size (large prime factors) makes every FFT several times slower
        size = len(Domain.create_aligned(-length, length, mesh))
        while (fast := next_fast_len(size, real=True)) % 2:
            size = fast + 1
        half = (fast // 2 - 1) * mesh
        domain = Domain.create_aligned(-half, half, mesh)
        dprvs = [
            CellCentred().discretise(_TruncatedPRV(p, domain.t_min(), domain.t_max()), domain) for p in prvs
        ]
        self.composer = Heterogeneous(dprvs)
        self.eps_error, self.delta_error = eps_error, delta_error

    def epsilon(self, delta: float, counts: Sequence[int]) -> tuple[float, float, float]:
        """(lower, estimate, upper) epsilon of composing ``counts[i]`` steps of segment i."""
        f_n: DiscretePrivacyRandomVariable = self.composer.compute_composition(list(counts))
        return f_n.compute_epsilon(delta, self.delta_error, self.eps_error)


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
    a = RDP_ORDERS[:, None]
    k = np.arange(RDP_ORDERS[-1] + 1)[None, :]
    with np.errstate(invalid="ignore"):
        terms = (special.gammaln(a + 1) - special.gammaln(k + 1) - special.gammaln(a - k + 1)
                 + k * math.log(q) + (a - k) * math.log1p(-q) + (k * k - k) / (2 * sigma**2))
    return special.logsumexp(np.where(k <= a, terms, -np.inf), axis=1) / (RDP_ORDERS - 1)


def _rdp_to_epsilon(rdp: np.ndarray, delta: float) -> float:
    """Epsilon from total RDP at each order (the conversion prv_accountant and TF Privacy use)."""
    eps = rdp - np.log(delta * RDP_ORDERS) / (RDP_ORDERS - 1) + np.log1p(-1 / RDP_ORDERS)
    return float(np.nanmin(eps))


def rdp_epsilon(segments: Sequence[Segment], delta: float) -> float:
    """RDP upper bound on epsilon (looser than PRV): sizes the PRV grid, brackets searches."""
    segs = _active(segments)
    if not segs:
        return 0.0
    return _rdp_to_epsilon(sum(s.steps * _rdp(s.sample_rate, s.noise_multiplier) for s in segs), delta)


def _safe_domain_size(segments: Sequence[Segment], eps_error: float, delta_error: float) -> float:
    """Half-width L of a grid that holds all but delta_error of the composed PRV's mass: remark 5.6
    of Gopi et al. 2021, as prv_accountant's ``compute_safe_domain_size``, on the cached RDP."""
    total = sum(s.steps for s in segments)
    widest = rdp_epsilon(segments, delta_error / 4)
    for s in segments:
        widest = max(widest, rdp_epsilon([Segment(s.noise_multiplier, s.sample_rate, 1)], delta_error / 8 / total))
    return max(widest, eps_error) + 3


def epsilon_bounds(segments: Sequence[Segment], delta: float) -> tuple[float, float, float]:
    """(lower, estimate, upper) epsilon of composing all segments, with eps_error sized to epsilon."""
    _check_delta(delta)
    for s in segments:
        _check_segment(s.noise_multiplier, s.sample_rate, s.steps)
    segs = _active(segments)
    if not segs:
        return 0.0, 0.0, 0.0
    delta_error = delta / 1000
    counts = [s.steps for s in segs]
    # RDP bounds epsilon from above, so this grid is usually fine enough already; if RDP was
    # much looser than PRV, redo it with the grid sized to the PRV estimate
    eps_error = max(REL_ERROR * rdp_epsilon(segs, delta), MIN_EPS_ERROR)
    bounds = _Composition(segs, eps_error, delta_error).epsilon(delta, counts)
    wanted = max(REL_ERROR * bounds[1], MIN_EPS_ERROR)
    if eps_error > 1.25 * wanted:
        bounds = _Composition(segs, wanted, delta_error).epsilon(delta, counts)
    return bounds


def compose(segments: Sequence[Segment], delta: float) -> float:
    """Upper bound on epsilon of composing ``segments`` (heterogeneous sigma and q) at ``delta``.

    Composition is commutative, so segments with the same (sigma, q) are merged first: the cost
    grows with the number of distinct (sigma, q), not of segments (a ledger records one per epoch)."""
    steps: dict[tuple[float, float], int] = {}
    for s in segments:
        steps[(s.noise_multiplier, s.sample_rate)] = steps.get((s.noise_multiplier, s.sample_rate), 0) + s.steps
    return max(epsilon_bounds([Segment(sigma, q, t) for (sigma, q), t in steps.items()], delta)[2], 0.0)


def compute_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Upper bound on epsilon after ``steps`` Poisson-subsampled Gaussian steps (sigma, q) at delta."""
    _check_segment(noise_multiplier, sample_rate, steps)
    _check_delta(delta)
    return _compute_epsilon(float(noise_multiplier), float(sample_rate), int(steps), float(delta))


@lru_cache(maxsize=256)
def _compute_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """A pure function of its arguments, cached: a run's planning asks for the calibrated sigma's
    epsilon twice (calibration, then the step budget)."""
    return max(epsilon_bounds([Segment(sigma, q, steps)], delta)[2], 0.0)


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
    return [max(comp.epsilon(delta, [t])[2], 0.0) if t else 0.0 for t in steps]


def _check_target(target_epsilon: float) -> None:
    _check_finite_positive("target_epsilon", target_epsilon)


def get_noise_multiplier(*, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Smallest sigma (to 1e-4) whose epsilon upper bound after ``steps`` steps is <= target."""
    _check_target(target_epsilon)
    _check_delta(delta)
    _check_segment(1.0, sample_rate, steps)
    if steps == 0:
        raise ValueError("steps must be >= 1 to calibrate a noise multiplier, got 0")

    def eps(k: int) -> float:  # sigma on a grid of SIGMA_RESOLUTION, as returned (compute_epsilon's cache serves
        # repeated candidates and the step budget's check after calibration)
        return compute_epsilon(noise_multiplier=round(k * SIGMA_RESOLUTION, 10), sample_rate=sample_rate, steps=steps,
                               delta=delta)

    # RDP bounds epsilon from above, so the sigma RDP needs is enough for PRV too (checked): start
    # there and bracket downwards in 10% steps; where RDP cannot certify the target (small
    # epsilon), double sigma from 1 on PRV itself
    sigma_rdp = _rdp_noise_multiplier(sample_rate, steps, delta, target_epsilon)
    if sigma_rdp is None:
        hi = 1.0
        while eps(math.ceil(hi / SIGMA_RESOLUTION)) > target_epsilon:
            hi *= 2
            if hi > MAX_NOISE_MULTIPLIER:
                raise ValueError(
                    f"target_epsilon={target_epsilon} is unreachable: even noise_multiplier="
                    f"{MAX_NOISE_MULTIPLIER:g} spends more over {steps} steps at q={sample_rate}; "
                    "raise the target, or use fewer steps or a smaller sampling rate"
                )
        sigma_rdp = hi
    k_hi = math.ceil(sigma_rdp / SIGMA_RESOLUTION)
    while eps(k_hi) > target_epsilon:  # PRV upper bound above RDP: rare, but fail closed
        k_hi = math.ceil(k_hi * 1.25)
    k_lo = max(int(k_hi * 0.9), 1)
    while k_lo > 1 and eps(k_lo) <= target_epsilon:
        k_hi, k_lo = k_lo, max(int(k_lo * 0.9), 1)
    if eps(k_lo) <= target_epsilon:
        return round(k_lo * SIGMA_RESOLUTION, 10)
    # largest k that still overspends; epsilon falls as sigma grows, so search on its negation
    k_fail = _bracket_search(lambda k: target_epsilon - eps(k), k_lo, k_hi)
    return round((k_fail + 1) * SIGMA_RESOLUTION, 10)


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
    """Largest T (at most ``limit``) with epsilon(T) <= target (0 if one step already exceeds it).

    The trainer calls this once with its planned steps as ``limit`` and stops before step T+1:
    no accounting in the hot loop, and a run planned within its budget costs one evaluation. The
    search reuses one discretisation sized for the largest T tried, so every candidate is checked
    with an eps_error finer than ``compute_epsilon`` would use for it. Budgets beyond
    ``GRID_STEPS`` steps are RDP's closed form: a lower bound on PRV's (never a step too many),
    since a grid for that many compositions would not fit in memory.
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
    # bracket; search upwards from it on one grid, then settle on compute_epsilon's figure
    lo = _rdp_max_steps(noise_multiplier, sample_rate, delta, target_epsilon)
    if limit is not None:  # epsilon(limit) > target: the answer is below limit
        lo, cap = min(lo, limit - 1), limit
    elif lo >= GRID_STEPS:
        return lo
    else:
        cap = GRID_STEPS
    eps_error = max(REL_ERROR * target_epsilon, MIN_EPS_ERROR)
    hi = min(2 * lo + 2, cap)
    while True:
        comp = _Composition([Segment(noise_multiplier, sample_rate, hi)], eps_error, delta / 1000)
        if comp.epsilon(delta, [hi])[2] > target_epsilon:
            guess = _bracket_search(lambda t: comp.epsilon(delta, [t])[2] - target_epsilon if t else -target_epsilon,
                                    lo, hi)
            break
        if hi == cap:
            if limit is None:
                return lo  # PRV allows more than GRID_STEPS; RDP's figure is a safe answer
            guess = limit - 1  # the shared grid and compute_epsilon's disagree at limit: settle below
            break
        lo, hi = hi, min(4 * hi, cap)

    # The shared grid and compute_epsilon's own grid differ slightly: settle on compute_epsilon,
    # the figure every report uses, so that epsilon(T) <= target < epsilon(T + 1) holds for it.
    @lru_cache(maxsize=None)
    def excess(t: int) -> float:
        if t == 0:
            return -target_epsilon
        eps = compute_epsilon(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=t, delta=delta)
        return eps - target_epsilon

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
