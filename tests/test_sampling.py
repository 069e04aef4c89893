"""Poisson sampling: statistical tests of inclusion, empty batches, OS seeding, physical chunks."""

from __future__ import annotations

import math

import pytest
import torch

from ultralytics_dp.mechanism.sampling import PoissonBatchSampler, split_physical


def test_poisson_sampler_statistics():
    n, q, steps = 200, 0.05, 4000
    sampler = PoissonBatchSampler(n, q, steps, generator=torch.Generator().manual_seed(1))
    assert len(sampler) == steps
    batches = list(sampler)
    assert len(batches) == steps
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    mean, var = n * q, n * q * (1 - q)
    assert abs(sizes.mean().item() - mean) < 5 * math.sqrt(var / steps)
    # the sample variance's standard error for a ~normal variable: var * sqrt(2 / (steps - 1))
    assert abs(sizes.var().item() - var) < 5 * var * math.sqrt(2 / (steps - 1))
    counts = torch.zeros(n)
    for b in batches:
        assert len(set(b)) == len(b) and all(0 <= i < n for i in b)
        counts[b] += 1
    freq = counts / steps
    se = math.sqrt(q * (1 - q) / steps)
    assert ((freq - q).abs() < 5 * se).all()


def test_poisson_sampler_yields_empty_batches():
    sampler = PoissonBatchSampler(10, 0.02, 500, generator=torch.Generator().manual_seed(0))
    sizes = [len(b) for b in sampler]
    assert len(sizes) == 500
    assert sizes.count(0) > 300  # P(empty) = 0.98^10 ≈ 0.82


def test_poisson_sampler_default_generator_ignores_global_seed():
    torch.manual_seed(0)
    a = list(PoissonBatchSampler(100, 0.5, 3))
    torch.manual_seed(0)
    b = list(PoissonBatchSampler(100, 0.5, 3))
    assert a != b


@pytest.mark.parametrize(
    "args", [(0, 0.1, 1), (10, 0.0, 1), (10, 1.5, 1), (10, 0.1, -1), (10.5, 0.1, 1)]
)
def test_poisson_sampler_rejects_bad_input(args):
    with pytest.raises(ValueError):
        PoissonBatchSampler(*args)


def test_split_physical():
    idx = list(range(10))
    parts = split_physical(idx, 4)
    assert parts == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert split_physical([], 4) == []
    with pytest.raises(ValueError, match="max_physical_batch_size"):
        split_physical(idx, 0)


def test_augmentation_multiplicity_loads_each_sampled_record_k_times_in_a_row():
    """views=3: every sampled record appears 3 times consecutively, each a fresh load (the dataset's
    random augmentation runs per load), and the records are a Poisson sample as without views."""
    from ultralytics_dp.mechanism.sampling import PoissonLoader

    class Noisy(torch.utils.data.Dataset):
        loads = 0

        def __len__(self) -> int:
            return 50

        def __getitem__(self, i: int) -> dict:
            Noisy.loads += 1
            return {"idx": torch.tensor(i), "view": torch.rand(())}  # a random "augmentation"

    granted = []
    loader = PoissonLoader(Noisy(), 0.3, steps_per_epoch=40, budget=lambda: 40,
                           reserve=lambda s: granted.append(s) or s, views=3)
    sizes = []
    for batch in loader:
        idx, view = batch["idx"].view(-1, 3), batch["view"].view(-1, 3)
        assert (idx == idx[:, :1]).all() and len(set(idx[:, 0].tolist())) == len(idx)
        assert (view[:, 0] != view[:, 1]).all()  # distinct views of one record
        sizes.append(len(idx))
    assert granted == [40] and Noisy.loads == 3 * sum(sizes)
    mean, var = 50 * 0.3, 50 * 0.3 * 0.7
    assert abs(sum(sizes) / len(sizes) - mean) < 5 * math.sqrt(var / len(sizes))
