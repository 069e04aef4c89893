"""The training set as the trainer will sample it: checked before any step, and named for the ledger.

Privacy assumptions relied on here: the records are exactly the images the trainer samples from
(N = len(dataset)); Ultralytics silently drops images it finds corrupt, which would make N and the
ledger's record set wrong, so that is refused, as are labels outside the dataset's classes or not
normalised. An image without labels is a valid record (background). The validation set is public
(metrics, plots and best.pt selection are released without noise), so it must share no image with
the training set: not by decoded pixels, and not as a near-duplicate (``accounting.records``).
The same image twice in the training set would be one record sampled twice per step, with twice
the sensitivity: refused too.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from ..accounting.records import THUMB, Record, near_pairs


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


def identify(path: str | Path) -> Record:
    """The ledger's identities of one image file (``accounting.records``): its decoded pixels (8-bit
    RGB, as stored: no EXIF rotation), its bytes and its 16x16 grayscale thumbnail."""
    raw = Path(path).read_bytes()
    with Image.open(io.BytesIO(raw)) as image:
        rgb = image.convert("RGB")
    pixels = hashlib.sha256(f"{rgb.width}x{rgb.height}\n".encode() + rgb.tobytes()).hexdigest()
    thumb = rgb.convert("L").resize((THUMB, THUMB), Image.Resampling.BOX).tobytes()
    return Record(pixels=pixels, file=hashlib.sha256(raw).hexdigest(), thumb=thumb)


def identify_all(files: Sequence[str | Path]) -> list[Record]:
    """``identify`` for each file, on up to 8 threads (decoding and hashing release the GIL)."""
    if len(files) < 64:
        return [identify(f) for f in files]
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(identify, files, chunksize=32))


def check_distinct_images(train: Sequence[str], train_records: Sequence[Record], val: Sequence[str],
                          val_records: Sequence[Record]) -> None:
    """Refuse the same image (by its decoded pixels) twice in the training set, or in both the
    training and the validation set, and a validation image that is a near-duplicate of a training
    image (``accounting.records``). Files and records are given in the same order."""
    seen: dict[str, str] = {}
    for path, record in zip(train, train_records):
        if record.pixels in seen:
            raise ValueError(f"the training set holds the same image twice ({seen[record.pixels]} and {path}); one "
                             "image is one record: remove the copy")
        seen[record.pixels] = path
    for path, record in zip(val, val_records):
        if record.pixels in seen:
            raise ValueError(f"the validation set shares images with the training set (e.g. {path}); the "
                             "validation set is released through metrics, plots and best.pt: use held-out images")
    for i, j in near_pairs([r.thumb for r in train_records], [r.thumb for r in val_records]):
        raise ValueError(f"the validation image {val[j]} is a near-duplicate of the training image {train[i]} (a "
                         "re-encoded, slightly resized or recoloured copy); the validation set is released through "
                         "metrics, plots and best.pt: use held-out images")


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
