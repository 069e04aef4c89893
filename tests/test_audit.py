"""The one-run audit (``ultralytics_dp.audit``): its bound against independent computations and
simulated mechanisms of known epsilon, the canaries against a direct sum, and the whole audit
against a deliberately broken mechanism (a test-only fault: the noise switched off)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from ultralytics_dp.auditing import bound
from ultralytics_dp.auditing.canaries import GradientCanaries


def _rr_tail(r: int, v: int, eps: float) -> float:
    """P[Binomial(r, e^eps / (1 + e^eps)) >= v], summed term by term."""
    p = math.exp(eps) / (1 + math.exp(eps))
    return sum(math.comb(r, j) * p**j * (1 - p) ** (r - j) for j in range(v, r + 1))


@pytest.mark.parametrize("r,v,eps", [(10, 9, 1.0), (100, 70, 0.5), (50, 50, 3.0), (30, 12, 2.0)])
def test_p_value_at_delta_zero_is_the_randomised_response_tail(r, v, eps):
    assert bound.p_value(r, r, v, eps, 0.0) == pytest.approx(_rr_tail(r, v, eps), rel=1e-9)


def test_delta_only_adds_to_the_p_value():
    assert bound.p_value(1000, 100, 80, 1.0, 1e-3) > bound.p_value(1000, 100, 80, 1.0, 0.0)


def test_all_guesses_right_bounds_epsilon_by_the_guess_count():
    # v = r correct: p^r <= 1 - confidence at p = e^eps / (1 + e^eps), solved by hand
    r, level = 100, 0.05
    p = level ** (1 / r)
    assert bound.epsilon_lower_bound(r, r, r, 0.0, 1 - level) == pytest.approx(math.log(p / (1 - p)), rel=1e-6)
    assert bound.epsilon_lower_bound(100, 100, 50, 1e-5, 0.95) == 0.0  # a coin's worth of right guesses


def _simulated_audits(trials: int, m: int, draw, delta: float, confidence: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(trials):
        included = rng.random(m) < 0.5
        out.append(bound.best_guess(draw(rng, included), included, delta, confidence).epsilon_lb)
    return np.array(out)


def test_randomised_response_of_known_epsilon_is_bounded_below_it_and_not_vacuously():
    """eps-randomised response is exactly eps-DP: the bound may exceed eps in at most 5 % of audits
    (95 % confidence), and with m = 1000 it should come close to eps."""
    eps = 1.0
    keep = math.exp(eps) / (1 + math.exp(eps))

    def rr(rng, included):
        answer = np.where(rng.random(len(included)) < keep, included, ~included)
        return answer + 0.01 * rng.random(len(included))  # ties broken at random

    lb = _simulated_audits(200, 1000, rr, 0.0, 0.95)
    assert np.mean(lb > eps) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 200)
    assert np.median(lb) > 0.5 * eps


def test_gaussian_scores_are_bounded_below_the_gaussian_mechanisms_epsilon():
    """Scores N(mu * included, 1): the Gaussian mechanism, whose exact epsilon at delta is known
    (Balle and Wang 2018: delta = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu))."""
    mu, delta = 2.0, 1e-5
    exact = next(e for e in np.arange(0, 20, 1e-3)
                 if stats.norm.cdf(mu / 2 - e / mu) - math.exp(e) * stats.norm.cdf(-mu / 2 - e / mu) <= delta)
    lb = _simulated_audits(100, 1000, lambda rng, inc: mu * inc + rng.standard_normal(len(inc)), delta, 0.95)
    assert np.mean(lb > exact) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 100)
    assert np.median(lb) > 0.25 * exact


def test_the_ceiling_is_what_every_guess_right_shows():
    """All m canaries guessed right at delta 0: p^m = (1 - confidence) / 12 (the Bonferroni share of
    the largest guess set), solved by hand."""
    m, level = 400, 0.05
    p = (level / 12) ** (1 / m)
    assert bound.ceiling(m, 0.0, 1 - level) == pytest.approx(math.log(p / (1 - p)), rel=1e-6)
    assert bound.ceiling(1000, 1e-5, 0.95) < 8  # the README's epsilon=8 example needs more canaries to fail


def test_a_guess_needs_scores_for_every_canary():
    with pytest.raises(ValueError, match="one score each"):
        bound.best_guess([1.0, 2.0, 3.0], [True, False], 1e-5, 0.95)
    with pytest.raises(ValueError, match="finite"):
        bound.best_guess([1.0, float("nan")], [True, False], 1e-5, 0.95)


def test_gradient_canaries_add_clipped_diracs_at_their_own_coordinates():
    """q = 1: every included canary adds C (its norm 10 C clipped) at its own coordinate, nothing
    elsewhere."""
    canaries = GradientCanaries(6, norm=10.0)
    total = {"small": torch.zeros(3), "big": torch.zeros(4, 5)}
    canaries.add_to(total, sample_rate=1.0, max_grad_norm=0.5)
    name, coords = canaries._where
    assert name == "big" and len(set(coords.tolist())) == 6 and total["small"].abs().sum() == 0
    expected = torch.zeros(20)
    expected[coords] = torch.where(canaries.included, torch.tensor(0.5), torch.tensor(0.0))
    torch.testing.assert_close(total["big"].view(-1), expected, atol=1e-6, rtol=0)


def test_a_canarys_score_is_the_likelihood_ratio_of_its_observations():
    """Against the two densities written out with scipy: in, the coordinate is c + noise with
    probability q (else noise); out, noise alone. The score reads only the released gradient."""
    q, bound_c, std, divisor = 0.3, 0.5, 2.0, 8.0
    c = 10.0 * bound_c / (10.0 + 1e-6)  # a norm-10 canary clipped to 0.5 (the mechanism's 1e-6 guard)
    canaries = GradientCanaries(4, norm=10.0)
    canaries.add_to({"w": torch.zeros(10)}, sample_rate=q, max_grad_norm=bound_c)
    coords = canaries._where[1].numpy()
    rng = np.random.default_rng(0)
    seen = [rng.normal(0, 3, 10) for _ in range(3)]  # the private gradient (sum / divisor) of 3 steps
    for grad in seen:
        canaries.observe({"w": torch.tensor(grad)}, sample_rate=q, divisor=divisor, noise_std=std)
    expected = sum(np.log(((1 - q) * stats.norm.pdf(x, 0, std) + q * stats.norm.pdf(x, c, std)) / stats.norm.pdf(x, 0, std))
                   for x in (g[coords] * divisor for g in seen))
    np.testing.assert_allclose(canaries.scores(), expected, rtol=1e-9)


def test_gradient_canaries_are_sampled_at_the_steps_rate():
    canaries = GradientCanaries(400, norm=1.0)
    total = {"w": torch.zeros(1000)}
    for _ in range(50):
        canaries.add_to(total, sample_rate=0.2, max_grad_norm=1.0)
    inside = canaries.included.sum().item()
    counts = total["w"][canaries._where[1]]
    assert counts[~canaries.included].abs().sum() == 0
    rate = counts[canaries.included].sum().item() / (inside * 50 * (1 - 1e-6))
    assert abs(rate - 0.2) < 4 * math.sqrt(0.2 * 0.8 / (inside * 50))


@pytest.mark.slow
def test_the_audit_fails_a_mechanism_without_noise_and_passes_the_real_one(tmp_path, monkeypatch):
    """Through ``yolo-dp audit`` and the real trainer: with the noise switched off (a fault that
    no setting reaches) the lower bound exceeds the claimed epsilon and the command fails."""
    from ultralytics_dp.cli import main
    from ultralytics_dp.mechanism import gaussian

    args = ["audit", "epsilon=1", "canaries=200", "confidence=0.99", "epochs=2", "imgsz=32", "batch=32",
            "workers=0", "plots=False", f"project={tmp_path}"]
    assert main([*args, "name=real"]) == 0
    real = json.loads((tmp_path / "real" / "audit.json").read_text())
    assert real["passed"] and real["epsilon_lb"] <= real["claimed_epsilon"] <= 1.0
    assert "Empirical audit" in (tmp_path / "real" / "privacy.html").read_text()

    noisy_flat = gaussian.noisy_flat
    monkeypatch.setattr(gaussian, "noisy_flat", lambda grads, **kw: noisy_flat(grads, **{**kw, "noise_multiplier": 0.0}))
    assert main([*args, "name=broken"]) == 1
    broken = json.loads((tmp_path / "broken" / "audit.json").read_text())
    assert broken["epsilon_lb"] > broken["claimed_epsilon"] and not broken["passed"]
