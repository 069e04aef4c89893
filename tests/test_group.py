"""A person's epsilon in an image-level run: the mixture of their images, against dp_accounting."""

from __future__ import annotations

import math

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from scipy.stats import binom

from ultralytics_dp.accounting.accountant import release
from ultralytics_dp.accounting.group import person_segment, person_segments
from ultralytics_dp.accounting.pld import Segment


def tight(sigma: float, q: float, k: int, steps: int, delta: float) -> float:
    """Independent reference: dp_accounting's PLD of the person's mixture, sum of Binomial(k, q)
    clipped images per step (Ganesh 2024)."""
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    weights = [float(binom.pmf(j, k, q)) for j in range(k + 1)]
    acc.compose(dp_event.MixtureOfGaussiansDpEvent(sigma, list(range(k + 1)), weights), steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("sigma, q, steps, k", [(0.8, 0.05, 40, 3), (1.2, 0.01, 300, 5), (0.7, 0.1, 20, 2)])
def test_a_persons_epsilon_is_the_mixture_of_their_images_as_an_independent_accountant_has_it(sigma, q, steps, k):
    """Both accountants (the release refuses if they disagree) against dp_accounting's PLD of the
    person's mixture: within 1%, and above one image's epsilon."""
    delta = 1e-5
    ours = release(person_segments([Segment(sigma, q, steps)], k), delta).epsilon
    reference = tight(sigma, q, k, steps, delta)
    one_image = release([Segment(sigma, q, steps)], delta).epsilon
    assert ours == pytest.approx(reference, rel=0.01) and one_image < ours


def test_one_image_is_the_step_itself_and_all_k_images_at_q_1_are_the_gaussian_of_k_c():
    segment = Segment(0.9, 0.02, 100)
    assert person_segment(segment, 1) == segment
    assert person_segment(segment, 4) == Segment(0.9, 0.02, 100, images=4)
    assert person_segment(Segment(0.9, 1.0, 100), 3) == Segment(0.3, 1.0, 100)
    with pytest.raises(ValueError, match="at least one image"):
        person_segment(segment, 0)


def test_no_finite_bound_from_prv_accountant_releases_infinity_not_a_number():
    """prv-accountant finds no finite bound for a loss too large for its domain: nothing is claimed."""
    assert release([Segment(0.06, 0.05, 5000)], 1e-5).epsilon == math.inf


@pytest.mark.slow
def test_the_readmes_person_table_is_what_the_package_states():
    """README, "Choosing the privacy unit": the per-image run, group privacy's arithmetic and the
    per-person epsilon column are recomputed (the dp_accounting column is from
    ``benchmarks/bench_persons.py``; the test above compares the two accountants with it)."""
    import re
    from pathlib import Path

    from ultralytics_dp.accounting import accountant
    from ultralytics_dp.accounting.pld import plan

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Choosing the privacy unit")[1].split("\n## ")[0]
    rows = re.findall(r"^\| (\d+) \| \(([\d.]+), ([\de.+-]+)\) \| ([\d.]+) \| ([\d.]+) \|$", section, re.M)
    assert [int(r[0]) for r in rows] == [1, 2, 5, 10]
    q, steps = plan(num_samples=50_000, batch_size=256, epochs=30)
    sigma = accountant.noise_multiplier(target_epsilon=8.0, delta=1e-5, sample_rate=q, steps=steps)
    eps = accountant.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5).epsilon
    for k, group_eps, group_delta, _, stated in rows:
        k = int(k)
        assert float(group_eps) == pytest.approx(k * eps, abs=0.05)
        assert float(group_delta) == pytest.approx(1e-5 * math.expm1(k * eps) / math.expm1(eps), rel=0.05)
        ours = release(person_segments([Segment(sigma, 256 / 50_000, steps)], k), 1e-5).epsilon
        assert float(stated) == pytest.approx(ours, abs=0.05)
