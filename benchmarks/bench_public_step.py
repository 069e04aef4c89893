"""Public images inside the private step, two ways, for one classification run on the tuning split
(``tune.py``) from the user-trained public model, the DP defaults otherwise. In both the private
gradient is computed as always (clipped sum + one Gaussian draw) and then combined with gradients
of public training digits at the current weights: a function of public images and of weights
already released, so post-processing, and the run's epsilon is unchanged.

* ``--mode projection`` (projected DP-SGD, Zhou et al. 2021): ``--public-images`` per-image public
  gradients; their top ``--rank`` principal directions (of the unit-norm gradients, as clipping
  sees them) span a subspace, and the optimizer steps on the private gradient's projection onto it.
  With ``--diagnose`` each step also computes the clipped sum without noise (benchmark data, never
  a private run's) and prints how much of it the subspace holds.
* ``--mode mixed``: ``--ratio`` x (expected batch) public images join the step as records without
  noise: (clipped private sum + noise + clipped public sum) / (expected batch + public images).

    python benchmarks/bench_public_step.py --mode projection --epsilon 1 --rank 32 --public-images 128
    python benchmarks/bench_public_step.py --mode mixed --epsilon 1 --ratio 1 [--lr0 0.067]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from bench_utility import run
from tune import split
from ultralytics_dp.datasets.embedded import build
from ultralytics_dp.integration import private_step
from ultralytics_dp.integration.recipe import DEFAULTS
from ultralytics_dp.losses.per_image import per_image_loss_fn, sample_batch
from ultralytics_dp.mechanism.gaussian import flatten, unflatten
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


def projected(private_gradient: Callable, files: list[Path], args: argparse.Namespace) -> Callable:
    rng = random.Random()

    def step(model: torch.nn.Module, batch: dict, **kwargs: Any) -> dict[str, torch.Tensor]:
        grad = private_gradient(model, batch, **kwargs)
        basis = public_basis(model, public_batch(files, args.public_images, rng), list(grad), args.rank)
        project = lambda flat: basis @ (basis.T @ flat)  # noqa: E731
        noisy = flatten(grad).double()
        flat = project(noisy)
        if args.diagnose:
            clean = flatten(private_gradient(model, batch, **{**kwargs, "noise_multiplier": 0.0})).double()
            print(f"subspace holds {float(project(clean).norm() / clean.norm()):.3f} of the noiseless clipped mean "
                  f"(norm {float(clean.norm()):.4f}); noisy {float(noisy.norm()):.3f}, projected {float(flat.norm()):.4f}",
                  flush=True)
        return unflatten(flat.to(next(iter(grad.values())).dtype), grad)

    return step


def mixed(private_gradient: Callable, files: list[Path], args: argparse.Namespace) -> Callable:
    rng = random.Random()

    def step(model: torch.nn.Module, batch: dict, **kwargs: Any) -> dict[str, torch.Tensor]:
        grad, expected = private_gradient(model, batch, **kwargs), kwargs["expected_batch_size"]
        public = public_batch(files, round(args.ratio * expected), rng)
        # the public images' clipped sum: the same path without noise, one image per record
        public_sum = private_gradient(model, public, **{**kwargs, "noise_multiplier": 0.0, "expected_batch_size": 1.0,
                                                        "groups": None, "extra_records": None})
        return {k: (g * expected + public_sum[k]) / (expected + len(public["cls"])) for k, g in grad.items()}

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("projection", "mixed"), required=True)
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--rank", type=int, default=32, help="projection: the subspace's dimension")
    parser.add_argument("--public-images", type=int, default=128, help="projection: images per basis")
    parser.add_argument("--diagnose", action="store_true", help="projection: print what the subspace holds")
    parser.add_argument("--ratio", type=float, default=1.0, help="mixed: public images per expected private one")
    parser.add_argument("--lr0", type=float, default=None, help="default: the DP default's")
    args = parser.parse_args()
    files = sorted((Path(build("digits-public-cls")) / "train").rglob("*.png"))
    # PrivateStep looks private_gradient up in its module at every step
    private_step.private_gradient = {"projection": projected, "mixed": mixed}[args.mode](
        private_step.private_gradient, files, args)
    extra = {} if args.lr0 is None else {"lr0": args.lr0}
    data = split("cls", Path(tempfile.gettempdir()) / "clstune-split")  # tune.py's split
    row = run("cls", f"public -> private, public {args.mode}", args.epsilon, DEFAULTS["epochs"][0], data=data,
              user_public=True, **extra)
    print(json.dumps({**row, **({"rank": args.rank, "public_images": args.public_images} if args.mode == "projection"
                                else {"ratio": args.ratio})}))


if __name__ == "__main__":
    main()
