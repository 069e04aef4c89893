"""Detection tuning on a split of digits-det's *training* set (800 train / 200 held out), never its
validation set: one private fine-tune of the public model per config. Each run is recorded in the
search ledger (``--ledger``), so what the search spent is known. Rows go to ``--out`` as JSON lines.

    python benchmarks/tune_det.py --out rows.jsonl --ledger search.db public "" lr0=0.1,epochs=20 ...

A config is training arguments (``key=value,...``; ``epsilon`` and ``augmult`` go to DP, the rest to
``model.train``, over the DP defaults); ``public`` scores the public model alone, zero-shot.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import ultralytics_dp  # noqa: F401
from ultralytics import YOLO

from ultralytics_dp import DifferentialPrivacy
from ultralytics_dp.datasets import build
from ultralytics_dp.public_weights import pretrained


def split(root: Path) -> Path:
    data = build("digits-det")
    images = sorted((data.parent / "images" / "train").iterdir())
    random.Random(0).shuffle(images)
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.txt").write_text("\n".join(map(str, images[:800])) + "\n")
    (root / "held.txt").write_text("\n".join(map(str, images[800:])) + "\n")
    yaml = root / "tune.yaml"
    names = "\n".join(f"  {i}: '{i}'" for i in range(10))
    yaml.write_text(f"path: {root}\ntrain: {root / 'train.txt'}\nval: {root / 'held.txt'}\nnames:\n{names}\n")
    return yaml


def parse(spec: str) -> dict:
    out = {}
    for item in filter(None, spec.split(",")):
        key, value = item.split("=")
        if value in ("True", "False"):
            out[key] = value == "True"
        else:
            out[key] = value if key in ("optimizer",) else (int(value) if value.isdigit() else float(value))
    return out


def emit(path: str, row: dict) -> None:
    print(json.dumps(row), flush=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--ledger", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("configs", nargs="+")
    args = p.parse_args()
    yaml = split(Path(tempfile.gettempdir()) / "dettune-split")
    public = pretrained("digits-public-det")
    for spec in args.configs:
        if spec == "public":  # the public model alone, zero-shot on the held-out images
            metrics = YOLO(public).val(data=str(yaml), imgsz=128, workers=0, verbose=False, plots=False,
                                       device=args.device)
            emit(args.out, dict(spec=spec, map50=round(float(metrics.box.map50), 4), device=args.device))
            continue
        cfg = parse(spec)
        epsilon = cfg.pop("epsilon", 8.0)
        augmult = int(cfg.pop("augmult", 1))
        start = time.perf_counter()
        model = YOLO(public)
        dp = DifferentialPrivacy(epsilon=epsilon, delta=1e-5, augmult=augmult, ledger=args.ledger).attach(model)
        with tempfile.TemporaryDirectory() as project:
            metrics = model.train(data=str(yaml), imgsz=128, workers=0, verbose=False, plots=False,
                                  device=args.device, project=project, name="run", **{"epochs": 10, **cfg})
        row = dict(spec=spec, epsilon=epsilon, augmult=augmult, map50=round(float(metrics.box.map50), 4),
                   spent=round(dp.epsilon, 4), steps=dp.steps, sigma=round(dp.noise_multiplier, 4),
                   lr0=model.trainer.args.lr0, batch=model.trainer.args.batch,
                   seconds=round(time.perf_counter() - start, 1), device=args.device)
        emit(args.out, row)


if __name__ == "__main__":
    main()
