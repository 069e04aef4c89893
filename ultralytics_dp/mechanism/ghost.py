"""Clipped gradient sums without per-sample gradients: mixed ghost clipping with book-keeping.

One batched forward (hooks keep each layer's input ``a``), one backward to the layer *outputs*
(hooks keep ``b = dL/d output``), then, per layer:

* per-sample squared gradient norms, either explicitly (form ``g_i = b_i^T unfold(a_i)``) or by
  the ghost identity ``||g_i||^2 = <a_i a_i^T, b_i b_i^T>`` over spatial positions, whichever costs
  less for that layer (mixed ghost clipping, Bu et al. 2022);
* the clipped sum ``sum_i c_i g_i`` as one weighted contraction of ``a`` and ``b``
  (book-keeping, Bu et al. 2023): no second backward, no per-sample gradient kept.

Privacy assumption relied on here: ``b_i`` is the gradient of image i's loss alone. That holds
because the summed per-image losses are differentiated and nothing mixes images in the forward
(BatchNorm in eval mode is checked; the losses are per image, see ``losses``). Supported layers:
Conv2d (any groups, with or without bias), ConvTranspose2d (without output padding), Linear, and
the affine parameters of eval-mode BatchNorm
and of GroupNorm (which normalises each image with its own statistics).
Any other trainable parameter makes ``supports`` false, and callers use the ``torch.func`` path.
This module must not import Ultralytics.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import checks
from .grad_sample import check_no_train_batchnorm, trainable_params
from .gaussian import clip_factors
from .grouping import Groups

SUPPORTED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that directly own a trainable parameter."""
    return {name: m for name, m in model.named_modules()
            if any(p.requires_grad for p in m.parameters(recurse=False))}


def supports(model: nn.Module) -> bool:
    """True if every trainable parameter belongs to exactly one layer of a type this path handles.

    A parameter shared by two layers (tied weights) is refused: its per-image gradient is the sum
    over both layers, which the per-layer norms here would not see."""
    return _supported(_layers(model))


def _supported(layers: dict[str, nn.Module]) -> bool:
    owners: dict[int, int] = {}
    for m in layers.values():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return all(count == 1 for count in owners.values()) and all(
        isinstance(m, SUPPORTED)
        and not (isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)))
        and not (isinstance(m, nn.ConvTranspose2d) and any(m.output_padding))
        for m in layers.values()
    )


def _conv_unfold(m: nn.Conv2d, a: Tensor) -> Tensor:
    """[B, groups, C_in/groups * kh * kw, T] patches of the conv input."""
    cols = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
    return cols.view(a.shape[0], m.groups, -1, cols.shape[-1])


def _conv_per_sample_weight_grad(m: nn.Conv2d | nn.ConvTranspose2d, a: Tensor, b: Tensor) -> Tensor:
    """Per-sample weight gradients ([B, *weight.shape]) from one convolution backward in which the
    batch becomes groups (no im2col of the input). A transposed convolution is the adjoint of the
    convolution with the same weight, so its weight gradient is that convolution's with the input
    and the output gradient swapped."""
    n = a.shape[0]
    x, y = (b, a) if isinstance(m, nn.ConvTranspose2d) else (a, b)
    size = (n * m.weight.shape[0], m.weight.shape[1], *m.kernel_size)
    g = torch.nn.grad.conv2d_weight(x.reshape(1, -1, *x.shape[2:]), size, y.reshape(1, -1, *y.shape[2:]),
                                    stride=m.stride, padding=m.padding, dilation=m.dilation, groups=n * m.groups)
    return g.view(n, *m.weight.shape)


# A term is (param name, per-sample gradient [B, ...], None) or (param name, left, right): ghost
# factors with grad_i = left_i @ right_i^T summed over positions, left [B, G, O, T], right [B, G, D, T].
Term = tuple[str, Tensor, "Tensor | None"]


def _ghost_is_cheaper(t: int, o: int, d: int) -> bool:
    """Ghost norms cost ~T^2 (O + D) per image; forming the gradient costs ~O D T."""
    return t * t * (o + d) < o * d * t


