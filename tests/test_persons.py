"""The persons file: every training and validation image has one person, and the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from ultralytics_dp.integration import persons


def _files(root: Path, names: list[str]) -> list[str]:
    out = []
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        out.append(str(path))
    return out


def _csv(root: Path, rows: list[str], header: str = "image,person") -> Path:
    path = root / "persons.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_persons_group_the_training_images_by_person(tmp_path):
    train = _files(tmp_path, ["train/a.png", "train/b.png", "train/c.png"])
    val = _files(tmp_path, ["val/d.png"])
    csv = _csv(tmp_path, ["train/a.png,p1", f"{train[1]},p2", "train/c.png,p1", "val/d.png,p3", "test/e.png,p9"])
    found = persons.group(persons.read(csv, tmp_path), train, val, csv)
    assert sorted(found.images) == [(0, 2), (1,)] and found.count == 2 and found.largest == 2
    assert "p1" not in repr(found)  # ids never shown


@pytest.mark.parametrize("rows, message", [
    (["train/a.png,p1", "val/d.png,p3"], "training image .*b.png has no person"),
    (["train/a.png,p1", "train/b.png,p2"], "validation image .*d.png has no person"),
    (["train/a.png,p1", "train/b.png,p2", "val/d.png,p2"], "validation image .*d.png belongs to a person in the training"),
    (["train/a.png,p1", "train/b.png,p2", "train/a.png,p3", "val/d.png,p4"], "a.png is given two different persons"),
    (["train/a.png,p1", "train/b.png,", "val/d.png,p4"], "b.png has an empty person"),
])
def test_a_persons_file_that_does_not_name_one_person_per_image_is_refused(tmp_path, rows, message):
    train = _files(tmp_path, ["train/a.png", "train/b.png"])
    val = _files(tmp_path, ["val/d.png"])
    csv = _csv(tmp_path, rows)
    with pytest.raises(ValueError, match=message) as err:
        persons.group(persons.read(csv, tmp_path), train, val, csv)
    assert "p1" not in str(err.value) and "p2" not in str(err.value)  # errors name images, never persons


def test_a_persons_file_needs_its_header_and_must_exist(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        persons.read(tmp_path / "none.csv", tmp_path)
    with pytest.raises(ValueError, match="header line `image,person`"):
        persons.read(_csv(tmp_path, ["a.png,p1"], header="file,patient"), tmp_path)
    headless = tmp_path / "headless.csv"
    headless.write_text("a.png,MRN-0012345\nb.png,MRN-0067890\n")
    with pytest.raises(ValueError, match="add the header") as err:  # found by a review: the row was echoed
        persons.read(headless, tmp_path)
    assert "MRN" not in str(err.value)


def test_a_repeated_row_with_the_same_person_is_one_image(tmp_path):
    train = _files(tmp_path, ["a.png", "b.png"])
    csv = _csv(tmp_path, ["a.png,p1", "a.png,p1", "b.png,p1"])
    assert persons.group(persons.read(csv, tmp_path), train, [], csv).images == ((0, 1),)


def test_the_persons_file_is_found_in_the_dataset_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "data"
    root.mkdir()
    (root / "persons.csv").write_text("image,person\n")
    assert persons.locate("persons.csv", root) == root / "persons.csv"
    (tmp_path / "persons.csv").write_text("image,person\n")
    assert persons.locate("persons.csv", root) == Path("persons.csv")  # the user's own file first


def test_person_level_settings_are_checked_at_once():
    from ultralytics_dp.config import DPConfig

    with pytest.raises(ValueError, match="privacy_unit=person needs persons="):
        DPConfig(epsilon=1, privacy_unit="person")
    with pytest.raises(ValueError, match="privacy_unit must be one of image, person, got 'patient'"):
        DPConfig(epsilon=1, privacy_unit="patient")
    assert "persons" not in DPConfig(epsilon=1, privacy_unit="person", persons="p.csv").released()  # a local path
