"""Detection tuning on a split of digits-det's *training* set (800 train / 200 held out), never its
validation set: one private fine-tune of the public model per config. Each run is recorded in the
search ledger (``--ledger``), so what the search spent is known. Each run is ``bench_utility.run`` on
the split; its rows (mAP50 in ``metric``) go to ``--out`` as JSON lines.

    python benchmarks/tune_det.py --out rows.jsonl --ledger search.db public "" lr0=0.1,epochs=20 ...

A config is training arguments (``key=value,...``; ``epsilon`` and ``augmult`` go to DP, the rest to
``model.train``, over the DP defaults); ``public`` scores the public model alone, zero-shot.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from bench_utility import run
from ultralytics_dp.datasets import build


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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--ledger", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("configs", nargs="+")
    args = p.parse_args()
    yaml = str(split(Path(tempfile.gettempdir()) / "dettune-split"))
    for spec in args.configs:
        if spec == "public":  # the public model alone, zero-shot on the held-out images
            row = run("det", "public only", None, 0, data=yaml, device=args.device)
        else:
            cfg = parse(spec)
            epsilon, augmult, epochs = cfg.pop("epsilon", 8.0), int(cfg.pop("augmult", 1)), cfg.pop("epochs", 10)
            row = run("det", "public -> private", epsilon, epochs, augmult, data=yaml, ledger=args.ledger,
                      device=args.device, **cfg)
        row.update(spec=spec, device=args.device)
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
