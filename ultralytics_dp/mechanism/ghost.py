"""Clipped gradient sums without per-sample gradients: mixed ghost clipping with book-keeping.

One batched forward (hooks keep each layer's input ``a``), one backward to the layer *outputs*
(hooks keep ``b = dL/d output``), then, per layer:

* per-sample gradients either formed (``g_i = b_i unfold(a_i)^T``, one batched matrix product)
  and written into one [records, P] matrix shared by all layers, or kept as ghost factors whose
  squared norms come from the identity ``||g_i||^2 = <a_i^T a_i, b_i^T b_i>`` over spatial
  positions, whichever costs less for that layer (mixed ghost clipping, Bu et al. 2022);
* the clipped sum ``sum_i c_i g_i``: one matrix-vector product per block of the matrix, and one
  weighted contraction of ``a`` and ``b`` per ghost layer (book-keeping, Bu et al. 2023), into
  one flat buffer: no second backward. Ghost layers whose factors have equal shapes are stacked
  and share one Gram product and one contraction.

Few, large operator calls rather than several per layer and image: on a GPU the step is bound by
the host launching kernels (``benchmarks/RESULTS.md``).

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

import functools
import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import checks
from .grad_sample import check_no_train_batchnorm, trainable_params
from .gaussian import clip_factors, unflatten
from .grouping import Groups

# positions from which a CPU k x k convolution's per-sample gradient comes from the grouped backward
_GROUPED_FROM = 256

# columns summed in the gradients' own precision before float64 (``_rows_sq_norm``)
_RUN = 64

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
        # without running statistics an eval-mode BatchNorm normalises with the batch's: it mixes images
        and not (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None)
        for m in layers.values()
    )


def _conv_unfold(m: nn.Conv2d, a: Tensor) -> Tensor:
    """[B, groups, C_in/groups * kh * kw, T] patches of the conv input, in ``F.unfold``'s order: a
    view of the input for a 1x1 convolution with stride 1 and no padding (most of YOLO's), else a
    strided view of the zero-padded input and one copy (``F.unfold`` on CPU loops over images)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = m.kernel_size, m.stride, m.padding, m.dilation
    n = a.shape[0]
    if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
        return a.reshape(n, m.groups, -1, a.shape[2] * a.shape[3])
    x = a
    if ph or pw:
        x = a.new_zeros((n, a.shape[1], a.shape[2] + 2 * ph, a.shape[3] + 2 * pw))
        x[:, :, ph:ph + a.shape[2], pw:pw + a.shape[3]] = a
    c, h, w = x.shape[1:]
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    sn, sc, sy, sx = x.stride()
    patches = x.as_strided((n, c, kh, kw, ho, wo), (sn, sc, dh * sy, dw * sx, sh * sy, sw * sx))
    return patches.reshape(n, m.groups, -1, ho * wo)


def _grouped_weight_grad(m: nn.Conv2d | nn.ConvTranspose2d, a: Tensor, b: Tensor) -> Tensor:
    """Per-sample weight gradients ([B, *weight.shape]) from one convolution backward in which the
    batch becomes groups. A transposed convolution is the adjoint of the convolution with the same
    weight, so its weight gradient is that convolution's with the input and the output gradient
    swapped."""
    n = a.shape[0]
    x, y = (b, a) if isinstance(m, nn.ConvTranspose2d) else (a, b)
    size = (n * m.weight.shape[0], m.weight.shape[1], *m.kernel_size)
    g = torch.nn.grad.conv2d_weight(x.reshape(1, -1, *x.shape[2:]), size, y.reshape(1, -1, *y.shape[2:]),
                                    stride=m.stride, padding=m.padding, dilation=m.dilation, groups=n * m.groups)
    return g.view(n, *m.weight.shape)


def _patches_are_dearer(m: nn.Conv2d, b: Tensor) -> bool:
    """On CPU, a k x k convolution's per-sample gradient over many positions costs less from the
    grouped convolution backward (oneDNN) than from copied patches and a batched product (measured
    on 2 cores, benchmarks/RESULTS.md); elsewhere, and over few positions, the batched product is
    one kernel where the grouped backward is one per image."""
    return b.device.type == "cpu" and m.kernel_size != (1, 1) and b.shape[2] * b.shape[3] >= _GROUPED_FROM


def _ghost_is_cheaper(t: int, o: int, d: int) -> bool:
    """Ghost norms cost ~T^2 (O + D) per image; forming the gradient costs ~O D T."""
    return t * t * (o + d) < o * d * t


def _weight_in_ghost_form(m: nn.Module, a: Tensor, b: Tensor, largest: int) -> bool:
    """Whether a call's weight term is kept as ghost factors: a Conv2d or Linear weight whose ghost
    norm costs less than forming its gradient, over the positions of a whole record (a record's
    images' positions are joined, ``_join``)."""
    if isinstance(m, nn.Conv2d):
        t, o, d = b.shape[2] * b.shape[3], m.out_channels // m.groups, m.weight.shape[1:].numel()
    elif isinstance(m, nn.Linear):
        t, o, d = a.shape[1:-1].numel(), m.out_features, m.in_features
    else:
        return False
    return _ghost_is_cheaper(largest * t, o, d)


def _layer_terms(m: nn.Module, a: Tensor, b: Tensor, ghost_weight: bool, into: dict[str, Tensor]
                 ) -> tuple[list[tuple[str, Tensor, Tensor]], list[str]]:
    """The per-sample terms of one call of layer ``m`` with input ``a`` and output gradient ``b``,
    in the dtype of its parameters (under autocast the saved input is bf16/fp16 and its gradient
    may not be): each gradient-form term written into ``into[short name]`` ([B, numel], a view of
    the matrix or a buffer), the weight's term kept in ghost form if ``ghost_weight``
    (``_weight_in_ghost_form``). Returns the ghost terms as (short name, left [B, G, O, T], right
    [B, G, D, T]) with grad_i = sum_t left_it right_it^T, and the short names written."""
    dtype = next((p.dtype for p in m.parameters()), a.dtype)
    a = a if a.dtype == dtype else a.to(dtype)
    b = b if b.dtype == dtype else b.to(dtype)
    n = a.shape[0]
    ghost: list[tuple[str, Tensor, Tensor]] = []
    trained = {short for short, p in m.named_parameters(recurse=False) if p.requires_grad}
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        if isinstance(m, nn.Linear):  # positions are all but the first and last dimension
            left, right = b.reshape(n, -1, b.shape[-1]).mT.unsqueeze(1), a.reshape(n, -1, a.shape[-1]).mT.unsqueeze(1)
        elif isinstance(m, nn.ConvTranspose2d) or not ghost_weight and _patches_are_dearer(m, b):
            left, right = None, None  # from the grouped backward (transposed: YOLO's mask upsampling)
        else:
            left, right = b.reshape(n, m.groups, -1, b.shape[2] * b.shape[3]), _conv_unfold(m, a)
        if "weight" in trained and left is None:
            into["weight"].copy_(_grouped_weight_grad(m, a, b).view(n, -1))
        elif "weight" in trained and ghost_weight:
            ghost.append(("weight", left, right))
        elif "weight" in trained:
            into["weight"].copy_(_as_gradient(left, right).view(n, -1))
        if "bias" in trained:  # the output gradient summed over positions
            per_position = b.reshape(n, -1, b.shape[-1]).mT if isinstance(m, nn.Linear) else b.flatten(2)
            torch.sum(per_position, -1, out=into["bias"])
        return ghost, [short for short in ("weight", "bias") if short in trained and not (short == "weight" and ghost)]
    # y = gamma * xhat + beta per channel, xhat = (x - mean) / sqrt(var + eps) from the running
    # statistics (eval-mode BatchNorm) or from the image's own channel groups (GroupNorm)
    x, y = a.reshape(n, a.shape[1], -1), b.reshape(n, b.shape[1], -1)
    if "bias" in trained:
        torch.sum(y, -1, out=into["bias"])
    if "weight" in trained and isinstance(m, nn.GroupNorm):
        torch.sum(y * F.group_norm(a, m.num_groups, eps=m.eps).view_as(x), -1, out=into["weight"])
    elif "weight" in trained:  # sum_p y (x - mean) = sum_p y x - mean sum_p y: one pass over the activations
        bias = into["bias"] if "bias" in trained else y.sum(-1)
        torch.sum(y * x, -1, out=into["weight"]).addcmul_(bias, m.running_mean, value=-1.0)
        into["weight"].mul_(torch.rsqrt(m.running_var + m.eps))
    return ghost, [short for short in ("weight", "bias") if short in trained]


def _rows_sq_norm(x: Tensor) -> Tensor:
    """[rows] squared L2 norms of a 2-D tensor's rows, in float64, never below the exact value
    (short of squares below the dtype's smallest normal number, far under ``gaussian.CLIP_EPS``).

    The squares are formed and summed in ``x``'s own precision over runs of at most 64 columns,
    and the runs' sums added in float64 (a float64 copy of a large gradient matrix cost 25x more
    on CPU). Each run's sum is at most 64 roundings from exact, in any order of summation, so it is
    within gamma = 64 u / (1 - 64 u) of it (u the unit roundoff: 6e-8 in float32); the total is
    divided by 1 - gamma, which raises a float32 norm by at most 2e-6 relative, and further by
    the float64 roundings of adding the runs (one per run, plus the division)."""
    rows, cols = x.shape
    whole = cols - cols % _RUN
    squares = x * x
    runs = squares.narrow(1, 0, whole).view(rows, -1, _RUN).sum(-1).sum(-1, dtype=torch.float64)
    total = runs + squares.narrow(1, whole, cols - whole).sum(-1, dtype=torch.float64) if whole < cols else runs
    u = torch.finfo(x.dtype).eps / 2
    return total / (1 - _RUN * u / (1 - _RUN * u) - (cols // _RUN + 3) * torch.finfo(torch.float64).eps)


def _sq_norm(left: Tensor, right: Tensor) -> Tensor:
    """[B] squared norms of a term in ghost form, in float64, by the ghost identity
    ||sum_t l_t r_t^T||^2 = <L^T L, R^T R> without forming the gradient.

    The ghost identity sums T^2 products that can nearly cancel (an image whose positions'
    gradients nearly cancel): in float32 the sum can come out near 0 or negative where the true
    norm is large, and the image would then be added unclipped. So the Gram matrices are formed in
    float64 from the (exact) float32 factors, a negative result is 0, and the result is raised by a
    bound on float64's rounding error, so it is never below the norm of the factors' exact
    gradient: (D + O + G T^2 + 4) machine epsilons (the Gram products' inner lengths, the G T^2
    terms summed, and the bound's own arithmetic) times the sum of the products' absolute values,
    which is at most sum over groups of (sum_t ||l_t|| ||r_t||)^2 (Cauchy-Schwarz); ||l_t||^2 and
    ||r_t||^2 are the Gram matrices' diagonals."""
    n, g, o, t = left.shape
    d = right.shape[2]
    left, right = left.reshape(n * g, o, t).double(), right.reshape(n * g, d, t).double()
    gram_a = torch.bmm(right.mT, right)  # [B G, T, T]
    gram_b = torch.bmm(left.mT, left)
    square = (gram_a * gram_b).view(n, -1).sum(1).clamp_min(0.0)
    lengths = (gram_a.diagonal(dim1=1, dim2=2) * gram_b.diagonal(dim1=1, dim2=2)).sqrt_()  # ||l_t|| ||r_t||
    magnitude = lengths.sum(1).square_().view(n, g).sum(1)
    return square.add_(magnitude, alpha=(d + o + g * t * t + 4) * torch.finfo(torch.float64).eps)


def _ghost_weighted_sum(left: Tensor, right: Tensor, c: Tensor, out: Tensor | None = None) -> Tensor:
    """[K G, O, D] sums ``sum_i c_i grad_i`` of K stacked terms in ghost form (left
    [K, B, G, O, T], right [K, B, G, D, T]), into ``out`` if given: one batched product over the
    images' positions joined."""
    k, n, g, o, t = left.shape
    weighted = (left * c.view(1, -1, 1, 1, 1)).permute(0, 2, 3, 1, 4).reshape(k * g, o, n * t)
    return torch.bmm(weighted, right.permute(0, 2, 1, 4, 3).reshape(k * g, n * t, right.shape[3]), out=out)


def _join(left: Tensor, right: Tensor, groups: Groups) -> tuple[Tensor, Tensor]:
    """Ghost factors of a batch's images as those of its records (``grouping``), whose gradient is
    the mean of their images': a record's images' positions joined (sum over its images and
    positions of w l r^T, w = 1/size; a smaller record's missing images are zero positions, which
    add nothing)."""
    if groups.trivial:
        return left, right
    g = left.shape[1]
    owner, slot, weight = groups.indices(left.device)

    def join(x: Tensor) -> Tensor:
        padded = x.new_zeros((groups.records, groups.largest, *x.shape[1:]))
        padded[owner, slot] = x
        return padded.permute(0, 2, 3, 1, 4).reshape(groups.records, g, x.shape[2], -1)

    return join(left * weight.to(left.dtype).view(-1, 1, 1, 1)), join(right)


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
        raise ValueError("model has trainable layers other than Conv2d, ConvTranspose2d, Linear, BatchNorm with "
                         "running statistics and GroupNorm, or tied weights; use the torch.func path (grad_method='vmap')")
    records: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in layers}
    outputs: list[tuple[str, Tensor, Tensor, int]] = []

    def keep(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if output.requires_grad:
                outputs.append((name, inputs[0].detach(), output, output._version))
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
    for name, a, output, version in outputs:  # fail closed on what would give wrong per-image terms
        if output._version != version:  # e.g. ReLU(inplace=True): the gradient would be the activation's
            raise ValueError(f"layer {name!r}: its output is changed in place after it is computed; "
                             "use grad_method='vmap'")
        if a.shape[0] != groups.images or output.shape[0] != groups.images:
            raise ValueError(f"layer {name!r} runs on a batch of {a.shape[0]}, not on the {groups.images} images "
                             "(a term shared by all images is not a per-image term); use grad_method='vmap'")
    grads = torch.autograd.grad(losses.sum(), [o for _, _, o, _ in outputs], allow_unused=True)
    for (name, a, _, _), b in zip(outputs, grads):
        if b is not None:
            records[name].append((a, b.detach()))

    # the norms and the clipped sum in the parameters' precision even under the trainer's autocast:
    # in bf16 a clipped image could add about 1.002 C, more than the accountant's sensitivity
    with torch.autocast(losses.device.type, enabled=False):
        return _clip_and_sum(layers, records, params, groups, max_grad_norm, losses.device)


def _clip_and_sum(layers: dict[str, nn.Module], records: dict[str, list[tuple[Tensor, Tensor]]],
                  params: dict[str, Tensor], groups: Groups, max_grad_norm: float, device: torch.device
                  ) -> tuple[dict[str, Tensor], Tensor]:
    """Pass 1: per-record squared norms; pass 2 (book-keeping): the clipped sum from the same
    terms, with no second backward. Both passes run layer by layer (``_parallel_map``).

    A layer's terms in gradient form (most layers at small image sizes, all BatchNorm affine
    terms) are written side by side into one [records, P] matrix, so that a few norms and
    matrix-vector products over its column blocks serve all of them; terms in ghost form stay
    separate. The sum is one flat buffer in parameter order (zero where a parameter has no
    gradient) and each parameter's sum is a view of it (``gaussian.unflatten``), so the noise is
    added to it in one call."""
    ghost_weight = {name: len(calls) == 1 and _weight_in_ghost_form(layers[name], *calls[0], groups.largest)
                    for name, calls in records.items() if calls}
    called = {_full(name, short) for name in ghost_weight
              for short, p in layers[name].named_parameters(recurse=False) if p.requires_grad}
    in_ghost = {_full(name, "weight") for name, ghost in ghost_weight.items() if ghost} & called
    in_matrix = [k for k in params if k in called - in_ghost]
    offsets = dict(zip(params, itertools.accumulate((p.numel() for p in params.values()), initial=0)))
    width = sum(params[k].numel() for k in in_matrix)
    dtype = next(iter(params.values())).dtype
    matrix = torch.empty((groups.records, width), dtype=dtype, device=device)
    column_of = dict(zip(in_matrix, matrix.split([params[k].numel() for k in in_matrix], 1)))  # one call for all

    def layer_terms(item: tuple[str, list[tuple[Tensor, Tensor]]]) -> tuple[list[tuple], list[str]]:
        """The layer's ghost terms as (name, left, right), and the names of its terms written into
        the matrix: directly for a layer called once on single-image records, else per call into
        buffers whose sum (a layer called more than once) or records' mean goes into the matrix."""
        name, calls = item
        m = layers[name]
        columns = {short: column_of[_full(name, short)] for short, _ in m.named_parameters(recurse=False)
                   if _full(name, short) in column_of}
        if len(calls) == 1 and groups.trivial:
            ghost, wrote = _layer_terms(m, *calls[0], ghost_weight[name], columns)
        else:
            wrote, total = [], {short: 0 for short in columns}
            for a, b in calls:
                into = {short: column.new_empty((groups.images, column.shape[1])) for short, column in columns.items()}
                ghost, wrote = _layer_terms(m, a, b, ghost_weight[name], into)
                total = {short: total[short] + into[short] for short in wrote}
            for short in wrote:
                columns[short].copy_(total[short] if groups.trivial else groups.mean(total[short]))
        return [(_full(name, short), *_join(left, right, groups)) for short, left, right in ghost], [
            _full(name, short) for short in wrote]

    ghost_terms, written = [], set()
    for layer_ghost_terms, columns in _parallel_map(layer_terms, [(k, v) for k, v in records.items() if v], device):
        ghost_terms += layer_ghost_terms
        written.update(columns)
    ghost = {term[0] for term in ghost_terms}
    if written != set(in_matrix) or ghost != in_ghost:  # fail closed: the matrix is uninitialised
        raise RuntimeError(f"ghost clipping has no per-sample term for {sorted((set(in_matrix) - written) | (in_ghost - ghost))}; "
                           "use grad_method='vmap'")
    # ghost terms of equal shapes stacked: one Gram product and one weighted sum for all of them (a
    # term of a shape of its own is a view, not a copy)
    stacks: dict[tuple, list[tuple]] = {}
    for term in ghost_terms:
        stacks.setdefault((term[1].shape, term[2].shape), []).append(term)
    terms: list[tuple] = [([pname for pname, _, _ in same], *(
        same[0][i].unsqueeze(0) if len(same) == 1 else torch.stack([term[i] for term in same]) for i in (1, 2)))
        for same in stacks.values()]
    # the matrix in a few column blocks, one per worker at a time
    blocks = [(None, first, count) for first, count in _spans(width, 2 * torch.get_num_threads())]
    squares = _parallel_map(lambda stack: _sq_norm(stack[1].flatten(0, 1), stack[2].flatten(0, 1)).view(
        len(stack[0]), -1), terms, device) + _parallel_map(
        lambda block: _rows_sq_norm(matrix.narrow(1, block[1], block[2])).view(1, -1), blocks, device)
    terms += blocks
    # each square in float64, summed; one cat, not one kernel per term
    squared = torch.cat(squares).sum(0) if squares else torch.zeros(groups.records, dtype=torch.float64, device=device)
    # adding L non-negative float64 terms loses at most L eps of the total: raised by as much
    squared = squared * (1 + (len(ghost_terms) + len(blocks) + 1) * torch.finfo(torch.float64).eps)
    norms = squared.sqrt()
    # a record whose norm is not finite has factor 0, but NaN * 0 is NaN: its values are zeroed (in
    # place in the matrix, this function's own). On CPU a host sync costs nothing, so that pass runs
    # only when a norm is not finite; on an accelerator the check would stall the host that
    # launches the step's kernels, so the pass always runs.
    sanitise = not _host_checks_finiteness(device) or not bool(torch.isfinite(norms).all())
    factor = clip_factors(norms, max_grad_norm).to(dtype)
    flat = torch.zeros(sum(p.numel() for p in params.values()), dtype=dtype, device=device)
    matrix_sum = torch.empty(width, dtype=dtype, device=device)

    def clipped_sum(term: tuple) -> None:  # pass 2: sum_i c_i g_i into the term's place
        if term[0] is None:  # a block of the matrix's columns
            _, first, count = term
            part = matrix.narrow(1, first, count)
            if sanitise:
                part.nan_to_num_(0.0, 0.0, 0.0)
            torch.mv(part.t(), factor, out=matrix_sum.narrow(0, first, count))
            return
        pnames, left, right = term
        if sanitise:
            left, right = torch.nan_to_num(left, 0.0, 0.0, 0.0), torch.nan_to_num(right, 0.0, 0.0, 0.0)
        if len(pnames) == 1:  # straight into its place
            place = flat.narrow(0, offsets[pnames[0]], params[pnames[0]].numel())
            _ghost_weighted_sum(left, right, factor, out=place.view(-1, left.shape[3], right.shape[3]))
            return
        summed = _ghost_weighted_sum(left, right, factor).view(-1)
        flat.index_copy_(0, _positions(tuple((offsets[k], params[k].numel()) for k in pnames), str(device)), summed)

    _parallel_map(clipped_sum, terms, device)
    if width:  # the matrix's columns to their parameters' places
        flat.index_copy_(0, _positions(tuple((offsets[k], params[k].numel()) for k in in_matrix), str(device)), matrix_sum)
    return unflatten(flat, params), norms.float()


def _host_checks_finiteness(device: torch.device) -> bool:
    """Whether the clipped sum asks the host if every norm is finite (one sync) before zeroing
    non-finite values: on CPU, where a sync costs nothing."""
    return device.type == "cpu"


@functools.lru_cache(maxsize=512)
def _positions(spans: tuple[tuple[int, int], ...], device: str) -> Tensor:
    """The positions covered by (offset, count) spans, in order: where the matrix's columns go."""
    return torch.cat([torch.arange(offset, offset + count) for offset, count in spans]).to(device)


def _spans(total: int, parts: int) -> list[tuple[int, int]]:
    """(first, count) of at most ``parts`` near-equal consecutive pieces of range(total)."""
    size = -(-total // max(1, parts)) if total else 0
    return [(first, min(size, total - first)) for first in range(0, total, size)] if size else []


def _full(layer: str, short: str) -> str:
    """A parameter's name in ``model.named_parameters()`` from its layer's name."""
    return f"{layer}.{short}" if layer else short


def _parallel_map(fn: Callable, items: list, device: torch.device) -> list:
    """``[fn(x) for x in items]``; on CPU spread over the intra-op threads, one item per thread at a
    time. Per-layer work is small kernels (batched matrix products, reductions) that one op does
    not spread over the cores, while the layers are independent. Each worker runs single-threaded,
    so the results do not depend on the scheduling. (Ultralytics' trainer sets torch to
    cpu_count - 1 threads: on 2 cores one, and this is a plain loop, unless a trainer callback
    raises it, as ``make demo``'s does.)"""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2 or len(items) < 2:
        return [fn(x) for x in items]
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(threads)


def _as_gradient(left: Tensor, right: Tensor) -> Tensor:
    """[B, G, O, D] per-sample gradients formed from ghost factors: one batched matrix product."""
    n, g, o, t = left.shape
    return torch.bmm(left.reshape(n * g, o, t), right.reshape(n * g, -1, t).mT).view(n, g, o, -1)
