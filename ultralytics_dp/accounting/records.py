"""What one record is, as the ledger and the training-set checks name it: an image, by its decoded
pixels, not by its file's bytes.

A ``Record`` carries three keys, computed from the image by ``integration.training_set.identify``:

* ``pixels``: SHA-256 of the image decoded to 8-bit RGB (its size and every pixel): any lossless
  re-encoding (another PNG writer, stripped metadata, a format that keeps every pixel) is the
  same record;
* ``file``: SHA-256 of the file's bytes: how ledgers of schema 3 and before named records, kept so
  that a record they know keeps its budget;
* ``thumb``: a 16x16 grayscale thumbnail (box filter, 8 bits): two images whose thumbnails differ
  by at most ``NEAR`` grey levels anywhere are **near-duplicates** (a JPEG re-save at quality 75
  or more moved the embedded digits' thumbnails by at most 6 levels; distinct ones differed by at
  least 34). Images whose thumbnail spans fewer than ``CONTENT`` levels (a blank background) have
  no content to compare and are never near-duplicates of anything.

Still a different record: a crop, a flip or rotation, a strong resize or colour change, anything
that moves the thumbnail by more than ``NEAR`` levels somewhere.
This module must not import torch or Ultralytics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

THUMB = 16  # thumbnail side, pixels
NEAR = 12  # largest difference, in grey levels, between the thumbnails of near-duplicates
CONTENT = 32  # smallest span of grey levels for a thumbnail to be compared at all
_CHUNK = 1 << 22  # thumbnail comparisons per numpy block (bounds memory)


@dataclass(frozen=True)
class Record:
    """One image's identities (see the module's docstring)."""

    pixels: str
    file: str
    thumb: bytes

    @property
    def has_content(self) -> bool:
        values = np.frombuffer(self.thumb, dtype=np.uint8)
        return int(values.max()) - int(values.min()) >= CONTENT


def near_pairs(left: Sequence[bytes], right: Sequence[bytes]) -> Iterator[tuple[int, int]]:
    """(i, j) for every pair of thumbnails, ``left[i]`` and ``right[j]``, both with content, that are
    near-duplicates. Thumbnails are compared only where their mean grey levels are within ``NEAR``
    (a necessary condition), sorted by mean, so the work grows with the near pairs' neighbourhood,
    not with len(left) * len(right)."""
    a, b = _matrix(left), _matrix(right)
    keep_a, keep_b = np.flatnonzero(_has_content(a)), np.flatnonzero(_has_content(b))
    if not len(keep_a) or not len(keep_b):
        return
    a, b = a[keep_a], b[keep_b]
    mean_a, mean_b = a.mean(1), b.mean(1)
    order = np.argsort(mean_b)
    sorted_means = mean_b[order]
    lo = np.searchsorted(sorted_means, mean_a - NEAR, side="left")
    hi = np.searchsorted(sorted_means, mean_a + NEAR, side="right")
    for i in range(len(a)):
        candidates = order[lo[i]:hi[i]]
        for start in range(0, len(candidates), max(1, _CHUNK // a.shape[1])):
            block = candidates[start:start + _CHUNK // a.shape[1]]
            close = np.abs(b[block] - a[i]).max(1) <= NEAR
            for j in block[close]:
                yield int(keep_a[i]), int(keep_b[j])


def _matrix(thumbs: Sequence[bytes]) -> np.ndarray:
    if not thumbs:
        return np.zeros((0, THUMB * THUMB), dtype=np.int16)
    return np.frombuffer(b"".join(thumbs), dtype=np.uint8).reshape(len(thumbs), -1).astype(np.int16)


def _has_content(matrix: np.ndarray) -> np.ndarray:
    return (matrix.max(1) - matrix.min(1)) >= CONTENT if len(matrix) else np.zeros(0, dtype=bool)
