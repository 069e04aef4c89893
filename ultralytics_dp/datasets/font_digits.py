"""Public digits: the ten digits typeset in the fonts bundled with matplotlib, in the 8x8 format of
scikit-learn's handwritten digits.

Why: private fine-tuning of a model pretrained on *public* data is what makes DP training useful
(De et al. 2022). The embedded demo needs a public set that never touches the private one. These
images come only from font files shipped with matplotlib and from a seeded random generator; this
module never reads the handwritten digits (a test builds it with ``load_digits`` disabled).

The preprocessing copies the published one of the UCI optdigits set that scikit-learn bundles: a
32x32 binary bitmap of the digit, scaled to fill the frame, then the count of ink pixels in each
4x4 block (0..16), so the public and the private images share a format, not content. Variation
comes from the font family, weight and slant, stroke width, a random affine map and pixel noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

# Text fonts shipped with matplotlib that draw the ten digits in lining (not old-style) figures.
FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmb10.ttf", "cmti10.ttf",
)
CANVAS = 160  # glyphs are drawn large, then reduced: the 32x32 bitmap keeps no font hinting artefacts


def font_paths() -> list[Path]:
    """The bundled font files used, in a fixed order (the generator's output depends on it)."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    paths = [folder / name for name in FONTS if (folder / name).exists()]
    if not paths:
        raise FileNotFoundError(f"no bundled fonts found in {folder}; is matplotlib installed completely?")
    return paths


def _glyph(font: ImageFont.FreeTypeFont, digit: int, rng: np.random.Generator) -> Image.Image:
    """The digit drawn white on black, with a random stroke width and affine distortion."""
    img = Image.new("L", (CANVAS, CANVAS), 0)
    ImageDraw.Draw(img).text((CANVAS / 2, CANVAS / 2), str(digit), fill=255, font=font, anchor="mm")
    stroke = int(rng.integers(-2, 3))  # thinner or thicker pen: MinFilter erodes, MaxFilter dilates
    if stroke:
        size = 2 * abs(stroke) + 1
        img = img.filter(ImageFilter.MaxFilter(size) if stroke > 0 else ImageFilter.MinFilter(size))
    angle = math.radians(rng.uniform(-12, 12))
    shear = rng.uniform(-0.3, 0.3)
    sx, sy = rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.2)
    # inverse map (output -> input) about the centre, as PIL's AFFINE transform expects
    a, b = math.cos(angle) / sx, (math.sin(angle) + shear) / sx
    d, e = -math.sin(angle) / sy, math.cos(angle) / sy
    c0 = CANVAS / 2
    coeffs = (a, b, c0 - a * c0 - b * c0, d, e, c0 - d * c0 - e * c0)
    return img.transform(img.size, Image.AFFINE, coeffs, resample=Image.BILINEAR)


def to_8x8(glyph: Image.Image, rng: np.random.Generator) -> np.ndarray | None:
    """optdigits preprocessing: fit the ink into a 32x32 binary bitmap, count ink per 4x4 block."""
    ink = np.asarray(glyph) > 127
    ys, xs = np.nonzero(ink)
    if len(xs) == 0:
        return None
    crop = glyph.crop((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    scale = 32 / max(crop.size)
    w, h = max(1, round(crop.width * scale)), max(1, round(crop.height * scale))
    bitmap = np.zeros((32, 32), dtype=bool)
    x0, y0 = (32 - w) // 2 + int(rng.integers(-1, 2)), (32 - h) // 2
    x0 = min(max(x0, 0), 32 - w)
    bitmap[y0 : y0 + h, x0 : x0 + w] = np.asarray(crop.resize((w, h), Image.BILINEAR)) > 127
    blocks = bitmap.reshape(8, 4, 8, 4).sum(axis=(1, 3)).astype(np.float64)
    blocks += rng.normal(0, 0.4, size=blocks.shape) * (blocks > 0)  # noise on the counts of inked blocks
    return np.clip(np.round(blocks), 0, 16) / 16.0


def render_pool(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` public digits as (images [n, 8, 8] in [0, 1], labels [n]), deterministic for ``seed``.

    Classes are balanced (cycled); fonts and distortions are drawn from ``seed``.
    """
    rng = np.random.default_rng(seed)
    fonts = [ImageFont.truetype(str(p), size=CANVAS // 2) for p in font_paths()]
    return reduced_pool(n, rng, lambda digit: _glyph(fonts[int(rng.integers(len(fonts)))], digit, rng))


def reduced_pool(n: int, rng: np.random.Generator, draw: Callable[[int], Image.Image]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` digits drawn by ``draw`` (a digit -> its image on the canvas), classes cycled, each
    reduced to 8x8 (``to_8x8``); a rare distortion pushes the digit off the canvas: drawn again."""
    images, labels = np.zeros((n, 8, 8)), np.arange(n) % 10
    for i, digit in enumerate(labels):
        while (image := to_8x8(draw(int(digit)), rng)) is None:
            pass
        images[i] = image
    return images, labels
