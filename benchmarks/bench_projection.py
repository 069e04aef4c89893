"""Projected DP-SGD (Zhou et al. 2021, "Bypassing the ambient dimension"): is the noisy private
gradient better used projected onto the span of public gradients? One classification run on the
tuning split (``tune.py``), from the user-trained public model, the DP defaults otherwise.

Each step, after the private gradient is computed as always (clipped sum + one Gaussian draw),
``--public-images`` public training digits give their per-image gradients at the current weights;
their top ``--rank`` principal directions (of the unit-norm gradients, as clipping sees them) span a
subspace, and the optimizer steps on the private gradient's projection onto it. The projection uses
public images and the already-released weights only, so it is post-processing: the run's epsilon is
unchanged. With ``--diagnose`` each step also computes the clipped sum without noise (benchmark
data, never a private run's) and prints how much of it the subspace holds.

    python benchmarks/bench_projection.py --epsilon 1 --rank 32 --public-images 128 [--lr0 0.1]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench_utility import run
from tune import split
from ultralytics_dp.datasets.embedded import build
from ultralytics_dp.integration import private_step
from ultralytics_dp.integration.recipe import DEFAULTS
from ultralytics_dp.losses.per_image import per_image_loss_fn, sample_batch
from ultralytics_dp.mechanism.grad_sample import per_sample_grads


def public_batch(files: list[Path], n: int, rng: random.Random) -> dict[str, torch.Tensor]:
    """``n`` public training digits as a classification batch (RGB in [0, 1], as the trainer's)."""
    picked = rng.sample(files, n)
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in picked])
    return {"img": torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255,
            "cls": torch.tensor([int(f.parent.name) for f in picked])}


def public_basis(model: torch.nn.Module, batch: dict, names: list[str], rank: int) -> torch.Tensor:
    """[d, rank] orthonormal: the top principal directions of the public images' unit gradients,
    from the eigenvectors of their n x n Gram matrix (cheap for n << d)."""
    grads = per_sample_grads(model, per_image_loss_fn(model), sample_batch(model, batch), chunk_size=32)
    g = torch.cat([grads[n].flatten(1) for n in names], 1).double()
    g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
    eigenvalues, vectors = torch.linalg.eigh(g @ g.T)  # ascending
    eigenvalues, vectors = eigenvalues.flip(0)[:rank], vectors.flip(1)[:, :rank]
    return (g.T @ vectors) / eigenvalues.clamp_min(1e-12).sqrt()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--public-images", type=int, default=128)
    parser.add_argument("--lr0", type=float, default=None, help="default: the DP default's")
    parser.add_argument("--diagnose", action="store_true")
    args = parser.parse_args()
    files = sorted((Path(build("digits-public-cls")) / "train").rglob("*.png"))
    rng, private_gradient = random.Random(), private_step.private_gradient

    def projected(model: torch.nn.Module, batch: dict, **kwargs: object) -> dict[str, torch.Tensor]:
        grad = private_gradient(model, batch, **kwargs)
        names = list(grad)
        basis = public_basis(model, public_batch(files, args.public_images, rng), names, args.rank)
        project = lambda g: basis @ (basis.T @ torch.cat([g[n].flatten() for n in names]).double())  # noqa: E731
        flat = project(grad)
        if args.diagnose:
            clean = private_gradient(model, batch, **{**kwargs, "noise_multiplier": 0.0})
            whole = torch.cat([clean[n].flatten() for n in names]).double()
            print(f"subspace holds {float(project(clean).norm() / whole.norm()):.3f} of the noiseless clipped "
                  f"mean (norm {float(whole.norm()):.4f}); noisy {float(torch.cat([grad[n].flatten() for n in names]).norm()):.3f}, "
                  f"projected {float(flat.norm()):.4f}", flush=True)
        sizes = [grad[n].numel() for n in names]
        return {n: part.view_as(grad[n]).to(grad[n].dtype) for n, part in zip(names, flat.split(sizes))}

    private_step.private_gradient = projected  # PrivateStep looks it up in its module at every step
    extra = {} if args.lr0 is None else {"lr0": args.lr0}
    data = split("cls", Path(tempfile.gettempdir()) / "clstune-split")  # tune.py's split
    row = run("cls", "public -> private, projected", args.epsilon, DEFAULTS["epochs"][0], data=data,
              user_public=True, **extra)
    print(json.dumps({**row, "rank": args.rank, "public_images": args.public_images}))


if __name__ == "__main__":
    main()
