"""Tuning on a split of a task's *training* set, never its validation set: one private fine-tune of
the public model per config. digits-det: 800 train / 200 held out; digits-cls: 1,151 / 287 (a fifth
held out). Each run is recorded in a search ledger, so what the search spent is known. Each run is
``bench_utility.run`` on the split; its rows (the metric in ``metric``) go to ``--out`` as JSON lines.

    python benchmarks/tune.py --task det --out rows.jsonl --ledger search.db public "" lr0=0.1,epochs=20 ...
    python benchmarks/tune.py --task cls --jobs 6 ... epsilon=1,epochs=20 epsilon=1,epochs=20 ...

A config is training arguments (``key=value,...``; ``epsilon`` and ``augmult`` go to DP, the rest to
``model.train``, over the DP defaults, epochs included); ``public`` scores the public model alone, zero-shot. A config
given twice runs twice (noise and sampling are OS-seeded). ``--jobs N`` runs N configs at a time in
separate processes (for a machine with many cores and a GPU), each run with its own ledger
(``search.db.0``, ``search.db.1``, ...: concurrent runs never share a database); the search's cost
is the composition of all of them.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import tempfile
from pathlib import Path

from bench_utility import run
from ultralytics_dp.datasets.embedded import build
from ultralytics_dp.integration.recipe import DEFAULTS

HELD = {"det": 200}  # held-out images of the split; classification holds out a fifth


def split(task: str, root: Path) -> str:
    """The tuning split's dataset (a yaml for detection, a folder for classification), built once."""
    root.mkdir(parents=True, exist_ok=True)
    if task == "det":
        images = sorted((build("digits-det").parent / "images" / "train").iterdir())
    else:
        images = sorted((Path(build("digits-cls")) / "train").rglob("*.png"))
    random.Random(0).shuffle(images)
    held = HELD.get(task, len(images) // 5)
    train, val = (images[held:], images[:held]) if task == "cls" else (images[:-held], images[-held:])
    if task == "cls":  # class folders of links: Ultralytics reads classification sets from folders
        for part, files in (("train", train), ("val", val)):
            for f in files:
                link = root / part / f.parent.name / f.name
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to(f)
        return str(root)
    (root / "train.txt").write_text("\n".join(map(str, train)) + "\n")
    (root / "held.txt").write_text("\n".join(map(str, val)) + "\n")
    yaml = root / "tune.yaml"
    names = "\n".join(f"  {i}: '{i}'" for i in range(10))
    yaml.write_text(f"path: {root}\ntrain: {root / 'train.txt'}\nval: {root / 'held.txt'}\nnames:\n{names}\n")
    return str(yaml)


def parse(spec: str) -> dict:
    out = {}
    for item in filter(None, spec.split(",")):
        key, value = item.split("=")
        if value in ("True", "False"):
            out[key] = value == "True"
        else:
            out[key] = value if key in ("optimizer",) else (int(value) if value.isdigit() else float(value))
    return out


def one(task: str, data: str, spec: str, ledger: str, device: str, public_epochs: int | None = None,
        user_public: bool = False) -> dict:
    if spec == "public":  # the public model alone, zero-shot on the held-out images
        row = run(task, "public only", None, 0, data=data, device=device, public_epochs=public_epochs,
                  user_public=user_public)
    else:
        cfg = parse(spec)
        epsilon, augmult, epochs = cfg.pop("epsilon", 8.0), int(cfg.pop("augmult", 1)), cfg.pop("epochs", DEFAULTS["epochs"][0])
        row = run(task, "public -> private", epsilon, epochs, augmult, data=data, ledger=ledger, device=device,
                  public_epochs=public_epochs, user_public=user_public, **cfg)
    return {**row, "spec": spec, "device": device}


def _job(job: tuple) -> dict:
    index, args = job
    return one(**{**args, "ledger": f"{args['ledger']}.{index}"})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", choices=("det", "cls"), default="det")
    p.add_argument("--out", required=True)
    p.add_argument("--ledger", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--public-epochs", type=int, default=None, help="pretrain the public model this long instead")
    p.add_argument("--public", choices=("package", "user"), default="package",
                   help="start from bench_utility.user_pretrained instead of the package's public model")
    p.add_argument("configs", nargs="+")
    args = p.parse_args()
    data = split(args.task, Path(tempfile.gettempdir()) / f"{args.task}tune-split")
    specs = [dict(task=args.task, data=data, spec=s, ledger=args.ledger, device=args.device,
                  public_epochs=args.public_epochs, user_public=args.public == "user") for s in args.configs]

    def write(row: dict) -> None:
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")

    if args.jobs == 1:
        for s in specs:
            write(one(**s))
        return
    with multiprocessing.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
        for row in pool.imap_unordered(_job, list(enumerate(specs))):
            write(row)


if __name__ == "__main__":
    main()
