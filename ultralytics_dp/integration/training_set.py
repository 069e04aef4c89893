"""The training set as the trainer will sample it: checked before any step, and named for the ledger.

Privacy assumptions relied on here: the records are exactly the images the trainer samples from
(N = len(dataset)); Ultralytics silently drops images it finds corrupt, which would make N and the
ledger's record set wrong, so that is refused, as are labels outside the dataset's classes or not
normalised. An image without labels is a valid record (background). The validation set is public
(metrics, plots and best.pt selection are released without noise), so it must share no image with
the training set, by path or by content. The same image twice in the training set would be one
record (one person's image) sampled twice per step, with twice the sensitivity: refused too.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any


def image_files(dataset: Any) -> list[str]:
    """The image file of every record, for detection (``im_files``) and classification (``samples``)."""
    if hasattr(dataset, "im_files"):
        return list(dataset.im_files)
    return [str(sample[0]) for sample in dataset.samples]


def dataset_records(dataset: Any) -> list[tuple[str, str]]:
    """(image path, label text) for every record the trainer will sample from: the input of the
    ledger's fingerprint. Detection: the YOLO label file; classification: the class index."""
    if hasattr(dataset, "label_files"):
        return [(im, Path(lb).read_text() if Path(lb).exists() else "")
                for im, lb in zip(dataset.im_files, dataset.label_files)]
    return [(str(sample[0]), str(sample[1])) for sample in dataset.samples]


def check_distinct_images(train: Any, val: Any) -> None:
    """Refuse the same image (path or bytes) twice in the training set, or in both the training and
    the validation set. Only files whose size occurs more than once are hashed, so this stays cheap;
    one file named twice (a repeated path, a link) has the same bytes, so paths need no resolving."""
    by_size: dict[int, list[tuple[str, Path]]] = defaultdict(list)
    for side, files in (("train", image_files(train)), ("val", image_files(val))):
        for f in files:
            by_size[os.stat(f).st_size].append((side, Path(f)))
    for group in by_size.values():
        if len(group) < 2 or {side for side, _ in group} == {"val"}:
            continue
        seen: dict[str, tuple[str, Path]] = {}
        for side, path in group:
            key = hashlib.sha256(path.read_bytes()).hexdigest()
            if key in seen and "train" in (side, seen[key][0]):
                if side == seen[key][0]:
                    raise ValueError(f"the training set holds the same image twice ({seen[key][1]} and {path}); one "
                                     "image is one record: remove the copy")
                raise ValueError(f"the validation set shares images with the training set (e.g. {path}); the "
                                 "validation set is released through metrics, plots and best.pt: use held-out images")
            seen.setdefault(key, (side, path))


SLACK = 0.01  # how far outside [0, 1] Ultralytics' label check lets a coordinate be


def _coordinates(values: list[float], kpt_shape: list[int] | None) -> tuple[list[float], list[float]]:
    """(normalised coordinates, keypoint visibilities) of one label line: box or polygon, and each
    keypoint's x, y (and visibility when ``kpt_shape`` has 3 values per keypoint)."""
    if not kpt_shape:
        return values[1:], []
    ndim = kpt_shape[1]
    points = [values[5 + i:5 + i + ndim] for i in range(0, len(values) - 5, ndim)]
    return values[1:5] + [v for p in points for v in p[:2]], [p[2] for p in points if ndim == 3]


def check_training_set(dataset: Any) -> None:
    """Refuse, before any step, a training set that is too small, has corrupt or out-of-range
    labels, lost images that Ultralytics silently dropped as corrupt (N would be wrong), or has
    ``.npy`` image caches, which Ultralytics would train on instead of the image files the ledger
    names (a leftover or stale cache is another image)."""
    n = len(dataset)
    if n < 2:
        raise ValueError(f"the training set has {n} image(s); differential privacy needs at least 2")
    cached = next((f for f in image_files(dataset) if Path(f).with_suffix(".npy").exists()), None)
    if cached is not None:
        raise ValueError(f"{Path(cached).with_suffix('.npy')} is an image cache Ultralytics would train on instead of "
                         f"{cached}; delete the training set's .npy files (cache=disk leaves them) and use cache=ram or "
                         "cache=False")
    if not hasattr(dataset, "label_files"):
        return
    from ultralytics.data.utils import img2label_paths

    every_image = dataset.get_img_files(dataset.img_path)
    # single_cls relabels every box of every image 0 (Ultralytics replaced the names already): any
    # integer class is then in range, as Ultralytics' own label check has it
    single_cls = getattr(dataset, "single_cls", False)
    nc = float("inf") if single_cls else len(dataset.data["names"])
    kpt_shape = dataset.data.get("kpt_shape") if getattr(dataset, "use_keypoints", False) else None
    for label_file in img2label_paths(every_image):
        path = Path(label_file)
        if not path.exists():
            continue  # an image without labels is a valid record (background)
        # utf-8-sig: a byte-order mark, which Ultralytics' reader accepts, is not part of the first number
        for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            try:
                values = [float(v) for v in fields]
            except ValueError:
                raise ValueError(f"corrupt label file {path} line {lineno}: {line!r} is not numbers") from None
            if kpt_shape and len(values) != 5 + kpt_shape[0] * kpt_shape[1]:
                raise ValueError(f"corrupt label file {path} line {lineno}: expected 'class x y w h' and "
                                 f"{kpt_shape[0]}x{kpt_shape[1]} keypoint values, got {line!r}")
            if not kpt_shape and (len(values) < 5 or len(values) % 2 == 0):
                raise ValueError(f"corrupt label file {path} line {lineno}: expected 'class x y w h', got {line!r}")
            if not values[0].is_integer() or not 0 <= values[0] < nc:
                allowed = "an integer >= 0 (single_cls)" if single_cls else f"0..{nc - 1}"
                raise ValueError(f"label file {path} line {lineno}: class {fields[0]} outside {allowed}")
            coords, visibility = _coordinates(values, kpt_shape)
            # Ultralytics' own tolerance (1% outside the image, then clipped); what it still drops
            # is refused below, by the count of images it kept
            if not all(-SLACK <= v <= 1 + SLACK for v in coords):
                raise ValueError(f"label file {path} line {lineno}: coordinates must be normalised to [0, 1]")
            if not all(v >= -SLACK and math.isfinite(v) for v in visibility):
                raise ValueError(f"label file {path} line {lineno}: keypoint visibility must be a number >= 0")
    if len(every_image) != n:
        raise ValueError(f"Ultralytics dropped {len(every_image) - n} of {len(every_image)} training images as "
                         "corrupt; fix or remove them so the training set is what you think it is")
