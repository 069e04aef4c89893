"""The private step on CUDA agrees with the CPU reference: one prepared check for a lent GPU.

1. Clipped sums. For each task's model, Ultralytics' assigner runs once on CPU in float64; with
   those per-image targets fixed, the clipped sum of per-image gradients is computed on CPU in
   float64 (``torch.func``, the reference) and on CUDA in float32 by both back-ends (ghost,
   ``torch.func``), at a bound that clips every image and at one that clips none. The targets are
   fixed because the assigner's top-1 choices break ties between near-equal anchors of an untrained
   model differently at another precision (seen on CPU alone: YOLO26-seg's one-to-one targets
   moved, 3% of the clipped sum), which is Ultralytics' arithmetic, not the private step's.
2. Autocast. The whole private step under bf16 and fp16 autocast stays finite, and with fixed
   targets its clipped sum stays near float32.
3. Noise. What ``private_gradient`` adds on CUDA (OS-seeded generator, and ``secure``) has the
   standard deviation sigma*C/B and mean 0.

Prints one JSON line per check and exits 1 if any fails.

    python benchmarks/cuda_check.py [--device cpu]   # run by benchmarks/gpu.sh on CUDA

TF32 is off, so the float32 tolerance (1e-4) measures the private step, not reduced-precision
convolutions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import det_batch, seg_batch, trainer_model  # noqa: E402

from ultralytics_dp.mechanism.ghost import clipped_grad_sum_ghost  # noqa: E402
from ultralytics_dp.losses.per_image import losses_from_preds, per_image_loss_fn, sample_batch  # noqa: E402
from ultralytics_dp.mechanism.gaussian import clipped_grad_sum  # noqa: E402
from ultralytics_dp.integration.norms import to_group_norm  # noqa: E402
from ultralytics_dp.integration.private_step import private_gradient  # noqa: E402

torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
TOL = 1e-4
COUNTS = [1, 2, 0, 1, 3, 1, 2, 2]
CASES = [("yolo26n.yaml", False), ("yolov8n.yaml", False), ("yolo26n-cls.yaml", False),
         ("yolo26n-seg.yaml", False), ("yolo26n-obb.yaml", False), ("yolo26n.yaml", True)]


def batch_for(cfg: str, size: int = 64) -> dict:
    if "-cls" in cfg:
        g = torch.Generator().manual_seed(0)
        return {"img": torch.rand(8, 3, 32, 32, generator=g), "cls": torch.tensor([1, 1, 2, 2, 3, 3, 4, 4])}
    if "-seg" in cfg:
        return seg_batch(COUNTS, size)
    return det_batch(COUNTS, size, rotated="-obb" in cfg)


def on(model: torch.nn.Module, device: str, dtype: torch.dtype) -> torch.nn.Module:
    model.to(device, dtype).criterion = None  # Ultralytics builds its loss on the model's device
    return model


def to(tensors: dict, device: str, dtype: torch.dtype) -> dict:
    return {k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in tensors.items()}


def flat(grads: dict) -> torch.Tensor:
    return torch.cat([grads[k].detach().double().cpu().flatten() for k in sorted(grads)])


def rel_err(got: dict, ref: torch.Tensor) -> float:
    return ((flat(got) - ref).norm() / ref.norm()).item()


def report(ok: bool, **fields: object) -> int:
    print(json.dumps({**fields, "ok": ok}), flush=True)
    return 0 if ok else 1


def clipped_sums(device: str) -> int:
    failures = 0
    for cfg, group_norm in CASES:
        model = trainer_model(cfg)
        if group_norm:
            to_group_norm(model)
        batch = batch_for(cfg)
        batch["img"] = batch["img"].double()  # labels stay float32, as Ultralytics collates them
        samples = sample_batch(on(model, "cpu", torch.float64), batch)  # image + fixed per-image targets
        for clip in (1e-3, 1e6):  # every image clipped / none clipped
            ref = flat(clipped_grad_sum(on(model, "cpu", torch.float64), per_image_loss_fn(model), samples,
                                        max_grad_norm=clip)[0])
            fixed = to(samples, device, torch.float32)
            on(model, device, torch.float32)
            got = {"ghost": clipped_grad_sum_ghost(model, lambda m: losses_from_preds(m, m(fixed["img"]), fixed),
                                                   max_grad_norm=clip)[0],
                   "vmap": clipped_grad_sum(model, per_image_loss_fn(model), fixed, max_grad_norm=clip)[0]}
            for method, grads in got.items():
                err = rel_err(grads, ref)
                failures += report(err < TOL, check="clipped_sum_vs_cpu64", cfg=cfg, group_norm=group_norm,
                                   clip=clip, method=method, rel_err=err)
    return failures


def autocast(device: str) -> int:
    """Under autocast, on 160 px batches whose DFL targets reach the last bin: the whole private step
    (assignment included) is finite, and with float32 targets fixed the clipped sum is within 5% of
    float32 (assigning in half precision may pick other anchors, as above)."""
    failures = 0
    for cfg in ("yolov8n.yaml", "yolo26n.yaml", "yolo26n-seg.yaml"):
        model = on(trainer_model(cfg), device, torch.float32)
        batch = seg_batch([2, 3], 160) if "-seg" in cfg else det_batch([2, 3], 160)
        batch = {k: v.to(device) for k, v in batch.items()}
        fixed = sample_batch(model, batch)
        ghost_sum = lambda: clipped_grad_sum_ghost(  # noqa: E731
            model, lambda m: losses_from_preds(m, m(fixed["img"]), fixed), max_grad_norm=1e6)[0]
        ref = flat(ghost_sum())
        for dtype in (torch.bfloat16, torch.float16):
            fields = dict(check="autocast", cfg=cfg, dtype=str(dtype))
            try:
                with torch.autocast(device, dtype=dtype):
                    step = flat(private_gradient(model, batch, method="ghost", max_grad_norm=1.0, noise_multiplier=0.0,
                                                 expected_batch_size=1.0))
                    err = rel_err(ghost_sum(), ref)
                finite = bool(torch.isfinite(step).all())
                failures += report(finite and err < 0.05, finite=finite, fixed_targets_rel_err=err, **fields)
            except RuntimeError as e:
                failures += report(False, error=str(e)[:200], **fields)
    return failures


def noise(device: str) -> int:
    """The same batch with and without noise: the difference is N(0, (sigma*C/B)^2) per coordinate."""
    failures = 0
    model = on(trainer_model("yolo26n-cls.yaml"), device, torch.float32)
    for p in model.parameters():
        p.requires_grad_(p.ndim == 1)  # biases and norm affine only: a quick step, ~1e4 coordinates
    batch = {k: v.to(device) for k, v in batch_for("yolo26n-cls.yaml").items()}
    sigma, clip, expected = 2.0, 0.5, 4.0
    for secure in (False, True):
        kw = dict(method="vmap", max_grad_norm=clip, expected_batch_size=expected, physical_batch=8, secure=secure)
        diff = flat(private_gradient(model, batch, noise_multiplier=sigma, **kw)) - flat(
            private_gradient(model, batch, noise_multiplier=0.0, **kw))
        std, want, n = diff.std().item(), sigma * clip / expected, diff.numel()
        # the sample sd of n normals is off by ~1/sqrt(2n) relative, the mean by ~sd/sqrt(n): allow 6 of each
        ok = abs(std / want - 1) < 6 / (2 * n) ** 0.5 and abs(diff.mean().item()) < 6 * want / n ** 0.5
        failures += report(ok, check="noise_std", secure=secure, n=n, std=std, expected=want)
    return failures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    device = parser.parse_args().device
    name = torch.cuda.get_device_name(0) if device == "cuda" else device
    print(json.dumps({"device": name, "torch": torch.__version__}), flush=True)
    failures = clipped_sums(device) + autocast(device) + noise(device)
    print(json.dumps({"failures": failures}), flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
