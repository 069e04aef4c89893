"""Poisson sampling: the batch construction the privacy accountant assumes.

Privacy assumptions relied on here:

* Each step includes every record independently with probability q, so batch sizes vary and
  empty batches happen. A record is an image, or a person (``units``: all of one person's images);
  a sampled person contributes at most ``max_images`` of their images, chosen uniformly at random
  among their own at each step, so which of a person's images are used depends on that person
  alone; they are yielded (an empty step is still a step the accountant counts).
  Shuffled fixed-size batches do not give this amplification (Chua et al. 2024).
* The trainer's loader is replaced by ``PoissonLoader``: one Poisson logical batch per optimizer
  step, its steps reserved in the ledger (write-ahead) before the first of them is drawn.
* Which records were sampled must be secret, so the default generator is seeded from OS entropy,
  not from Ultralytics' public ``seed``.
This module must not import Ultralytics.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from .randomness import os_seeded_generator, secure_uniform

RECORD_SIZES = "dp_record_sizes"  # the batch key: how many consecutive images form each record


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


class PoissonLoader:
    """Drop-in for a trainer's train loader: each item is one collated Poisson logical batch.

    ``len()`` is the steps per epoch; an epoch yields fewer when ``budget()`` (steps still allowed)
    runs out. Empty batches are yielded (zero-length, with the dataset's structure): they are steps
    too. ``reserve(steps)`` is called with the epoch's step count before its first batch is drawn, and
    returns how many were granted (the ledger may grant fewer): the epoch takes that many.
    ``views`` > 1 (augmentation multiplicity): each sampled record is loaded ``views`` times in a
    row, so the dataset's random per-image augmentation gives that many views of it.
    ``units``: the records, each a list of dataset indices (a person's images); default: one
    record per image. A sampled record brings at most ``max_images`` of its images (a uniform
    random choice among its own), each ``views`` times. Every batch says which of its consecutive
    images form each record (``RECORD_SIZES``, images per record, views included).
    ``shard``: the records this process samples from (a multi-process run gives each rank a
    disjoint share, see ``distributed.shard``); each is included with probability ``sample_rate``.
    """

    def __init__(self, dataset: Any, sample_rate: float, steps_per_epoch: int, budget: Callable[[], int],
                 reserve: Callable[[int], int], workers: int = 0, secure: bool = False, views: int = 1,
                 shard: Sequence[int] | None = None, units: Sequence[Sequence[int]] | None = None,
                 max_images: int | None = None) -> None:
        self.dataset = dataset
        self.units = [[i] for i in range(len(dataset))] if units is None else [list(u) for u in units]
        if any(not u for u in self.units):
            raise ValueError("every record needs at least one image")
        self.max_images = max_images
        self.shard = range(len(self.units)) if shard is None else shard
        self.sample_rate = sample_rate
        self.steps_per_epoch = steps_per_epoch
        self.budget = budget
        self.reserve = reserve
        self.num_workers = workers
        self.secure = secure
        self.views = views
        self._collate = getattr(dataset, "collate_fn", None) or torch.utils.data.default_collate
        self._empty: dict | None = None
        self._choice = os_seeded_generator()  # which of a person's images: secret, like the sampling

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

    def _images(self, unit: int) -> list[int]:
        """The images a sampled record brings this step: all, or ``max_images`` of them at random."""
        images = self.units[self.shard[unit]]
        if self.max_images is None or len(images) <= self.max_images:
            return images
        uniform = secure_uniform(len(images)) if self.secure else torch.rand(len(images), dtype=torch.float64,
                                                                               generator=self._choice)
        return [images[i] for i in sorted(uniform.argsort()[:self.max_images].tolist())]

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
        batches = [[self._images(u) for u in records] for records in sampler]
        images = [[i for record in batch for i in record for _ in range(self.views)] for batch in batches]
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=images, collate_fn=self._collate_or_empty,
                                             num_workers=self.num_workers)
        for batch, records in zip(loader, batches):
            batch[RECORD_SIZES] = [len(record) * self.views for record in records]
            yield batch
