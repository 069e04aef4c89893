"""The Gaussian mechanism of DP-SGD: clip each sample's gradient, sum, add N(0, (sigma*C)^2).

Privacy assumptions relied on here:

* Unit: one sample of ``batch`` is one record (one image with all its labels), and its gradient
  depends on that sample alone (see ``grad_sample``).
* Sensitivity: every sample contributes either ``clip_C(g_i)`` or exactly zero (non-finite
  gradients), so adding or removing one record moves the sum by at most C in L2.
* Noise is drawn once per optimizer step from a generator that is NOT torch's global RNG and is
  seeded from OS entropy: Ultralytics seeds the global RNG with a public ``seed`` and noise
  reproducible from a public seed protects nothing.
* The average divides by the *expected* batch size q*N; the realised size is itself private.
This module must not import Ultralytics.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from .. import checks
from .grad_sample import Batch, LossFn, batch_size, per_sample_grads, trainable_params
from .grouping import Groups
from .randomness import noise_generator, secure_normal

CLIP_EPS = 1e-6


def clip_factors(norms: Tensor, max_grad_norm: float) -> Tensor:
    """``min(1, C / (||g_i|| + 1e-6))`` per sample, and exactly 0 where the norm is not finite:
    every sample then contributes a vector of norm <= C (or nothing) to the sum."""
    return torch.where(torch.isfinite(norms), (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0), 0.0)


def clipped_grad_sum(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    *,
    max_grad_norm: float,
    groups: Groups | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """``sum_i g_i * min(1, C / (||g_i|| + 1e-6))`` per parameter, and the per-sample norms ``[B]``.

    With ``groups`` a sample is a record of consecutive images (``grouping``): g_i is the mean of
    its images' gradients, and the norms are per record.

    Clipping is flat: ``||g_i||`` is the L2 norm over all trainable parameters together. A sample
    whose gradient is not finite contributes zero (its norm in the returned tensor is NaN or inf,
    so callers can count it) and does not affect the others. All B per-sample gradients are alive
    at once: callers bound B (``private_step`` splits a Poisson batch into physical chunks).
    """
    checks.finite_positive("max_grad_norm", max_grad_norm)
    params = trainable_params(model)
    total = {k: torch.zeros_like(v, memory_format=torch.preserve_format) for k, v in params.items()}
    if batch_size(batch) == 0:
        return total, torch.zeros(0, device=next(iter(params.values())).device)
    if groups is not None and groups.images != batch_size(batch):
        raise ValueError(f"{batch_size(batch)} images for records of {groups.images} images")
    grads = per_sample_grads(model, loss_fn, batch)
    if groups is not None and not groups.trivial:
        grads = {k: groups.mean(g) for k, g in grads.items()}
    norm = sum(g.flatten(1).double().pow(2).sum(1) for g in grads.values()).sqrt()
    finite = torch.isfinite(norm)
    factor = clip_factors(norm, max_grad_norm)
    for k, g in grads.items():
        # where(), not multiplication: NaN * 0 would still be NaN
        g = torch.where(finite.view(-1, *[1] * (g.dim() - 1)), g, 0.0)
        total[k] += torch.einsum("b,b...->...", factor.to(g.dtype), g)
    return total, norm.float()


def views(flat: Tensor, layout: dict[str, tuple[int, torch.Size]]) -> dict[str, Tensor]:
    """Views of the 1-D ``flat``: ``layout[k]`` = (offset, shape) of tensor k's contiguous block."""
    return {k: flat.as_strided(shape, _contiguous_strides(shape), flat.storage_offset() + offset)
            for k, (offset, shape) in layout.items()}


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _tiling(tensors: dict[str, Tensor]) -> Tensor | None:
    """The buffer, when the tensors are contiguous views that tile one 1-D contiguous buffer
    consecutively in dict order (``views``' results in parameter order, as the ghost path returns
    its sums); else None."""
    values = list(tensors.values())
    base = values[0]._base if values else None
    if base is None or base.dim() != 1 or not base.is_contiguous():
        return None
    end = base.storage_offset()
    for v in values:
        if v._base is not base or not v.is_contiguous() or v.storage_offset() != end:
            return None
        end += v.numel()
    return base if end == base.storage_offset() + base.numel() else None


def flatten(tensors: dict[str, Tensor]) -> Tensor:
    """All coordinates in one new 1-D tensor, in dict order (a copy of the buffer the tensors tile
    when they do, else their concatenation; the same either way). They must share one device and
    dtype (a model's gradients do), since a silent cast or copy would hide a mistake."""
    kinds = {(v.device, v.dtype) for v in tensors.values()}
    if len(kinds) != 1:
        raise ValueError(f"gradients must share one device and dtype, got {sorted(map(str, kinds))}")
    base = _tiling(tensors)
    return base.clone() if base is not None else torch.cat([v.reshape(-1) for v in tensors.values()])


def unflatten(flat: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """``flat`` as views shaped like ``like``'s tensors (the inverse of ``flatten``)."""
    offsets = itertools.accumulate((t.numel() for t in like.values()), initial=0)
    return views(flat, {k: (offset, t.shape) for (k, t), offset in zip(like.items(), offsets)})


def add_(total: dict[str, Tensor], more: dict[str, Tensor]) -> dict[str, Tensor]:
    """``total[k] += more[k]`` for every k, in one call when both tile buffers (``views``)."""
    mine, theirs = _tiling(total), _tiling(more)
    if mine is not None and theirs is not None:
        mine.add_(theirs)
    else:
        for k, v in total.items():
            v.add_(more[k])
    return total


def noisy_flat(
    grad_sum: dict[str, Tensor],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    generator: torch.Generator | None = None,
    secure: bool = False,
) -> Tensor:
    """``flatten(grad_sum)`` plus independent N(0, (sigma*C)^2) on every coordinate, drawn at once
    (one kernel rather than one per parameter tensor; the coordinates are i.i.d. either way).

    ``generator=None`` uses the engine's OS-seeded generator (never torch's global RNG).
    ``secure=True`` draws from the OS CSPRNG instead (``secure_normal``) and refuses a generator,
    since a seedable generator is exactly what secure mode rules out.
    """
    checks.finite_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    checks.finite_positive("max_grad_norm", max_grad_norm)
    if secure and generator is not None:
        raise ValueError("secure mode draws noise from OS entropy; it refuses a (reproducible) generator")
    flat = flatten(grad_sum)
    if secure:
        noise = secure_normal(flat.shape, device=flat.device, dtype=flat.dtype)
    else:
        gen = generator if generator is not None else noise_generator(flat.device)
        noise = torch.randn(flat.shape, generator=gen, device=flat.device, dtype=flat.dtype)
    return flat.add_(noise, alpha=noise_multiplier * max_grad_norm)


def private_mean(
    grad_sum: dict[str, Tensor],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    generator: torch.Generator | None = None,
    secure: bool = False,
) -> dict[str, Tensor]:
    """``(sum_i clip(g_i) + noise) / (q*N)``: the gradient the optimizer steps on.

    Divides by the *expected* batch size ``q*N``, never the realised one (which is private).
    """
    checks.finite_positive("expected_batch_size", expected_batch_size)
    noisy = noisy_flat(grad_sum, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, generator=generator,
                       secure=secure)
    return unflatten(noisy.div_(expected_batch_size), grad_sum)
