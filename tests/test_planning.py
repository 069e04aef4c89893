"""Planning a private run as a pure function: delta < 1/N, sigma calibration against an independent
PLD accountant, the dataset's lifetime budget, and what a resumed run may change."""

from __future__ import annotations

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant

from ultralytics_dp.config import DPConfig
from ultralytics_dp.accounting.pld import Segment
from ultralytics_dp.accounting.planning import BudgetGroup, RecordBudgets, plan_run

from helpers import assert_refused


def pld_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def test_delta_must_be_below_one_over_n():
    with pytest.raises(ValueError, match="1/N"):
        plan_run(DPConfig(epsilon=4, delta=1e-3), num_samples=1000, batch=50, epochs=1)
    plan_run(DPConfig(epsilon=4, delta=9e-4, noise_multiplier=1.0), num_samples=1000, batch=50, epochs=1)


@pytest.mark.slow
def test_delta_not_below_one_over_n_is_refused_by_the_trainer(tiny_det, tmp_path):
    assert_refused(tmp_path, tiny_det, "1/N", dp_kwargs=dict(delta=1 / 32))


def test_calibrated_sigma_spends_the_target_over_the_planned_steps():
    plan = plan_run(DPConfig(epsilon=3.0, delta=1e-5), num_samples=2000, batch=100, epochs=3)
    assert (plan.sample_rate, plan.planned_steps, plan.steps_per_epoch) == (0.05, 60, 20)
    assert plan.calibrated and plan.max_steps == 60
    assert pld_epsilon(plan.noise_multiplier, 0.05, 60, 1e-5) <= 3.0
    assert pld_epsilon(0.97 * plan.noise_multiplier, 0.05, 60, 1e-5) > 3.0  # not needlessly noisy


def groups(*spec):
    """RecordBudgets from (records, budget, (sigma, q, steps) spent) per group."""
    return RecordBudgets(1e-5, tuple(BudgetGroup(n, b, (Segment(*spent),)) for n, b, spent in spec))


@pytest.mark.slow  # calibration takes seconds
def test_record_budgets_refuse_a_calibrated_run():
    with pytest.raises(ValueError, match=r"this run would take 7 training image\(s\) past"):
        plan_run(DPConfig(epsilon=8), num_samples=1000, batch=100, epochs=2,
                 records=groups((7, 2.5, (1.8, 0.1, 60)), (90, 100.0, (1.8, 0.1, 60))))


@pytest.mark.slow  # accounting searches take seconds
def test_record_budgets_cut_a_run_with_a_given_sigma_at_the_first_image_to_reach_its_budget():
    records = groups((7, 2.5, (1.8, 0.1, 60)), (90, 3.0, (5.0, 0.1, 10)))
    cut = plan_run(DPConfig(epsilon=50, noise_multiplier=1.0), num_samples=1000, batch=100, epochs=2, records=records)
    assert 0 < cut.max_steps < cut.planned_steps == 20
    assert pld_epsilon_of([(1.8, 0.1, 60), (1.0, 0.1, cut.max_steps)]) <= 2.5 * 1.005
    assert pld_epsilon_of([(1.8, 0.1, 60), (1.0, 0.1, cut.max_steps + 2)]) > 2.5
    loose = groups((7, 50.0, (1.8, 0.1, 60)))
    assert plan_run(DPConfig(epsilon=50, noise_multiplier=1.0), num_samples=1000, batch=100, epochs=2,
                    records=loose).max_steps == 20


def pld_epsilon_of(segments):
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    for sigma, q, steps in segments:
        acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(1e-5)


def test_a_resumed_run_carries_on_and_keeps_its_settings():
    """The resumed entry's sigma (2.0) is used, not recalibrated (it would be far lower for epsilon=40)."""
    entry = {"settings": DPConfig(epsilon=40).released(), "steps": 15, "noise_multiplier": 2.0,
             "num_samples": 1000, "sample_rate": 0.1}
    resumed = plan_run(DPConfig(epsilon=40, physical_batch=8), num_samples=1000, batch=100, epochs=4, resumed=entry)
    assert resumed.noise_multiplier == 2.0 and not resumed.calibrated and resumed.max_steps == 40
    with pytest.raises(ValueError, match=r"max_grad_norm: 1.0 -> 2.0"):
        plan_run(DPConfig(epsilon=40, max_grad_norm=2.0), num_samples=1000, batch=100, epochs=4, resumed=entry)
    with pytest.raises(ValueError, match=r"num_samples: 1000 -> 1001"):
        plan_run(DPConfig(epsilon=40), num_samples=1001, batch=100, epochs=4, resumed=entry)
