"""Records made of several images: a person's images, or an image's augmented views.

A private batch is a run of records, each a run of consecutive images (``Groups.sizes``). A
record's gradient is the **mean** of its images' gradients, and it is that mean which is clipped
once to C. One mechanism serves both uses:

* augmentation multiplicity: the record is one image, its K views are its images (all sizes K);
* the person as the privacy unit: the record is a person, their sampled images (times K views)
  are its images (sizes vary).

Privacy assumption relied on here: the images of one record are consecutive in the batch and
belong to that record alone (the loader builds them so, ``sampling``). Then each record adds one
vector of norm <= C to the clipped sum, whatever its number of images, and adding or removing a
record moves the sum by at most C. The mean rather than the sum keeps a record of many images at
the scale of a record of one, so one C suits both (a sum of k aligned gradients would be clipped
k-fold harder; the sensitivity is C either way).
This module must not import Ultralytics.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Groups:
    """``sizes[r]`` consecutive images form record r (every size >= 1)."""

    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if any(not isinstance(s, int) or s < 1 for s in self.sizes):
            raise ValueError(f"every record needs at least one image, got sizes {list(self.sizes)}")

    @classmethod
    def uniform(cls, images: int) -> "Groups":
        """One image per record (per-image clipping)."""
        return cls((1,) * images)

    @property
    def records(self) -> int:
        return len(self.sizes)

    @property
    def images(self) -> int:
        return sum(self.sizes)

    @property
    def largest(self) -> int:
        return max(self.sizes, default=1)

    @property
    def trivial(self) -> bool:
        """One image per record: per-image clipping, nothing to combine."""
        return all(s == 1 for s in self.sizes)

    def indices(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
        """[images] each image's record, its place in the record (0 .. size-1), and 1 / the record's
        size (the mean as a weighted sum); built once per device."""
        return _indices(self.sizes, str(device))

    def mean(self, per_image: Tensor) -> Tensor:
        """[records, ...] each record's mean of ``per_image`` [images, ...] rows."""
        owner, _, weight = self.indices(per_image.device)
        weighted = per_image * weight.to(per_image.dtype).view(-1, *[1] * (per_image.dim() - 1))
        return per_image.new_zeros((self.records, *per_image.shape[1:])).index_add_(0, owner, weighted)

    def chunks(self, max_images: int) -> list[tuple[list[int], "Groups"]]:
        """Whole records in chunks of at most ``max_images`` images each (a larger record is a chunk
        alone): (the chunk's image indices, its groups). Chunks bound memory only."""
        out: list[tuple[list[int], Groups]] = []
        start, images, sizes = 0, 0, []
        for size in self.sizes:
            if sizes and images + size > max_images:
                out.append((list(range(start, start + images)), Groups(tuple(sizes))))
                start, images, sizes = start + images, 0, []
            sizes.append(size)
            images += size
        if sizes:
            out.append((list(range(start, start + images)), Groups(tuple(sizes))))
        return out


@functools.lru_cache(maxsize=32)
def _indices(sizes: tuple[int, ...], device: str) -> tuple[Tensor, Tensor, Tensor]:
    counts = torch.tensor(sizes, dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(sizes)), counts)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(int(counts.sum())) - starts.repeat_interleave(counts)
    weight = (1.0 / counts.double()).repeat_interleave(counts)  # cast to the gradients' precision where used
    return owner.to(device), slot.to(device), weight.to(device)
