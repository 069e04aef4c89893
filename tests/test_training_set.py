"""The training set is checked before any step: bad labels, dropped images, too few images, an
image twice or in the validation set, by its pixels or as a near-duplicate (each refused in one
line, nothing spent, recorded or written)."""

from __future__ import annotations

import pytest
from PIL import Image

from helpers import assert_refused, copy_dataset
from ultralytics_dp.integration.training_set import check_distinct_images, identify_all


@pytest.mark.slow
def test_out_of_range_label_is_refused(tiny_det, tmp_path):
    yaml = copy_dataset(tiny_det, tmp_path)
    (yaml.parent / "labels" / "train" / "00003.txt").write_text("12 0.5 0.5 0.1 0.1\n")
    assert_refused(tmp_path, yaml, "class 12 outside 0..9")


@pytest.mark.slow
def test_corrupt_label_is_refused(tiny_det, tmp_path):
    yaml = copy_dataset(tiny_det, tmp_path)
    (yaml.parent / "labels" / "train" / "00004.txt").write_text("3 0.5 oops 0.1\n")
    assert_refused(tmp_path, yaml, "corrupt label file")


@pytest.mark.slow
def test_single_image_dataset_is_refused(tiny_det, tmp_path):
    yaml = copy_dataset(tiny_det, tmp_path)
    for p in list((yaml.parent / "images" / "train").glob("*.png"))[1:]:
        p.unlink()
    assert_refused(tmp_path, yaml, "at least 2", batch=1)


@pytest.mark.slow
def test_empty_dataset_is_refused(tiny_det, tmp_path):
    yaml = copy_dataset(tiny_det, tmp_path)
    for p in (yaml.parent / "images" / "train").glob("*.png"):
        p.unlink()
    assert_refused(tmp_path, yaml, "cannot load the training set")


@pytest.mark.slow
def test_a_validation_set_sharing_an_image_with_the_training_set_is_refused(tiny_det, tmp_path):
    yaml = copy_dataset(tiny_det, tmp_path)
    train_image = sorted((yaml.parent / "images" / "train").iterdir())[3]
    val_image = sorted((yaml.parent / "images" / "val").iterdir())[0]
    val_image.write_bytes(train_image.read_bytes())  # a copy under another name
    assert_refused(tmp_path, yaml, "validation set shares images with the training set")


@pytest.mark.slow
def test_the_same_image_twice_in_the_training_set_is_refused(tiny_det, tmp_path):
    yaml = copy_dataset(tiny_det, tmp_path)
    first, second = sorted((yaml.parent / "images" / "train").iterdir())[:2]
    second.write_bytes(first.read_bytes())  # one record, sampled twice per step: twice the sensitivity
    assert_refused(tmp_path, yaml, "the training set holds the same image twice")


@pytest.mark.slow
def test_an_npy_image_cache_in_the_training_set_is_refused(tiny_det, tmp_path):
    """Ultralytics trains on image.npy when it exists: not the file the ledger would name."""
    import numpy as np

    yaml = copy_dataset(tiny_det, tmp_path)
    image = sorted((yaml.parent / "images" / "train").iterdir())[2]
    np.save(image.with_suffix(".npy"), np.zeros((64, 64, 3), dtype=np.uint8))
    assert_refused(tmp_path, yaml, "image cache Ultralytics would train on")



