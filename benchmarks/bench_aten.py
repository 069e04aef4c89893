"""Host work per training batch, measurable without a GPU: ATen operator calls and host syncs.

A private step (``private_step.private_gradient`` + the optimizer step) against a plain one
(Ultralytics' own batch loss, backward, optimizer step), both one optimizer step on the same batch:
YOLO26n (frozen BatchNorm, as a fine-tune), 64 px, 16 images with 0-3 boxes each. Counted with
``torch.profiler`` on every thread (work moved to the ghost path's thread pool counts too):
``aten::*`` events, and the host syncs ``aten::item`` / ``aten::_local_scalar_dense`` /
``aten::nonzero``. Each is the median of ``--repeats`` profiled steps after one warm-up.

Usage: python benchmarks/bench_aten.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter

import torch

import ultralytics_dp  # noqa: F401  (import hooks before Ultralytics)
from ultralytics import YOLO
from ultralytics.cfg import get_cfg

from ultralytics_dp.integration.private_step import private_gradient
from ultralytics_dp.mechanism.grad_sample import trainable_params

SYNCS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero")
IMAGES, SIZE = 16, 64


def model_and_batch() -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = YOLO("yolo26n.yaml").model
    model.args = get_cfg()
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 4, (IMAGES,), generator=g).tolist()
    idx = [i for i, c in enumerate(counts) for _ in range(c)]
    boxes = torch.cat([torch.rand(len(idx), 2, generator=g) * 0.5 + 0.25, torch.rand(len(idx), 2, generator=g) * 0.3 + 0.1], 1)
    batch = {"img": torch.rand(IMAGES, 3, SIZE, SIZE, generator=g), "batch_idx": torch.tensor(idx, dtype=torch.float),
             "cls": torch.randint(0, 80, (len(idx), 1), generator=g).float(), "bboxes": boxes}
    return model, batch


def plain_step(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer) -> None:
    loss, _ = model.loss(batch)
    loss.sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def private_step(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer) -> None:
    grad = private_gradient(model, batch, method="ghost", max_grad_norm=1.0, noise_multiplier=1.0,
                            expected_batch_size=float(IMAGES), physical_batch=64)
    for name, p in trainable_params(model).items():
        p.grad = grad[name]
    optimizer.step()
    optimizer.zero_grad()


def count(step, model: torch.nn.Module, batch: dict) -> Counter:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    step(model, batch, optimizer)  # warm-up
    config = None
    experimental = getattr(torch._C._profiler, "_ExperimentalConfig", None)
    if experimental is not None:
        try:
            config = experimental(profile_all_threads=True)
        except TypeError:
            config = None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], experimental_config=config) as prof:
        step(model, batch, optimizer)
    names = Counter(e.name for e in prof.events())
    return Counter({"aten": sum(n for k, n in names.items() if k.startswith("aten::")),
                    **{k: names.get(k, 0) for k in SYNCS}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = {}
    for label, step in (("plain", plain_step), ("private", private_step)):
        runs = [count(step, *model_and_batch()) for _ in range(args.repeats)]
        rows[label] = {k: statistics.median(r[k] for r in runs) for k in ("aten", *SYNCS)}
    print(f"| step | aten calls | {' | '.join(SYNCS)} |")
    print("|---|---|" + "---|" * len(SYNCS))
    for label, row in rows.items():
        print(f"| {label} | {row['aten']:.0f} | " + " | ".join(f"{row[k]:.0f}" for k in SYNCS) + " |")
    print(f"private / plain aten calls: {rows['private']['aten'] / rows['plain']['aten']:.2f}x")


if __name__ == "__main__":
    main()
