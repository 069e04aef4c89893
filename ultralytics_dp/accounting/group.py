"""A person's privacy in a run whose unit is the image: the steps as that person sees them.

In an image-level run every image is clipped to C and sampled on its own. A person with k images
in the training set is then in a step through J ~ Binomial(k, q) of them, and adds up to J C: each
step is, for that person, the Binomial mixture of Gaussians of ``mixture`` (Ganesh 2024, Thm 3.1),
which both accountants compose (``Segment.images`` = k). It is tight for the worst case, where the
person's clipped gradients point the same way. For k = 1 it is the step itself; at q = 1 all k
images come every step: the Gaussian of sensitivity k C.

On the run the persons issue names (epsilon 8 per image at delta 1e-5: N 50,000, batch 256, 30
epochs), a person with 5 images has epsilon about 52 and one with 10 about 130
(``benchmarks/bench_persons.py``): see ``docs/guarantee.md``, "The person as the privacy unit".
A run whose unit is the person needs none of this: a person is one record, sampled once, clipped
once (``mechanism.grouping``).
This module must not import torch or Ultralytics.
"""

from __future__ import annotations

from typing import Iterable

from .pld import Segment

BOUND = "tight: Binomial(k, q) of the person's k images per step (accounting.mixture)"


def person_segment(segment: Segment, images: int) -> Segment:
    """``segment`` of an image-level run as one person with ``images`` images in it sees it."""
    if not isinstance(images, int) or images < 1:
        raise ValueError(f"a person has at least one image, got {images!r}")
    if images == 1:
        return segment
    if segment.sample_rate == 1:
        return Segment(segment.noise_multiplier / images, 1.0, segment.steps)
    return Segment(segment.noise_multiplier, segment.sample_rate, segment.steps, images)


def person_segments(segments: Iterable[Segment], images: int) -> list[Segment]:
    """``person_segment`` of each segment."""
    return [person_segment(s, images) for s in segments]
