"""The released epsilon: the larger of two independent upper bounds (``pld`` and prv-accountant),
refused when they disagree; calibration and step budgets settled on it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from test_pld import pld_epsilon
from ultralytics_dp.accounting import accountant, pld
from ultralytics_dp.accounting.accountant import AccountantsDisagree, PrivacyAccountant, release
from ultralytics_dp.accounting.pld import Segment

SEGMENTS = [(1.0, 0.02, 300), (2.0, 0.05, 100), (0.9, 0.01, 500)]


@pytest.mark.parametrize("segments,delta", [
    ([(1.25, 0.128, 6)], 1e-5), ([(0.64, 0.75, 27)], 1e-5), ([(1.0, 0.01, 1000)], 1e-6), (SEGMENTS, 1e-5)])
def test_the_released_epsilon_is_the_larger_bound_and_bounds_an_independent_reference(segments, delta):
    released = release([Segment(*s) for s in segments], delta)
    assert released.epsilon == max(released.by_accountant.values())
    assert set(released.by_accountant) == {"pld", "prv_accountant"}
    reference = pld_epsilon(segments, delta)  # Google's dp_accounting, pessimistic PLD
    assert reference * (1 - 1e-3) <= released.epsilon <= reference * 1.01


def test_heterogeneous_segments_and_the_accountants_state():
    acc = PrivacyAccountant()
    for sigma, q, steps in SEGMENTS:
        for _ in range(steps // 100):
            acc.step(noise_multiplier=sigma, sample_rate=q, steps=100)
    acc.step(noise_multiplier=0.9, sample_rate=0.01, steps=np.int64(0))  # numpy counts are counted too
    assert acc.steps == sum(s[2] for s in SEGMENTS) and len(acc.history) == 3
    state = json.loads(json.dumps(acc.state_dict()))
    other = PrivacyAccountant()
    other.load_state_dict(state)
    assert other.history == acc.history and other.epsilon(1e-5) == acc.epsilon(1e-5)
    legacy = PrivacyAccountant()  # checkpoints written before both accountants named the state "prv"
    legacy.load_state_dict({**state, "accountant": "prv"})
    assert legacy.history == acc.history
    with pytest.raises(ValueError, match="accountant"):
        PrivacyAccountant().load_state_dict({"accountant": "rdp", "history": []})
    with pytest.raises(ValueError, match="sample_rate"):
        PrivacyAccountant().step(noise_multiplier=1.0, sample_rate=2.0)


@pytest.mark.parametrize("factor", [0.97, 1.2])
def test_an_own_bound_that_disagrees_is_refused_naming_both(monkeypatch, factor):
    """A wrong own bound (below prv-accountant's lower bound, or far above its upper bound) is a bug:
    no epsilon is released, and the error names both figures and the mechanism."""
    true_compose = pld.compose
    monkeypatch.setattr(pld, "compose", lambda segments, delta: factor * true_compose(segments, delta))
    accountant._release.cache_clear()
    with pytest.raises(AccountantsDisagree, match=r"sigma=1\.1, q=0\.05, steps=200\) at delta=1e-05: pld"):
        release([Segment(1.1, 0.05, 200)], 1e-5)
    monkeypatch.undo()
    accountant._release.cache_clear()
    assert release([Segment(1.1, 0.05, 200)], 1e-5).epsilon > 0  # after the fault: released as usual


@pytest.mark.parametrize("target,q,steps", [(8.0, 0.128, 8), (1.0, 0.01, 1000), (3.0, 0.75, 27)])
def test_calibration_and_the_step_budget_hold_on_the_released_figure(target, q, steps):
    sigma = accountant.noise_multiplier(target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps)
    assert accountant.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5).epsilon <= target
    assert accountant.epsilon(noise_multiplier=sigma / 1.01, sample_rate=q, steps=steps, delta=1e-5).epsilon > target
    budget = accountant.max_steps(target_epsilon=target, delta=1e-5, noise_multiplier=sigma * 0.9, sample_rate=q)
    assert 0 < budget < steps
    assert accountant.epsilon(noise_multiplier=sigma * 0.9, sample_rate=q, steps=budget, delta=1e-5).epsilon <= target
    over = int(budget * 1.03) + 1
    assert accountant.epsilon(noise_multiplier=sigma * 0.9, sample_rate=q, steps=over, delta=1e-5).epsilon > target