@pytest.mark.slow
def test_single_cls_trains_on_labels_of_every_class(tiny_det, tmp_path):
    """single_cls relabels each image's own boxes 0 (listed safe); the class-range check used to
    refuse every label above 0 because Ultralytics had already replaced the names with one class."""
    from ultralytics_dp import DifferentialPrivacy

    from helpers import train_tiny

    dp = DifferentialPrivacy(epsilon=4.0, delta=1e-3, ledger=tmp_path / "ledger.sqlite")
    model, _, _ = train_tiny(tiny_det, tmp_path, dp, epochs=1, single_cls=True)
    assert dp.steps > 0 and model.trainer.data["nc"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("line,match", [
    ("0 0.5 0.5 0.2 0.2 0.4 0.4 2\n", "5x3 keypoint values"),  # one keypoint instead of five
    ("0 0.5 0.5 0.2 0.2" + " 1.5 0.4 2" + " 0.4 0.4 2" * 4 + "\n", "normalised"),  # a keypoint off the image
])
def test_bad_pose_labels_are_refused(tmp_path, line, match):
    """Pose label lines are 'class x y w h' and kpt_shape keypoint values (the plain check took a
    valid 5x3 line for a corrupt polygon)."""
    from ultralytics_dp.datasets import embedded as datasets

    pose = datasets.build("digits-pose", imgsz=64, n_train=16, n_val=8, root=tmp_path / "data")
    (pose.parent / "labels" / "train" / "00003.txt").write_text(line)
    assert_refused(tmp_path, pose, match, cfg="yolov8n-pose.yaml")


@pytest.mark.slow
def test_a_label_file_with_a_byte_order_mark_trains(tiny_det, tmp_path):
    """Ultralytics reads label files as utf-8-sig; the check read the mark as part of the class
    and refused a valid dataset ("not numbers"), found by an independent review."""
    from ultralytics_dp import DifferentialPrivacy

    from helpers import train_tiny

    yaml = copy_dataset(tiny_det, tmp_path)
    (yaml.parent / "labels" / "train" / "00003.txt").write_text("\ufeff3 0.5 0.5 0.1 0.1\n", encoding="utf-8")
    dp = DifferentialPrivacy(epsilon=4.0, delta=1e-3, ledger=tmp_path / "ledger.sqlite")
    train_tiny(yaml, tmp_path, dp, epochs=1)
    assert dp.steps > 0


@pytest.mark.slow
def test_a_box_a_hair_outside_the_image_trains_as_in_ultralytics(tiny_det, tmp_path):
    """Ultralytics accepts coordinates up to 1% outside [0, 1] (rounding in exported labels) and
    clips them; the check refused them (found by the pose review). Further out is still refused."""
    from ultralytics_dp import DifferentialPrivacy

    from helpers import train_tiny

    yaml = copy_dataset(tiny_det, tmp_path)
    (yaml.parent / "labels" / "train" / "00003.txt").write_text("3 0.5 0.5 1.005 0.1\n")
    dp = DifferentialPrivacy(epsilon=4.0, delta=1e-3, ledger=tmp_path / "ledger.sqlite")
    train_tiny(yaml, tmp_path / "ok", dp, epochs=1)
    assert dp.steps > 0
    (yaml.parent / "labels" / "train" / "00003.txt").write_text("3 0.5 0.5 1.02 0.1\n")
    assert_refused(tmp_path / "refused", yaml, "normalised")


def _resaved(source, target, **save):
    """``source``'s pixels written to ``target`` by PIL with other settings (other bytes)."""
    with Image.open(source) as image:
        image.convert("RGB").save(target, **save)


def test_an_image_is_its_pixels_and_near_duplicates_of_training_images_are_refused(tiny_det, tmp_path):
    train = sorted((tiny_det.parent / "images" / "train").iterdir())
    val = sorted((tiny_det.parent / "images" / "val").iterdir())
    train_ids, val_ids = identify_all(train), identify_all(val)
    check_distinct_images(train, train_ids, val, val_ids)  # the embedded set itself: no false positive
    content = next(p for p, r in zip(train, train_ids) if r.has_content)
    png = tmp_path / "copy.png"  # the same pixels, other bytes: another PNG writer's settings and metadata
    _resaved(content, png, format="PNG", compress_level=1, pnginfo=_metadata())
    assert png.read_bytes() != content.read_bytes()
    assert identify_all([png])[0].pixels == identify_all([content])[0].pixels
    with pytest.raises(ValueError, match="validation set shares images"):
        check_distinct_images(train, train_ids, [*val, png], [*val_ids, *identify_all([png])])
    jpeg = tmp_path / "copy.jpg"  # lossy: other pixels, a near-duplicate
    _resaved(content, jpeg, format="JPEG", quality=90)
    assert identify_all([jpeg])[0].pixels != identify_all([content])[0].pixels
    with pytest.raises(ValueError, match=f"near-duplicate of the training image {content}"):
        check_distinct_images(train, train_ids, [*val, jpeg], [*val_ids, *identify_all([jpeg])])


def _metadata():
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", "another writer")
    return info


@pytest.mark.slow
def test_a_validation_image_re_encoded_from_a_training_image_is_refused(tiny_det, tmp_path):
    yaml = copy_dataset(tiny_det, tmp_path)
    train_image = sorted((yaml.parent / "images" / "train").iterdir())[3]
    val_image = sorted((yaml.parent / "images" / "val").iterdir())[0]
    _resaved(train_image, val_image, format="PNG", compress_level=1, pnginfo=_metadata())
    assert val_image.read_bytes() != train_image.read_bytes()
    assert_refused(tmp_path, yaml, "validation set shares images with the training set")
