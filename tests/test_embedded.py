"""The embedded datasets: well-formed, deterministic, train/val disjoint at the source digit."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ultralytics_dp.datasets import embedded as datasets


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "data.yaml"):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.mark.slow
def test_default_det_dataset_is_well_formed() -> None:
    yaml = datasets.build("digits-det")
    root = yaml.parent
    assert f"path: {root.as_posix()}" in yaml.read_text()
    assert "download" not in yaml.read_text()
    counts = {}
    n_empty = n_boxes = 0
    for split in ("train", "val"):
        images = sorted((root / "images" / split).glob("*.png"))
        counts[split] = len(images)
        for img_path in images:
            w, h = Image.open(img_path).size
            assert (w, h) == (128, 128) and Image.open(img_path).mode == "RGB"
            rows = (root / "labels" / split / f"{img_path.stem}.txt").read_text().split("\n")
            rows = [r.split() for r in rows if r.strip()]
            n_empty += not rows
            assert len(rows) <= 4
            for r in rows:
                assert len(r) == 5
                c, cx, cy, bw, bh = int(r[0]), *map(float, r[1:])
                assert 0 <= c <= 9
                assert bw > 0 and bh > 0
                # every box lies inside its image
                assert cx - bw / 2 >= -1e-6 and cx + bw / 2 <= 1 + 1e-6
                assert cy - bh / 2 >= -1e-6 and cy + bh / 2 <= 1 + 1e-6
                n_boxes += 1
    assert counts["train"] >= 1000 and counts["val"] >= 200
    assert n_empty > 0, "a few images must hold no digit"
    assert n_boxes > 1000


@pytest.mark.parametrize("name", ["digits-det", "digits-seg", "digits-pose", "digits-obb"])
def test_same_seed_same_files_other_seed_differs(tmp_path: Path, name: str) -> None:
    a = datasets.build(name, seed=3, imgsz=32, n_train=12, n_val=4, root=tmp_path / "a")
    b = datasets.build(name, seed=3, imgsz=32, n_train=12, n_val=4, root=tmp_path / "b")
    c = datasets.build(name, seed=4, imgsz=32, n_train=12, n_val=4, root=tmp_path / "c")
    assert _digest(a.parent) == _digest(b.parent)
    assert _digest(a.parent) != _digest(c.parent)


def test_train_and_val_source_digits_are_disjoint() -> None:
    from sklearn.datasets import load_digits

    tr_x, _, va_x, _ = datasets.source_split(0)
    # compare by content: map each split back to the original digit indices
    all_x = load_digits().images / 16.0
    key = {a.tobytes(): i for i, a in enumerate(all_x)}
    tr = {key[x.tobytes()] for x in tr_x}
    va = {key[x.tobytes()] for x in va_x}
    assert tr and va and not (tr & va)
    # duplicates in load_digits could defeat an index check: assert no identical pixels either
    assert not ({x.tobytes() for x in tr_x} & {x.tobytes() for x in va_x})


def test_classification_layout(tmp_path: Path) -> None:
    root = datasets.build("digits-cls", root=tmp_path)
    for split in ("train", "val"):
        classes = sorted(p.name for p in (root / split).iterdir())
        assert classes == [str(i) for i in range(10)]
        files = list((root / split).rglob("*.png"))
        assert len(files) > (1000 if split == "train" else 300)
    img = np.asarray(Image.open(next((root / "train" / "3").glob("*.png"))))
    assert img.shape == (32, 32, 3)


@pytest.mark.slow
def test_resolve_names_and_passes_other_values_through() -> None:
    assert datasets.resolve("coco8.yaml") == "coco8.yaml"
    assert datasets.resolve(None) is None
    resolved = datasets.resolve("digits-det")
    assert Path(resolved).name == "data.yaml" and Path(resolved).exists()
    assert datasets.resolve("digits-det.yaml") == resolved
    with pytest.raises(ValueError, match="unknown embedded dataset"):
        datasets.build("digits-xyz")


def test_public_digits_never_read_the_handwritten_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sklearn.datasets

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the public generator read the handwritten digits")

    monkeypatch.setattr(sklearn.datasets, "load_digits", refuse)
    monkeypatch.setattr(datasets, "PUBLIC_POOL", (30, 10))
    cls = datasets.build("digits-public-cls", root=tmp_path)
    det = datasets.build("digits-public-det", imgsz=32, n_train=6, n_val=3, root=tmp_path)
    assert sorted(p.name for p in (cls / "train").iterdir()) == datasets.NAMES
    assert len(list((cls / "train").rglob("*.png"))) == 30 and len(list((cls / "val").rglob("*.png"))) == 10
    assert len(list((det.parent / "images" / "train").glob("*.png"))) == 6
    with pytest.raises(AssertionError, match="handwritten"):  # the guard above does fire
        datasets.build("digits-cls", root=tmp_path)


@pytest.mark.parametrize("generator", ["font_digits", "pen_digits"])
def test_public_digits_are_deterministic_balanced_and_in_the_8x8_format(generator: str) -> None:
    import importlib

    render_pool = importlib.import_module(f"ultralytics_dp.datasets.{generator}").render_pool
    images, labels = render_pool(40, seed=5)
    again, _ = render_pool(40, seed=5)
    other, _ = render_pool(40, seed=6)
    assert np.array_equal(images, again) and not np.array_equal(images, other)
    assert images.shape == (40, 8, 8) and images.min() >= 0 and images.max() <= 1
    assert np.array_equal(np.bincount(labels), [4] * 10)
    # the optdigits format: counts of 4x4 blocks, so multiples of 1/16, every digit inked
    assert np.allclose(images * 16, np.round(images * 16)) and (images.reshape(40, -1).max(1) > 0).all()


def test_typeset_digits_come_in_many_fonts() -> None:
    from ultralytics_dp.datasets.font_digits import font_paths

    assert len(font_paths()) >= 15  # several families, weights and slants


def test_written_digits_read_as_the_digit_they_are_labelled() -> None:
    """The pen's strokes draw the digit of their label: a classifier that has only seen the typeset
    digits (an independent source of the ten shapes) reads the written ones, every class well above
    chance (a wrong or swapped skeleton would score near 0 on its classes; measured 0.82 overall and
    0.53-1.0 per class at these sizes)."""
    from sklearn.linear_model import LogisticRegression

    from ultralytics_dp.datasets import font_digits

    from ultralytics_dp.datasets import pen_digits

    typeset, typeset_labels = font_digits.render_pool(300, seed=0)
    written, labels = pen_digits.render_pool(200, seed=1)
    read = LogisticRegression(max_iter=3000).fit(typeset.reshape(300, -1), typeset_labels).predict(written.reshape(200, -1))
    recall = [float((read[labels == d] == d).mean()) for d in range(10)]
    assert (read == labels).mean() > 0.6 and min(recall) > 0.3, recall


def test_embedded_names_resolve_for_plain_ultralytics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Non-private training and validation (no DifferentialPrivacy attached) accept the names."""
    import ultralytics_dp  # noqa: F401  (registers the hook)
    from ultralytics.engine import trainer, validator

    monkeypatch.setenv("ULTRALYTICS_DP_DATA", str(tmp_path))
    data = validator.check_cls_dataset("digits-cls")
    assert Path(data["train"]) == datasets.build("digits-cls") / "train" and data["nc"] == 10
    det = trainer.check_det_dataset("digits-det.yaml")
    assert Path(det["yaml_file"]) == datasets.build("digits-det") and det["nc"] == 10


