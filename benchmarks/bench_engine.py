"""Cost of per-sample clipping: one ``clipped_grad_sum`` vs one plain forward+backward of the
summed loss, for a small CNN and for YOLO26n (BatchNorm frozen, imgsz 128, B=16).

Each (model, method) runs in its own process so that its peak RSS (VmHWM) is its own.
Prints time (median of 5 after a warm-up) and peak RSS.

    .venv/bin/python benchmarks/bench_engine.py [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
from torch import nn

B = 16


def small_cnn():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.SiLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
    batch = {"x": torch.randn(B, 3, 32, 32), "y": torch.randint(0, 10, (B,))}

    def loss_fn(model_call, sample):
        return nn.functional.cross_entropy(model_call(sample["x"]), sample["y"])

    def plain():
        nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="sum").backward()

    return model, loss_fn, batch, plain


def yolo26n():
    import ultralytics_dp  # noqa: F401
    from ultralytics import YOLO
    from ultralytics.cfg import get_cfg

    from ultralytics_dp.integration.guard import freeze_batchnorm
    from ultralytics_dp.losses.per_image import per_image_loss_fn, per_sample_losses, sample_batch

    model = YOLO("yolo26n.yaml").model
    model.args = get_cfg()
    model.train()
    freeze_batchnorm(model)
    g = torch.Generator().manual_seed(0)
    n_boxes = 3 * B
    raw = {
        "img": torch.rand(B, 3, 128, 128, generator=g),
        "batch_idx": torch.arange(B).repeat_interleave(3).float(),
        "cls": torch.randint(0, 80, (n_boxes, 1), generator=g).float(),
        "bboxes": torch.cat([torch.rand(n_boxes, 2, generator=g) * 0.5 + 0.25,
                             torch.rand(n_boxes, 2, generator=g) * 0.2 + 0.1], 1),
    }

    def plain():
        per_sample_losses(model, raw).sum().backward()

    return model, per_image_loss_fn(model), raw, plain, sample_batch


def run_case(case: str, method: str, device: str) -> dict:
    from bench_train import peak_rss, timed  # the same timing loop and memory reading as bench_train

    from ultralytics_dp.mechanism.gaussian import clipped_grad_sum

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    built = small_cnn() if case == "small_cnn" else yolo26n()
    model, loss_fn, batch, plain = built[:4]
    prepare = built[4] if len(built) > 4 else (lambda m, b: b)
    model.to(device)
    batch = {k: v.to(device) for k, v in batch.items()}

    def private():
        clipped_grad_sum(model, loss_fn, prepare(model, batch), max_grad_norm=1.0)

    fn = plain if method == "plain" else private

    def step() -> None:
        fn()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    median, cuda_peak = timed(step, 5, device)
    peak = cuda_peak if device == "cuda" else peak_rss()
    return {"time": median, "peak": peak}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--case")
    parser.add_argument("--method")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.method, args.device)))
        return
    print(f"torch {torch.__version__}, device {args.device}, B={B}, {torch.get_num_threads()} threads")
    print(f"{'model':<12}{'plain s':>10}{'private s':>11}{'ratio':>8}{'plain MiB':>11}{'private MiB':>13}")
    for case in ("small_cnn", "yolo26n"):
        res = {}
        for method in ("plain", "private"):
            out = subprocess.run([sys.executable, __file__, "--case", case, "--method", method, "--device", args.device],
                                 capture_output=True, text=True, check=True).stdout
            res[method] = json.loads(out.strip().splitlines()[-1])
        p, q = res["plain"], res["private"]
        print(f"{case:<12}{p['time']:>10.3f}{q['time']:>11.3f}{q['time'] / p['time']:>8.2f}"
              f"{p['peak'] / 2**20:>11.0f}{q['peak'] / 2**20:>13.0f}")


if __name__ == "__main__":
    main()