def _layer_terms(m: nn.Module, a: Tensor, b: Tensor) -> list[Term]:
    """The terms of one call of layer ``m`` with input ``a`` and output gradient ``b``, in the dtype
    of its parameters (under autocast the saved input is bf16/fp16 and its gradient may not be)."""
    dtype = next((p.dtype for p in m.parameters()), a.dtype)
    a, b = a.to(dtype), b.to(dtype)
    n = a.shape[0]
    if isinstance(m, nn.Conv2d):
        t, o = b.shape[2] * b.shape[3], m.out_channels // m.groups
        d = m.weight[0].numel()
        terms = []
        if m.weight.requires_grad and _ghost_is_cheaper(t, o, d):
            terms.append(("weight", b.reshape(n, m.groups, o, t), _conv_unfold(m, a)))
        elif m.weight.requires_grad:
            terms.append(("weight", _conv_per_sample_weight_grad(m, a, b), None))
        if m.bias is not None and m.bias.requires_grad:
            terms.append(("bias", b.sum((2, 3)), None))
        return terms
    if isinstance(m, nn.ConvTranspose2d):  # few in YOLO (the mask prototypes' upsampling): no ghost form
        terms = [("weight", _conv_per_sample_weight_grad(m, a, b), None)] if m.weight.requires_grad else []
        if m.bias is not None and m.bias.requires_grad:
            terms.append(("bias", b.sum((2, 3)), None))
        return terms
    if isinstance(m, nn.Linear):
        a3, b3 = a.reshape(n, -1, a.shape[-1]), b.reshape(n, -1, b.shape[-1])
        terms = []
        if m.weight.requires_grad and _ghost_is_cheaper(a3.shape[1], b3.shape[-1], a3.shape[-1]):
            terms.append(("weight", b3.transpose(1, 2).unsqueeze(1), a3.transpose(1, 2).unsqueeze(1)))
        elif m.weight.requires_grad:
            terms.append(("weight", torch.einsum("bto,btd->bod", b3, a3), None))
        if m.bias is not None and m.bias.requires_grad:
            terms.append(("bias", b3.sum(1), None))
        return terms
    # y = gamma * xhat + beta; xhat from the running statistics (eval-mode BatchNorm) or from the
    # image's own channel groups (GroupNorm)
    if isinstance(m, nn.GroupNorm):
        xhat = F.group_norm(a, m.num_groups, eps=m.eps)
    else:
        shape = (1, -1) + (1,) * (a.dim() - 2)
        xhat = (a - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps)
    terms = []
    if m.weight is not None and m.weight.requires_grad:
        terms.append(("weight", (b * xhat).reshape(n, a.shape[1], -1).sum(-1), None))
    if m.bias is not None and m.bias.requires_grad:
        terms.append(("bias", b.reshape(n, a.shape[1], -1).sum(-1), None))
    return terms


def _sq_norm(left: Tensor, right: Tensor | None) -> Tensor:
    """[B] squared norms of a term, in float64: directly from the gradient, or by the ghost identity
    ||sum_t l_t r_t^T||^2 = <L^T L, R^T R> without forming it.

    The ghost identity sums T^2 products that can nearly cancel (an image whose positions'
    gradients nearly cancel): in float32 the sum can come out near 0 or negative where the true
    norm is large, and the image would then be added unclipped. So the Gram matrices are formed in
    float64 from the (exact) float32 factors, a negative result is 0, and the result is raised by a
    bound on float64's rounding error, so it is never below the norm of the factors' exact
    gradient: (D + O + G T^2 + 4) machine epsilons (the Gram products' inner lengths, the G T^2
    terms summed, and the bound's own arithmetic) times the sum of the products' absolute values,
    which is at most sum over groups of (sum_t ||l_t|| ||r_t||)^2 (Cauchy-Schwarz)."""
    if right is None:
        return torch.linalg.vector_norm(left.flatten(1), dim=1, dtype=torch.float64).pow(2)
    left, right = left.double(), right.double()
    gram_a = right.transpose(2, 3) @ right  # [B, G, T, T]
    gram_b = left.transpose(2, 3) @ left
    square = (gram_a * gram_b).flatten(1).sum(1).clamp_min(0.0)
    g, o, t, d = left.shape[1], left.shape[2], left.shape[3], right.shape[2]
    magnitude = (left.norm(dim=2) * right.norm(dim=2)).sum(2).pow(2).sum(1)  # sum over groups of (sum_t ..)^2
    return square + (d + o + g * t * t + 4) * torch.finfo(torch.float64).eps * magnitude