@pytest.mark.slow
def test_public_weights_are_trained_once_then_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ultralytics
    import sklearn.datasets

    from ultralytics_dp.datasets import public_weights

    monkeypatch.setenv("ULTRALYTICS_DP_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(datasets, "PUBLIC_POOL", (40, 20))
    monkeypatch.setattr(sklearn.datasets, "load_digits", lambda *a, **k: pytest.fail("read the private digits"))
    monkeypatch.setitem(public_weights.RECIPES, "digits-public-cls", ("yolo26n-cls.yaml",
                                                                      {"imgsz": 32, "epochs": 1, "batch": 16}))
    from ultralytics.utils.callbacks.base import default_callbacks

    seen = []  # the thread count while training: Ultralytics would leave one core of two idle
    monkeypatch.setitem(default_callbacks, "on_train_epoch_start",
                        [*default_callbacks["on_train_epoch_start"], lambda trainer: seen.append(torch.get_num_threads())])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        weights = public_weights.pretrained("digits-public-cls", root=tmp_path / "weights")
        assert seen == [min(os.cpu_count(), 8)] and torch.get_num_threads() == 1  # all cores, then restored
    finally:
        torch.set_num_threads(threads)
    assert weights.is_file() and [p.name for p in (tmp_path / "weights").iterdir()] == [weights.name]
    model = ultralytics.YOLO(weights)
    assert model.task == "classify" and model.model.names == dict(enumerate(datasets.NAMES))

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained again")

    monkeypatch.setattr(ultralytics, "YOLO", no_training)
    assert public_weights.pretrained("digits-public-cls", root=tmp_path / "weights") == weights
    assert public_weights.pretrained("digits-public-cls", root=tmp_path / "weights", epochs=1) == weights
    with pytest.raises(AssertionError, match="trained again"):  # other epochs: other weights, not the cached ones
        public_weights.pretrained("digits-public-cls", root=tmp_path / "weights", epochs=2)

    class Recorder:  # another batch: other weights, one optimizer step per batch (nbs follows it)
        def __init__(self, architecture: str) -> None:
            pass

        def add_callback(self, *args: object) -> None:
            pass

        def train(self, **kwargs: object) -> None:
            raise AssertionError(f"trained again with batch={kwargs['batch']}, nbs={kwargs.get('nbs')}")

    monkeypatch.setattr(ultralytics, "YOLO", Recorder)
    with pytest.raises(AssertionError, match="trained again with batch=8, nbs=8"):
        public_weights.pretrained("digits-public-cls", root=tmp_path / "weights", epochs=1, batch=8)


def _canvases(yaml: Path):
    """(image as float array, label rows) of every training canvas of a built dataset."""
    root = yaml.parent
    for img in sorted((root / "images" / "train").glob("*.png")):
        rows = (root / "labels" / "train" / f"{img.stem}.txt").read_text().splitlines()
        yield np.asarray(Image.open(img)).astype(float), [list(map(float, r.split())) for r in rows]


@pytest.mark.parametrize("name,task", [("digits-seg", "segment"), ("digits-pose", "pose"), ("digits-obb", "obb")])
def test_segmentation_pose_and_obb_labels_fit_the_ink_and_load_in_ultralytics(tmp_path: Path, name, task) -> None:
    """Checked against the pixels: a digit's bright ink lies inside its polygon (seg) or turned box
    (obb); keypoints are its ink box's corners and a centroid inside the box (pose). And
    Ultralytics' own loader reads every label of the task without dropping any."""
    import cv2
    from ultralytics.cfg import get_cfg
    from ultralytics.data import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    yaml = datasets.build(name, imgsz=64, n_train=30, n_val=6, root=tmp_path)
    inside = total = rows_seen = 0
    for image, rows in _canvases(yaml):
        covered = np.zeros(image.shape[:2], np.uint8)
        for row in rows:
            rows_seen += 1
            coords = row[1:] if task != "pose" else row[1:5] + [v for i, v in enumerate(row[5:]) if i % 3 != 2]
            assert row[0] in range(10) and all(0 <= v <= 1 for v in coords)
            if task == "pose":
                cx, cy, w, h = row[1:5]
                kpts = np.array(row[5:]).reshape(5, 3)
                assert np.allclose(kpts[:4, :2], [[cx - w / 2, cy - h / 2], [cx + w / 2, cy - h / 2],
                                                  [cx + w / 2, cy + h / 2], [cx - w / 2, cy + h / 2]], atol=1e-5)
                assert abs(kpts[4, 0] - cx) < w / 2 and abs(kpts[4, 1] - cy) < h / 2 and (kpts[:, 2] == 2).all()
                points = kpts[:4, :2]
            else:
                points = np.array(row[1:]).reshape(-1, 2)
                assert len(points) == 4 if task == "obb" else len(points) >= 3
            cv2.fillPoly(covered, [np.round(points * image.shape[1]).astype(np.int32)], 1)
        ink = image.max(2) > 0.55 * 255  # digits are drawn at 0.6-1.0 brightness on a background below 0.25
        inside, total = inside + (ink & (covered > 0)).sum(), total + ink.sum()
    assert rows_seen > 20 and inside / total > (0.9 if task == "segment" else 0.99)

    data = check_det_dataset(str(yaml))
    loaded = YOLODataset(img_path=data["train"], imgsz=64, augment=False, data=data, task=task, hyp=get_cfg())
    labels = loaded.labels
    assert len(labels) == 30 and sum(len(lb["cls"]) for lb in labels) == rows_seen
    if task == "pose":
        assert all(lb["keypoints"].shape[1:] == (5, 3) for lb in labels if len(lb["cls"]))
    else:
        assert sum(len(lb["segments"]) for lb in labels) == rows_seen
