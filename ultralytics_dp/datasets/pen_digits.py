"""Public digits written with a simulated pen: each digit's usual handwritten shape as a few strokes
(arcs and lines), distorted at random and drawn with a shaky pen of random width, then reduced to
the 8x8 optdigits format like the typeset ones (:func:`ultralytics_dp.font_digits.reduced_pool`).

Why: typeset digits are a poor stand-in for handwriting (a 1 with a base, a closed 4, a serif 7),
and the private fine-tune has to pay, in privacy, for closing that gap. Half of the public pool
is written this way (``datasets``): on the classification tuning split (1,151 / 287 handwritten
training digits) this raised the public model's zero-shot top-1 from 74.6% to 83.3% and the
private fine-tune from 88.0% to 93.7% at epsilon 1 (two runs each; ``benchmarks/UTILITY.md``).

Privacy assumptions relied on here: the shapes are written from the common knowledge of how the
ten digits are written, not from the handwritten set, which this module never reads (the test
that builds the public sets with ``load_digits`` disabled covers it). The distortion ranges were
fixed before any measurement and not tuned.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from .font_digits import CANVAS, reduced_pool

Stroke = np.ndarray  # [n, 2] points (x, y) of one pen stroke in the digit's box: x in [0, 0.6], y in [0, 1], y down


def _arc(cx: float, cy: float, rx: float, ry: float, start: float, end: float, n: int = 24) -> Stroke:
    """Points of an elliptic arc from angle ``start`` to ``end`` (degrees; 0 = right, 90 = down)."""
    t = np.radians(np.linspace(start, end, n))
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _line(*points: tuple[float, float], n: int = 12) -> Stroke:
    """Points of the polyline through ``points``."""
    s = np.linspace(0, 1, n)[:, None]
    return np.concatenate([np.asarray(a) * (1 - s) + np.asarray(b) * s for a, b in zip(points[:-1], points[1:])])


def _strokes(digit: int, rng: np.random.Generator) -> list[Stroke]:
    """The strokes of one written ``digit``, its proportions jittered; common variants at random
    (a 1 with or without a flag and a base, an open or closed 4, a crossed 7)."""
    def u(a: float = 0.06) -> float:
        return float(rng.uniform(-a, a))

    if digit == 0:
        return [_arc(0.3 + u(), 0.5, 0.27 + u(), 0.47 + u(), -90 + u(20), 275 + u(20), 40)]
    if digit == 1:
        strokes = [_line((0.32 + u(0.1), 0.0), (0.3 + u(0.1), 1.0))]
        if rng.random() < 0.5:
            strokes.append(_line((0.32, 0.0), (0.12 + u(), 0.22 + u())))
        if rng.random() < 0.3:
            strokes.append(_line((0.1, 1.0), (0.5, 1.0)))
        return strokes
    if digit == 2:
        top = _arc(0.3, 0.28 + u(), 0.27 + u(), 0.26 + u(), 190 + u(15), 400 + u(15))
        return [np.concatenate([top, _line(tuple(top[-1]), (0.02 + u(), 1.0), (0.6 + u(), 1.0 + u(0.03)))])]
    if digit == 3:
        upper = _arc(0.28, 0.26, 0.27 + u(), 0.24 + u(), 200 + u(20), 450, 20)
        lower = _arc(0.28, 0.74, 0.3 + u(), 0.26 + u(), 270, 520 + u(20), 20)
        return [np.concatenate([upper, lower])]
    if digit == 4:
        x = 0.42 + u()
        if rng.random() < 0.5:  # closed: one stroke down-left and across, then the stem
            return [_line((x, 0.0), (u(), 0.68 + u()), (0.62, 0.68 + u(0.03))), _line((x, 0.05), (x + u(), 1.0))]
        return [_line((0.1 + u(), 0.0), (0.02, 0.62 + u()), (0.62, 0.62 + u(0.03))), _line((x, 0.25 + u()), (x + u(), 1.0))]
    if digit == 5:
        belly = _arc(0.3, 0.68, 0.3 + u(), 0.3 + u(), 220 + u(20), 510 + u(15))
        return [_line((0.58 + u(), 0.0), (0.1 + u(), 0.0)),
                np.concatenate([_line((0.1, 0.0), (0.06 + u(), 0.45 + u())), belly])]
    if digit == 6:
        loop = _arc(0.3, 0.7, 0.28 + u(), 0.28 + u(), 180, 540, 30)
        return [np.concatenate([_line((0.5 + u(), u(0.03)), (0.02 + u(0.03), 0.7)), loop])]
    if digit == 7:
        strokes = [_line((u(), u(0.03)), (0.6 + u(), 0.0), (0.2 + u(0.1), 1.0))]
        if rng.random() < 0.3:
            strokes.append(_line((0.15, 0.5), (0.5, 0.5)))
        return strokes
    if digit == 8:
        return [_arc(0.3, 0.25, 0.24 + u(), 0.24 + u(), 0, 360, 28), _arc(0.3, 0.74, 0.29 + u(), 0.26 + u(), 0, 360, 28)]
    if digit == 9:
        return [_arc(0.3, 0.3, 0.28 + u(), 0.28 + u(), 0, 360, 30), _line((0.58 + u(0.03), 0.3), (0.5 + u(0.1), 1.0))]
    raise ValueError(f"digit must be 0..9, got {digit}")


def _written(digit: int, rng: np.random.Generator) -> Image.Image:
    """The digit written white on black: its strokes, a random slant, shear and stretch, a shaky pen
    of random width."""
    angle, shear = math.radians(rng.uniform(-12, 12)), rng.uniform(-0.35, 0.35)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    warp = rotation @ np.array([[rng.uniform(0.7, 1.25), shear], [0.0, rng.uniform(0.8, 1.2)]])
    width = int(rng.integers(6, 20))
    img = Image.new("L", (CANVAS, CANVAS), 0)
    pen = ImageDraw.Draw(img)
    for stroke in _strokes(digit, rng):
        stroke = stroke + rng.normal(0, 0.012, stroke.shape)  # the hand is not steady
        points = (stroke - [0.3, 0.5]) @ warp.T * (CANVAS * 0.55) + CANVAS / 2
        pen.line([tuple(p) for p in points], fill=255, width=width, joint="curve")
    return img


def render_pool(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` written digits as (images [n, 8, 8] in [0, 1], labels [n]), deterministic for ``seed``;
    classes balanced (cycled)."""
    rng = np.random.default_rng([seed, 1])  # a stream apart from the typeset digits' of the same seed
    return reduced_pool(n, rng, lambda digit: _written(digit, rng))
