"""Embedded real-image datasets built from scikit-learn's bundled handwritten digits.

Nothing is downloaded: ``sklearn.datasets.load_digits`` ships 1,797 real 8x8 digits inside the
scikit-learn wheel. From them we build, deterministically for a given seed:

* ``digits-det``: YOLO detection format, classes ``'0'..'9'``, RGB canvases holding 0-4 upscaled
  digits at non-overlapping positions (some canvases hold none).
* ``digits-seg``, ``digits-pose``, ``digits-obb``: the same canvases labelled for segmentation (the
  polygon of each digit's ink), pose (5 keypoints: the ink box's corners and the ink's centroid)
  and oriented boxes (each digit turned by a random angle, with its turned ink box).
* ``digits-cls``: ImageFolder layout (``train/<class>/*.png``, ``val/<class>/*.png``).
* ``digits-persons-cls``: the same layout, the digits regrouped by simulated writers
  (``writers``: synthetic persons, each with their own style and several images) and a
  ``persons.csv`` (``image,person``) naming every image's writer; training and validation writers
  are distinct people.
* ``digits-public-det`` / ``digits-public-cls``: the same formats built from digits typeset in
  matplotlib's fonts (:mod:`ultralytics_dp.font_digits`) and, half of them, written with a simulated
  pen (:mod:`ultralytics_dp.pen_digits`): public data for pretraining, which never reads the
  handwritten set.

The source digits are split once into disjoint train and val pools, so no val image shares a
source digit with any train image. Datasets are cached under ``$ULTRALYTICS_DP_DATA`` (or the
user cache dir) and built on first use; the build writes into a temporary folder and renames it,
so an interrupted build never leaves a half-written dataset behind.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

NAMES = [str(i) for i in range(10)]
DATASETS = ("digits-det", "digits-seg", "digits-pose", "digits-obb", "digits-cls", "digits-persons-cls",
            "digits-public-det", "digits-public-cls")
PUBLIC_POOL = (5000, 1000)  # public source digits (half typeset, half pen-written) for the train and val pools
_FORMAT_VERSION = 4  # bump when the generated files change, so stale caches are not reused
VAL_FRACTION = 0.2


def cache_dir() -> Path:
    """Where embedded datasets live: ``$ULTRALYTICS_DP_DATA``, else ``$XDG_CACHE_HOME/ultralytics_dp``."""
    if os.environ.get("ULTRALYTICS_DP_DATA"):
        return Path(os.environ["ULTRALYTICS_DP_DATA"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ultralytics_dp"


def source_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split the bundled digits into disjoint (train_images, train_labels, val_images, val_labels).

    Images are float arrays in [0, 1] of shape [n, 8, 8].
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float64) / 16.0
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = int(round(len(images) * VAL_FRACTION))
    val_idx, train_idx = order[:n_val], order[n_val:]
    return images[train_idx], digits.target[train_idx], images[val_idx], digits.target[val_idx]


def _pools(name: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_images, train_labels, val_images, val_labels) of 8x8 source digits for ``name``."""
    if "public" not in name:
        return source_split(seed)
    from . import font_digits, pen_digits

    def pool(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:  # half typeset, half written with a pen
        typeset, written = font_digits.render_pool(n - n // 2, seed), pen_digits.render_pool(n // 2, seed)
        return np.concatenate([typeset[0], written[0]]), np.concatenate([typeset[1], written[1]])

    # distinct seeds give disjoint draws of fonts, strokes and distortions for train and val
    return (*pool(PUBLIC_POOL[0], seed * 2 + 1000), *pool(PUBLIC_POOL[1], seed * 2 + 1001))


def _render_digit(digit: np.ndarray, size: int) -> np.ndarray:
    """Upscale an 8x8 digit in [0, 1] to ``size``x``size`` with bilinear interpolation."""
    img = Image.fromarray((digit * 255).astype(np.uint8), mode="L")
    return np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.float64) / 255.0


def _ink_box(patch: np.ndarray, threshold: float = 0.1) -> tuple[int, int, int, int] | None:
    """Tight (x0, y0, x1, y1) box of the pixels brighter than ``threshold``; None if blank."""
    ys, xs = np.nonzero(patch > threshold)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _placed_digit(rng: np.random.Generator, digit: np.ndarray, size: int, rotate: bool
                  ) -> tuple[np.ndarray, np.ndarray] | None:
    """(ink alpha patch, the 4 corners (x, y) of the digit's ink box in patch pixels, clockwise from top-left)
    of one upscaled digit; turned by a random angle (and the patch grown to hold it) if ``rotate``."""
    patch = _render_digit(digit, size)
    box = _ink_box(patch)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)
    if not rotate:
        return patch, corners
    angle = float(rng.uniform(0, 180))
    turned = Image.fromarray((patch * 255).astype(np.uint8), mode="L").rotate(angle, Image.BILINEAR, expand=True)
    # PIL turns the image counter-clockwise on screen about its centre, then re-centres it
    t, (cx, cy), (nx, ny) = np.radians(angle), (size / 2, size / 2), (turned.width / 2, turned.height / 2)
    dx, dy = corners[:, 0] - cx, corners[:, 1] - cy
    corners = np.stack([nx + dx * np.cos(t) + dy * np.sin(t), ny - dx * np.sin(t) + dy * np.cos(t)], axis=1)
    return np.asarray(turned, dtype=np.float64) / 255.0, corners


