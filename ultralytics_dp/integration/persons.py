"""Whose images these are: the ``persons`` file (``image,person``), checked against the training and
validation sets before any step.

Privacy assumptions relied on here:

* Every training image and every validation image has exactly one person; the file says so. An
  image the file does not name, or names twice with two persons, is refused: a person's image
  counted as someone else's (or as nobody's) would be an unprotected copy of that person.
* The validation set is public (metrics, plots and best.pt selection are released without
  noise), so no validation image may belong to a person who is in the training set.
* Person ids are private (often medical record numbers). They stay in memory: the ledger keeps
  only a keyed hash of them (``accounting.ledger``); nothing here prints, logs or returns one in
  an error (errors name image files, which the user's own dataset listing shows anyway).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

HEADER = ["image", "person"]


@dataclass(frozen=True)
class Persons:
    """The training set's persons: ``images[p]`` are person p's image indices (dataset order), and
    ``ids[p]`` their id from the file (private: for the ledger's keyed hash only)."""

    images: tuple[tuple[int, ...], ...]
    ids: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.images)

    @property
    def largest(self) -> int:
        """The most images any one person has in the training set."""
        return max(len(i) for i in self.images)

    def __repr__(self) -> str:  # never show an id
        return f"Persons({self.count} persons, at most {self.largest} images each)"


def dataset_root(data: dict[str, Any]) -> Path:
    """What relative paths in the persons file are relative to: the dataset's ``path`` (a YOLO
    data.yaml), else the folder above the training folder (a classification dataset)."""
    return Path(data["path"]) if data.get("path") else Path(data["train"]).parent


def locate(path: str | Path, root: str | Path) -> Path:
    """The persons file: ``path`` as given, or, when a relative path is not there, in the dataset's
    root (so ``persons=persons.csv`` finds the one an embedded dataset carries)."""
    path = Path(path)
    if path.is_absolute() or path.exists() or not (Path(root) / path).is_file():
        return path
    return Path(root) / path


def _key(path: str | Path) -> str:
    return os.path.normcase(os.path.realpath(path))


def read(path: str | Path, root: str | Path) -> dict[str, str]:
    """Image (resolved path) -> person id, from a CSV with the header ``image,person``; a one-line
    ValueError for a missing file, another header, an empty person, or an image given two persons."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"persons={path} does not exist; give a CSV `image,person` naming the person of every image")
    owner: dict[str, str] = {}
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if [h.strip() for h in header or []] != HEADER:  # never echo the line: it may be a row with a person id
            raise ValueError(f"persons={path} must start with the header line `image,person` (its first line is "
                             "something else: add the header)")
        for line, row in enumerate(rows, 2):
            if not row or not any(v.strip() for v in row):
                continue
            if len(row) != 2 or not row[0].strip():
                raise ValueError(f"persons={path} line {line}: expected `image,person`")
            image, person = row[0].strip(), row[1].strip()
            if not person:
                raise ValueError(f"persons={path} line {line}: the image {image} has an empty person")
            key = _key(Path(root) / image)  # an absolute image path stays itself
            if owner.setdefault(key, person) != person:
                raise ValueError(f"persons={path} line {line}: the image {image} is given two different persons")
    return owner


def group(owner: dict[str, str], train: Sequence[str], val: Sequence[str], source: str | Path) -> Persons:
    """The training set's persons, after refusing a training or validation image without a person
    and a validation image of a training person (``source``: the file, for the errors)."""
    keys = [_key(f) for f in train]
    for files, where in ((train, "training"), (val, "validation")):
        missing = next((f for f in files if _key(f) not in owner), None)
        if missing is not None:
            raise ValueError(f"the {where} image {missing} has no person in persons={source}; every training and "
                             "validation image needs one")
    members: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        members.setdefault(owner[key], []).append(i)
    shared = next((f for f in val if owner[_key(f)] in members), None)
    if shared is not None:
        raise ValueError(f"the validation image {shared} belongs to a person in the training set; the validation set is "
                         "released through metrics, plots and best.pt: validate on other persons")
    ids = tuple(members)
    return Persons(tuple(tuple(members[p]) for p in ids), ids)
