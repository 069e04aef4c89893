"""Simulated writers: the handwritten digits regrouped so that each group looks written by one
person, for examples and tests of the person as the privacy unit (``digits-persons-cls``).

No wheel ships a real person-grouped image set, so this one is made, and stated as synthetic:
the real handwritten digits (``embedded.source_split``) are dealt out to writers, ``IMAGES_PER``
each, and every writer's digits get that writer's own style: a slant (shear), a stroke thickness
(a maximum filter) and a size, with a little jitter per image. A writer's images thus share
something a model can pick up about that writer, which is what makes a person worth protecting
as a whole. The style ranges were fixed before any measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

IMAGES_PER = 5  # images per writer


@dataclass(frozen=True)
class Style:
    shear: float  # horizontal shift per row, as a fraction of the height
    thickness: int  # maximum-filter size in pixels (1: as written)
    scale: float  # the digit's size on the canvas


def draw_style(rng: np.random.Generator) -> Style:
    return Style(shear=float(rng.uniform(-0.35, 0.35)), thickness=int(rng.choice([1, 3, 5])),
                 scale=float(rng.uniform(0.7, 1.0)))


def write(digit: np.ndarray, style: Style, size: int, rng: np.random.Generator) -> np.ndarray:
    """An 8x8 digit in [0, 1] as ``style`` writes it: a ``size`` x ``size`` uint8 grey image."""
    work = 4 * size  # drawn large, then reduced: thickness and shear stay smooth
    big = Image.fromarray((digit * 255).astype(np.uint8), mode="L").resize((work, work), Image.BILINEAR)
    shear = style.shear + rng.uniform(-0.03, 0.03)
    big = big.transform((work, work), Image.AFFINE, (1, shear, -shear * work / 2, 0, 1, 0), Image.BILINEAR)
    if style.thickness > 1:
        big = big.filter(ImageFilter.MaxFilter(2 * style.thickness - 1))
    side = max(4, int(work * min(1.0, style.scale + rng.uniform(-0.03, 0.03))))
    canvas = Image.new("L", (work, work), 0)
    canvas.paste(big.resize((side, side), Image.BILINEAR), ((work - side) // 2, (work - side) // 2))
    return np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.uint8)
