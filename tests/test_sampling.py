"""Poisson sampling: statistical tests of inclusion, empty batches, OS seeding, physical chunks."""

from __future__ import annotations

import math

import pytest
import torch

from ultralytics_dp.mechanism.grouping import Groups
from ultralytics_dp.mechanism.sampling import RECORD_SIZES, PoissonBatchSampler, PoissonLoader


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


def test_chunks_hold_whole_records():
    groups = Groups((2, 3, 1, 4, 1))
    chunks = groups.chunks(4)
    assert [idx for idx, _ in chunks] == [[0, 1], [2, 3, 4, 5], [6, 7, 8, 9], [10]]
    assert [g.sizes for _, g in chunks] == [(2,), (3, 1), (4,), (1,)]
    assert [g.sizes for _, g in Groups((5, 1)).chunks(2)] == [(5,), (1,)]  # a larger record is a chunk alone
    assert Groups(()).chunks(4) == []
    with pytest.raises(ValueError, match="at least one image"):
        Groups((2, 0))


def test_augmentation_multiplicity_loads_each_sampled_record_k_times_in_a_row():
    """views=3: every sampled record appears 3 times consecutively, each a fresh load (the dataset's
    random augmentation runs per load), and the records are a Poisson sample as without views."""
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


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"idx": torch.tensor(i)}


def test_persons_are_sampled_independently_with_probability_q_and_bring_their_own_images():
    """units = persons: each person is in a step independently with probability q (frequencies
    and pairwise co-inclusion within 5 standard deviations), brings only their own images, at most
    ``max_images`` of them, each of their images equally often, and the batch says which
    consecutive images are whose."""
    persons = [[0], [1, 2], [3, 4, 5, 6, 7], [8, 9, 10]]
    q, steps = 0.3, 3000
    loader = PoissonLoader(_Indexed(11), q, steps_per_epoch=steps, budget=lambda: steps, reserve=lambda s: s,
                           units=persons, max_images=2)
    owner = {i: p for p, images in enumerate(persons) for i in images}
    seen = torch.zeros(len(persons))
    together = 0
    used = torch.zeros(11)
    for batch in loader:
        idx = batch["idx"].tolist()
        sizes = batch[RECORD_SIZES]
        assert sum(sizes) == len(idx)
        present = []
        start = 0
        for size in sizes:
            record = idx[start:start + size]
            start += size
            assert len({owner[i] for i in record}) == 1 and len(set(record)) == size <= 2
            present.append(owner[record[0]])
            used[record] += 1
        assert len(set(present)) == len(present)
        seen[present] += 1
        together += {2, 3} <= set(present)
    sd = math.sqrt(q * (1 - q) / steps)
    assert ((seen / steps - q).abs() < 5 * sd).all()
    assert abs(together / steps - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / steps)
    # a person with 5 images brings 2 of them, each image 2/5 of the person's steps
    share = used[3:8] / seen[2]
    assert ((share - 0.4).abs() < 5 * math.sqrt(0.4 * 0.6 / seen[2])).all()
    assert (used[1:3] == seen[1]).all()


def test_shards_of_a_multi_process_run_are_disjoint_by_person(monkeypatch):
    from ultralytics_dp.mechanism import distributed

    persons = [[0, 1], [2], [3, 4, 5], [6], [7, 8]]
    taken = []
    for rank in range(2):
        monkeypatch.setattr(distributed, "rank_and_world", lambda rank=rank: (rank, 2))
        loader = PoissonLoader(_Indexed(9), 1.0, steps_per_epoch=1, budget=lambda: 1, reserve=lambda s: s,
                               units=persons, shard=distributed.shard(len(persons)))
        taken.append(set(next(iter(loader))["idx"].tolist()))
    assert not taken[0] & taken[1] and taken[0] | taken[1] == set(range(9))
    assert taken[0] == {0, 1, 3, 4, 5, 7, 8}  # ranks 0 and 1 hold whole persons