def _weighted_sum(left: Tensor, right: Tensor | None, c: Tensor) -> Tensor:
    """sum_i c_i grad_i from a per-sample gradient (right None) or from ghost factors."""
    if right is None:
        return c @ left.reshape(left.shape[0], -1)  # a matrix-vector product, no weighted copy
    return torch.einsum("bgot,bgdt->god", left * c.view(-1, 1, 1, 1), right)


def _group(left: Tensor, right: Tensor | None, groups: Groups) -> tuple[Tensor, Tensor | None]:
    """A term of a batch's images as the term of its records (``grouping``), whose gradient is the
    mean of their images'. Ghost factors keep their form by joining a record's images' positions
    (sum over its images and positions of w l r^T, w = 1/size; a smaller record's missing images
    are zero positions, which add nothing), unless that makes the ghost norm dearer."""
    if groups.trivial:
        return left, right
    if right is not None:
        g, o, t, d = left.shape[1], left.shape[2], left.shape[3], right.shape[2]
        if not _ghost_is_cheaper(groups.largest * t, o, d):
            left, right = _as_gradient(left, right), None
        else:
            owner, slot, weight = groups.indices(left.device)

            def join(x: Tensor) -> Tensor:
                padded = x.new_zeros((groups.records, groups.largest, *x.shape[1:]))
                padded[owner, slot] = x
                return padded.permute(0, 2, 3, 1, 4).reshape(groups.records, g, x.shape[2], -1)

            return join(left * weight.to(left.dtype).view(-1, 1, 1, 1)), join(right)
    return groups.mean(left), None


