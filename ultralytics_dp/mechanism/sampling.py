"""Poisson sampling: the batch construction the privacy accountant assumes.

Privacy assumptions relied on here:

* Each step includes every record independently with probability q, so batch sizes vary and
  empty batches happen; they are yielded (an empty step is still a step the accountant counts).
  Shuffled fixed-size batches do not give this amplification (Chua et al. 2024).
* The trainer's loader is replaced by ``PoissonLoader``: one Poisson logical batch per optimizer
  step, its steps reserved in the ledger (write-ahead) before the first of them is drawn.
* Which records were sampled must be secret, so the default generator is seeded from OS entropy,
  not from Ultralytics' public ``seed``.
This module must not import Ultralytics.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from .randomness import os_seeded_generator, secure_uniform


class PoissonBatchSampler:
    """Yields ``steps`` lists of indices; each index is in each list independently with prob. q.

    ``secure=True`` draws the inclusions from the OS CSPRNG instead of a seedable generator.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps: int,
        generator: torch.Generator | None = None,
        secure: bool = False,
    ) -> None:
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        self.num_samples = num_samples
        self.sample_rate = float(sample_rate)
        self.steps = steps
        if secure and generator is not None:
            raise ValueError("secure sampling draws from OS entropy; it refuses a (reproducible) generator")
        self.secure = secure
        self.generator = generator if generator is not None else os_seeded_generator()

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            uniform = secure_uniform(self.num_samples) if self.secure else torch.rand(
                self.num_samples, generator=self.generator, dtype=torch.float64
            )
            mask = uniform < self.sample_rate
            yield mask.nonzero().flatten().tolist()


def split_physical(indices: list[int], max_physical_batch_size: int) -> list[list[int]]:
    """Split one logical (Poisson) batch into micro-batches of at most ``max_physical_batch_size``.

    Micro-batches only bound memory: their clipped sums are added before the single noise draw of
    the step. An empty logical batch gives no micro-batch (the step still happens).
    """
    if not isinstance(max_physical_batch_size, int) or max_physical_batch_size < 1:
        raise ValueError(f"max_physical_batch_size must be an integer >= 1, got {max_physical_batch_size!r}")
    n = math.ceil(len(indices) / max_physical_batch_size)
    return [indices[i * max_physical_batch_size : (i + 1) * max_physical_batch_size] for i in range(n)]


class PoissonLoader:
    """Drop-in for a trainer's train loader: each item is one collated Poisson logical batch.

    ``len()`` is the steps per epoch; an epoch yields fewer when ``budget()`` (steps still allowed)
    runs out. Empty batches are yielded (zero-length, with the dataset's structure): they are steps
    too. ``reserve(steps)`` is called with the epoch's step count before its first batch is drawn, and
    returns how many were granted (the ledger may grant fewer): the epoch takes that many.
    ``views`` > 1 (augmentation multiplicity): each sampled record is loaded ``views`` times in a
    row, so the dataset's random per-image augmentation gives that many views of it.
    ``shard``: the records this process samples from (a multi-process run gives each rank a
    disjoint share, see ``distributed.shard``); each is included with probability ``sample_rate``.
    """

    def __init__(self, dataset: Any, sample_rate: float, steps_per_epoch: int, budget: Callable[[], int],
                 reserve: Callable[[int], int], workers: int = 0, secure: bool = False, views: int = 1,
                 shard: Sequence[int] | None = None) -> None:
        self.dataset = dataset
        self.shard = range(len(dataset)) if shard is None else shard
        self.sample_rate = sample_rate
        self.steps_per_epoch = steps_per_epoch
        self.budget = budget
        self.reserve = reserve
        self.num_workers = workers
        self.secure = secure
        self.views = views
        self._collate = getattr(dataset, "collate_fn", None) or torch.utils.data.default_collate
        self._empty: dict | None = None

    def __len__(self) -> int:
        return self.steps_per_epoch

    def reset(self) -> None:
        """Ultralytics calls this after closing mosaic; our batches are drawn fresh every epoch."""

    @property
    def sampler(self) -> "PoissonLoader":
        """Ultralytics' multi-process loop calls ``train_loader.sampler.set_epoch(epoch)``."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Unused: Poisson batches are drawn fresh from OS entropy every epoch, whatever its number."""

    def _collate_or_empty(self, items: list) -> dict:
        if items:
            return self._collate(items)
        if self._empty is None:  # a zero-length batch with the dataset's structure
            one = self._collate([self.dataset[0]])
            self._empty = {k: v[:0] for k, v in one.items()}
        return {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in self._empty.items()}

    def __iter__(self) -> Iterator[dict]:
        # a generator: nothing runs (and nothing is reserved) until the first batch is asked for;
        # Ultralytics' trainer creates, and drops, one extra iterator per epoch
        steps = self.reserve(min(self.steps_per_epoch, self.budget()))
        sampler = PoissonBatchSampler(len(self.shard), self.sample_rate, steps, secure=self.secure)
        views = [[self.shard[i] for i in records for _ in range(self.views)] for records in sampler]
        yield from torch.utils.data.DataLoader(
            self.dataset, batch_sampler=views, collate_fn=self._collate_or_empty, num_workers=self.num_workers
        )