def _make_canvas(
    rng: np.random.Generator, pool: np.ndarray, labels: np.ndarray, imgsz: int, max_digits: int, task: str = "det"
) -> tuple[np.ndarray, list[tuple[float, ...]]]:
    """One RGB canvas and its YOLO label rows, normalised to [0, 1]: ``det`` (cls cx cy w h), ``seg``
    (cls and the polygon of the digit's ink), ``pose`` (cls cx cy w h and 5 keypoints x y v: the ink
    box's corners clockwise from top-left, then the ink's centroid) or ``obb`` (cls and the 4 corners
    of the ink box of a digit turned by a random angle)."""
    background = rng.uniform(0.0, 0.25, size=3)
    canvas = np.ones((imgsz, imgsz, 3)) * background + rng.normal(0, 0.02, size=(imgsz, imgsz, 3))
    rows: list[tuple[float, ...]] = []
    occupied: list[tuple[int, int, int, int]] = []
    # P(0 digits) = 1/(max_digits+2): a few background-only images, which are valid records.
    n_digits = min(int(rng.integers(0, max_digits + 2)), max_digits)
    for _ in range(n_digits):
        size = int(rng.integers(imgsz // 6, imgsz // 3 + 1))
        placed = None
        if task == "obb":  # turned first: the footprint grows (the random draws of the others keep their order)
            k = int(rng.integers(len(pool)))
            placed = _placed_digit(rng, pool[k], size, rotate=True)
            if placed is None or placed[0].shape[0] > imgsz:
                continue
        side = size if placed is None else placed[0].shape[0]  # a square turned with expand stays square
        for _attempt in range(20):
            x, y = (int(v) for v in rng.integers(0, imgsz - side + 1, size=2))
            if all(x + side <= a or x >= c or y + side <= b or y >= d for a, b, c, d in occupied):
                break
        else:
            continue  # no free spot: place fewer digits
        if placed is None:
            k = int(rng.integers(len(pool)))
            placed = _placed_digit(rng, pool[k], size, rotate=False)
            if placed is None:
                continue
        patch, corners = placed
        h, w = patch.shape
        colour = rng.uniform(0.6, 1.0, size=3)
        alpha = patch[..., None]
        canvas[y : y + h, x : x + w] = canvas[y : y + h, x : x + w] * (1 - alpha) + colour * alpha
        occupied.append((x, y, x + w, y + h))
        rows.append((int(labels[k]), *_label(task, patch, (corners + (x, y)) / imgsz, x, y, imgsz)))
    return (np.clip(canvas, 0, 1) * 255).astype(np.uint8), rows


def _label(task: str, patch: np.ndarray, corners: np.ndarray, x: int, y: int, imgsz: int) -> list[float]:
    """The numbers after the class of one digit's label row (see ``_make_canvas``); ``corners``
    normalised to the canvas."""
    (x0, y0), (x1, y1) = corners[0], corners[2]
    box = [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]
    if task == "det":
        return box
    if task == "obb":
        return list(np.clip(corners, 0, 1).ravel())
    if task == "pose":
        ys, xs = np.nonzero(patch > 0.1)
        weights = patch[ys, xs]
        centroid = [(x + (xs * weights).sum() / weights.sum() + 0.5) / imgsz,
                    (y + (ys * weights).sum() / weights.sum() + 0.5) / imgsz]
        return box + [v for point in [*corners, centroid] for v in (*point, 2.0)]
    import cv2  # an Ultralytics dependency

    contours, _ = cv2.findContours((patch > 0.1).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygon = max(contours, key=cv2.contourArea).reshape(-1, 2).astype(np.float64) + 0.5
    return list(((polygon + (x, y)) / imgsz).ravel())


def _write_yolo(root: Path, name: str, seed: int, imgsz: int, n_train: int, n_val: int, max_digits: int) -> None:
    task = name.rsplit("-", 1)[1]
    tr_x, tr_y, va_x, va_y = _pools(name, seed)
    rng = np.random.default_rng(seed + 1)
    for split, count, pool, labels in (("train", n_train, tr_x, tr_y), ("val", n_val, va_x, va_y)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(count):
            canvas, rows = _make_canvas(rng, pool, labels, imgsz, max_digits, task)
            Image.fromarray(canvas).save(root / "images" / split / f"{i:05d}.png")
            text = "".join(f"{c} " + " ".join(f"{v:.6f}" for v in values) + "\n" for c, *values in rows)
            (root / "labels" / split / f"{i:05d}.txt").write_text(text)
    names = "\n".join(f"  {i}: '{n}'" for i, n in enumerate(NAMES))
    keypoints = "kpt_shape: [5, 3]\nflip_idx: [1, 0, 3, 2, 4]\n" if task == "pose" else ""
    # No `download:` key: a dataset yaml's download entry can run arbitrary code or fetch URLs.
    (root / "data.yaml").write_text(
        f"path: {root.as_posix()}\ntrain: images/train\nval: images/val\n{keypoints}names:\n{names}\n"
    )


def _write_cls(root: Path, name: str, seed: int, imgsz: int) -> None:
    tr_x, tr_y, va_x, va_y = _pools(name, seed)
    for split, pool, labels in (("train", tr_x, tr_y), ("val", va_x, va_y)):
        for name in NAMES:
            (root / split / name).mkdir(parents=True)
        for i, (digit, label) in enumerate(zip(pool, labels)):
            grey = (_render_digit(digit, imgsz) * 255).astype(np.uint8)
            Image.fromarray(np.stack([grey] * 3, axis=-1)).save(root / split / str(label) / f"{i:05d}.png")


def _write_persons_cls(root: Path, seed: int, imgsz: int) -> None:
    """``digits-persons-cls`` (see the module's docstring): writer w's images are
    ``<split>/<class>/w<w>-<k>.png``; ``persons.csv`` names each image's writer (relative paths)."""
    from . import writers

    tr_x, tr_y, va_x, va_y = source_split(seed)
    rng = np.random.default_rng(seed + 2)
    rows = ["image,person"]
    for split, pool, labels, prefix in (("train", tr_x, tr_y, "t"), ("val", va_x, va_y, "v")):
        for name in NAMES:
            (root / split / name).mkdir(parents=True)
        for w in range(len(pool) // writers.IMAGES_PER):
            style = writers.draw_style(rng)
            for k in range(writers.IMAGES_PER):
                i = w * writers.IMAGES_PER + k
                grey = writers.write(pool[i], style, imgsz, rng)
                path = f"{split}/{labels[i]}/w{w:04d}-{k}.png"
                Image.fromarray(np.stack([grey] * 3, axis=-1)).save(root / path)
                rows.append(f"{path},writer-{prefix}{w:04d}")
    (root / "persons.csv").write_text("\n".join(rows) + "\n")


def build(
    name: str,
    *,
    seed: int = 0,
    imgsz: int | None = None,
    n_train: int = 1000,
    n_val: int = 200,
    max_digits: int = 4,
    root: Path | None = None,
) -> Path:
    """Build (or reuse) an embedded dataset and return what Ultralytics' ``data=`` expects.

    Detection, segmentation, pose and OBB sets return the path of their ``data.yaml``; classification
    sets their root folder.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown embedded dataset {name!r}; choose one of {', '.join(DATASETS)}")
    yolo = not name.endswith("-cls")  # YOLO label files and a data.yaml
    if yolo:
        imgsz = imgsz or 128
        if imgsz < 24:
            raise ValueError(f"imgsz must be >= 24 for {name}, got {imgsz}")
        key = f"{name}-v{_FORMAT_VERSION}-s{seed}-i{imgsz}-n{n_train}x{n_val}-d{max_digits}"
    else:
        imgsz = imgsz or 32
        key = f"{name}-v{_FORMAT_VERSION}-s{seed}-i{imgsz}"
    root = Path(root) if root else cache_dir()
    final = root / key
    if not final.exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            if yolo:
                _write_yolo(tmp, name, seed, imgsz, n_train, n_val, max_digits)
                # the yaml must name the final location, not the temporary one
                yaml = tmp / "data.yaml"
                yaml.write_text(yaml.read_text().replace(tmp.as_posix(), final.as_posix()))
            elif name == "digits-persons-cls":
                _write_persons_cls(tmp, seed, imgsz)
            else:
                _write_cls(tmp, name, seed, imgsz)
            try:
                tmp.rename(final)
            except OSError:  # another process finished the same build first
                if not final.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final / "data.yaml" if yolo else final


def resolve(data: object) -> object:
    """Map an embedded dataset name (optionally with ``.yaml``) to the built dataset; pass anything
    else through unchanged, the way Ultralytics resolves ``coco8``."""
    if isinstance(data, str) and data.removesuffix(".yaml") in DATASETS:
        return str(build(data.removesuffix(".yaml")))
    return data


def resolve_in(module: ModuleType) -> None:
    """Make ``module``'s dataset checks (Ultralytics' ``check_det_dataset`` / ``check_cls_dataset``)
    accept the embedded names, so plain, non-private training and validation can use them too."""
    for attr in ("check_det_dataset", "check_cls_dataset"):
        check = getattr(module, attr, None)
        if check is None or getattr(check, "resolves_embedded", False):
            continue

        @functools.wraps(check)
        def resolving(data: object, *args: object, _check: Callable = check, **kwargs: object) -> object:
            return _check(resolve(data), *args, **kwargs)

        resolving.resolves_embedded = True
        setattr(module, attr, resolving)