def clipped_grad_sum_ghost(
    model: nn.Module,
    losses_fn: Callable[[nn.Module], Tensor],
    *,
    max_grad_norm: float,
    groups: Groups | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Same contract as ``mechanism.clipped_grad_sum`` (flat clipping over all trainable
    parameters, non-finite samples contribute zero), computed in one forward and one backward.

    ``losses_fn(model)`` runs the batched forward and returns the [B] per-image losses. With
    ``groups`` the B images are ``groups.records`` records of consecutive images (a person's
    images, or an image's augmented views): a record's gradient is the mean of its images'
    gradients, clipped once (``grouping``), and the per-record norms are returned.
    """
    checks.finite_positive("max_grad_norm", max_grad_norm)
    check_no_train_batchnorm(model)
    layers = _layers(model)
    if not _supported(layers):
        raise ValueError("model has trainable layers other than Conv2d, ConvTranspose2d, Linear, BatchNorm and "
                         "GroupNorm; use the torch.func path")
    records: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in layers}
    outputs: list[tuple[str, Tensor, Tensor]] = []

    def keep(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if output.requires_grad:
                outputs.append((name, inputs[0].detach(), output))
        return hook

    handles = [m.register_forward_hook(keep(name)) for name, m in layers.items()]
    try:
        losses = losses_fn(model)
    finally:
        for h in handles:
            h.remove()
    groups = Groups.uniform(losses.shape[0]) if groups is None else groups
    if losses.shape[0] != groups.images:
        raise ValueError(f"{losses.shape[0]} images for records of {groups.images} images")
    n = groups.records
    params = trainable_params(model)
    if n == 0:
        return {name: torch.zeros_like(p) for name, p in params.items()}, losses.new_zeros(0)
    grads = torch.autograd.grad(losses.sum(), [o for _, _, o in outputs], allow_unused=True)
    for (name, a, _), b in zip(outputs, grads):
        if b is not None:
            records[name].append((a, b.detach()))

    # the norms and the clipped sum in the parameters' precision even under the trainer's autocast:
    # in bf16 a clipped image could add about 1.002 C, more than the accountant's sensitivity
    with torch.autocast(losses.device.type, enabled=False):
        return _clip_and_sum(layers, records, params, groups, max_grad_norm, losses.device)


def _clip_and_sum(layers: dict[str, nn.Module], records: dict[str, list[tuple[Tensor, Tensor]]],
                  params: dict[str, Tensor], groups: Groups, max_grad_norm: float, device: torch.device
                  ) -> tuple[dict[str, Tensor], Tensor]:
    """Pass 1: per-record squared norms (each layer's per-sample gradient or ghost factors);
    pass 2 (book-keeping): the clipped sum from the same terms, with no second backward."""

    def layer_terms(item: tuple[str, list[tuple[Tensor, Tensor]]]) -> list[tuple[str, Tensor, Tensor | None, Tensor]]:
        name, calls = item
        per_call = [_layer_terms(layers[name], a, b) for a, b in calls]
        out = []
        for k in range(len(per_call[0]) if per_call else 0):
            if len(per_call) == 1:
                _, left, right = per_call[0][k]
            else:  # a layer called more than once: sum its calls' per-sample gradients first, flat
                # (a call in ghost form gives [B, G, O, D], one in gradient form [B, *shape])
                left, right = sum(_as_gradient(*pc[k][1:]).flatten(1) for pc in per_call), None
            left, right = _group(left, right, groups)
            out.append((f"{name}.{per_call[0][k][0]}", left, right, _sq_norm(left, right)))
        return out

    kept = [term for terms in _parallel_map(layer_terms, list(records.items()), device) for term in terms]
    # each term's square in float64 (``_sq_norm``), summed; one stack, not one kernel per term
    squares = [square for *_, square in kept]
    squared = torch.stack(squares).sum(0) if squares else torch.zeros(groups.records, dtype=torch.float64, device=device)
    # adding L non-negative float64 terms loses at most L eps of the total: raised by as much
    squared = squared * (1 + (len(squares) + 1) * torch.finfo(torch.float64).eps)
    norms = squared.sqrt()
    finite = torch.isfinite(norms)
    all_finite = bool(finite.all())  # the one host sync of the step
    factor = clip_factors(norms, max_grad_norm)

    def clipped_sum(term: tuple[str, Tensor, Tensor | None, Tensor]) -> tuple[str, Tensor]:  # pass 2
        pname, left, right, _ = term
        if not all_finite:  # NaN * 0 is NaN: zero the non-finite images' factors out first
            left = torch.where(_bcast(finite, left), left, 0.0)
            right = None if right is None else torch.where(_bcast(finite, right), right, 0.0)
        return pname, _weighted_sum(left, right, factor.to(left.dtype)).reshape(params[pname].shape)

    total = dict(_parallel_map(clipped_sum, kept, device))
    return {name: total[name] if name in total else torch.zeros_like(p) for name, p in params.items()}, norms.float()


def _parallel_map(fn: Callable, items: list, device: torch.device) -> list:
    """``[fn(x) for x in items]``; on CPU spread over the intra-op threads, one item per thread at a
    time. Per-layer work is many small kernels (a per-group convolution backward, small matmuls)
    that one op does not spread over the cores, while the layers are independent: on 2 cores this
    took a private YOLO26n step at 320 px from 1.13x to 1.02x of a plain one. Each worker runs
    single-threaded, so the results do not depend on the scheduling."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2 or len(items) < 2:
        return [fn(x) for x in items]
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(threads)


def _as_gradient(left: Tensor, right: Tensor | None) -> Tensor:
    """[B, ...] per-sample gradient of a term (formed from ghost factors if needed)."""
    return left if right is None else left @ right.transpose(2, 3)


def _bcast(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view(-1, *[1] * (like.dim() - 1))
