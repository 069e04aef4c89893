"""Where a public detector's per-image gradient lies, measured on public images only.

For each of ``--images`` public training images (batch of one, Ultralytics' own criterion of the
detector, BatchNorm on its running statistics as in a private step) this takes the gradient of
every weighted loss term (box, classification, L1 of the one-to-many and the one-to-one branch)
and reports, over the images, the median norm of each and its mean share of the image's
squared gradient norm (|g_part|^2 / |g|^2 per image: a clipped gradient is the image's direction,
so this is the part's share of what the image contributes, each image counting once), the same
split by layer group (backbone 0-9, neck 10-22, head 23) and for the one-dimensional parameters
(biases, normalisation affines), and the smallest whole-gradient norm (every image whose norm
exceeds C is clipped). The layer groups split the squared norm exactly; the loss terms' gradients
overlap, so their shares need not add up to 1. Freezing a part gives the others only
1 / sqrt(1 - its share) more clipped signal, while the noise per coordinate stays sigma * C / batch.

    python benchmarks/bench_grad_terms.py --public-epochs 60 --images 48
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

import ultralytics_dp  # noqa: F401  (embedded dataset names, before Ultralytics is imported)
from ultralytics import YOLO
from ultralytics.cfg import get_cfg
from ultralytics.data import build_dataloader, build_yolo_dataset
from ultralytics.data.utils import check_det_dataset

from ultralytics_dp.datasets import embedded
from ultralytics_dp.datasets.public_weights import pretrained
from ultralytics_dp.losses.per_image import _branches, _parse

TERMS = ("box", "cls", "l1")


def _group(name: str) -> str:
    index = int(name.split(".")[1])
    return "backbone 0-9" if index <= 9 else "neck 10-22" if index < 23 else "head 23"


def _norm(grads: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--public-epochs", type=int, default=60)
    parser.add_argument("--images", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(1)

    weights = pretrained("digits-public-det", epochs=args.public_epochs)
    model = YOLO(weights).model.float()
    model.args = get_cfg()
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    named = list(model.named_parameters())
    params = [p.requires_grad_(True) for _, p in named]
    info = check_det_dataset(str(embedded.build("digits-public-det")))
    dataset = build_yolo_dataset(get_cfg(overrides={"imgsz": 128}), info["train"], 1, info, mode="val", stride=32)
    branches = _branches(model)  # (output key, criterion, gain) as the private step weighs them

    norms: dict[str, list[float]] = {}
    shares: dict[str, list[float]] = {}
    for i, batch in enumerate(build_dataloader(dataset, 1, 0, shuffle=False)):
        if i == args.images:
            break
        batch["img"] = batch["img"].float() / 255
        preds = _parse(model(batch["img"]))
        parts = {}
        for branch, loss, gain in branches:
            terms = loss.get_assigned_targets_and_loss(preds[branch] if branch else preds, batch)[1] * gain
            for name, term in zip(TERMS, terms):
                grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
                parts[f"{branch} {name}"] = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        total = [sum(part[j] for part in parts.values()) for j in range(len(params))]
        rows = {"all": total, **parts}
        for group in ("backbone 0-9", "neck 10-22", "head 23"):
            rows[group] = [g for g, (n, _) in zip(total, named) if _group(n) == group]
        rows["1-d (bias, affine)"] = [g for g, p in zip(total, params) if p.ndim == 1]
        for key, grads in rows.items():
            norms.setdefault(key, []).append(_norm(grads))
            shares.setdefault(key, []).append((norms[key][-1] / norms["all"][-1]) ** 2)

    counts = {g: sum(p.numel() for n, p in named if _group(n) == g) for g in ("backbone 0-9", "neck 10-22", "head 23")}
    counts["1-d (bias, affine)"] = sum(p.numel() for p in params if p.ndim == 1)
    gains = " / ".join(f"{branch} {gain:.2f}" for branch, _, gain in branches)
    print(f"{weights.name}, {len(norms['all'])} public images, branch gains {gains} (Ultralytics' schedule at the "
          f"first epoch); smallest norm {min(norms['all']):.2f}")
    print("| part | parameters | median norm | mean share of the squared norm |\n|---|---|---|---|")
    for key, values in norms.items():
        print(f"| {key} | {counts.get(key, '')} | {statistics.median(values):.2f} | {statistics.mean(shares[key]):.3f} |")


if __name__ == "__main__":
    main()
