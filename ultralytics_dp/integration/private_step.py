"""One private step, in one place: from a Poisson batch to the ``.grad`` the optimizer steps on,
counted by the accountant (``PrivateStep``, read it like Opacus' ``DPOptimizer.pre_step``):

1. the budget: a step past the run's last allowed step fails closed;
2. per-image clipping: physical chunks (``mechanism.sampling.split_physical``) -> per-image losses
   (``losses``) -> per-image clipped gradients, summed (a back-end: ghost clipping or torch.func);
3. one Gaussian draw for the whole Poisson batch, divided by q*N (``mechanism.gaussian``, or
   ``mechanism.distributed`` across processes);
4. the result into each trainable parameter's ``.grad``;
5. the accountant counts the step (one noise draw, one step).

The trainer gets here through ``guard.TrainerGuard`` (once per optimizer step, only from its own
training batch) and the batch from ``mechanism.sampling.PoissonLoader``.

Privacy assumptions relied on here:

* Each image's loss depends on that image and its labels only (``losses``), and BatchNorm is in
  eval mode (checked here before every step), so each image's clipped gradient has norm <= C and
  the sum over the batch has sensitivity C for adding or removing one image.
* Physical chunks only bound memory: their clipped sums are added before the single noise draw.
  So do ranks in a multi-process run: each holds its shard's share of one Poisson batch, and the
  job draws noise once (``distributed``).
* Augmentation multiplicity (``views`` = K > 1): the sampled record is the image; its K views are
  random functions of that image alone, its gradient is the mean of theirs and is clipped once,
  so it still adds one vector of norm <= C, and chunks never split a record.
* Both back-ends compute the same clipped sum (tested to 1e-5): "ghost" (mixed ghost clipping and
  book-keeping, no per-sample gradients; Conv2d, ConvTranspose2d, Linear, BatchNorm and GroupNorm
  layers) and "vmap"
  (``torch.func`` per-sample gradients, any layer).
* An out-of-memory error becomes a ``MemoryError`` that names ``physical_batch``: Ultralytics'
  own recovery (halve ``batch``, rebuild a shuffled loader) would change q and break sampling.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..accounting.accountant import PrivacyAccountant
from ..config import DPConfig

from ..mechanism import distributed, ghost
from ..mechanism.grad_sample import check_no_train_batchnorm, trainable_params
from ..losses.per_image import batch_losses, per_image_loss_fn, sample_batch
from ..mechanism.gaussian import clipped_grad_sum, private_mean
from ..losses.batch import select
from ..mechanism.sampling import split_physical

# (model, chunk, C, views) -> (sum of clipped per-record gradients by parameter name, per-record norms)
ClippedSum = Callable[[nn.Module, dict, float, int], tuple[dict[str, Tensor], Tensor]]


def resolve_grad_method(model: nn.Module, method: str) -> str:
    """'auto' -> 'ghost' when every trainable layer supports it, else 'vmap'."""
    if method == "auto":
        return "ghost" if ghost.supports(model) else "vmap"
    if method == "ghost" and not ghost.supports(model):
        raise ValueError("grad_method='ghost' needs a model whose trainable layers are Conv2d, ConvTranspose2d, "
                         "Linear and BatchNorm/GroupNorm only; use grad_method='vmap'")
    return method


def _ghost(model: nn.Module, chunk: dict, max_grad_norm: float, views: int) -> tuple[dict[str, Tensor], Tensor]:
    return ghost.clipped_grad_sum_ghost(model, lambda m: batch_losses(m, chunk), max_grad_norm=max_grad_norm,
                                        views=views)


def _vmap(model: nn.Module, chunk: dict, max_grad_norm: float, views: int) -> tuple[dict[str, Tensor], Tensor]:
    # torch.func's per-sample forward fails under autocast (eval BatchNorm gets mixed dtypes): this
    # path runs in the parameters' precision even when the trainer uses amp=True
    with torch.autocast(chunk["img"].device.type, enabled=False):
        samples = sample_batch(model, chunk)
        if views > 1:  # one vmapped sample per record: its views on a second dimension
            samples = {k: v.view(v.shape[0] // views, views, *v.shape[1:]) for k, v in samples.items()}
        return clipped_grad_sum(model, per_image_loss_fn(model, views), samples, max_grad_norm=max_grad_norm)


CLIPPED_SUM: dict[str, ClippedSum] = {"ghost": _ghost, "vmap": _vmap}


def private_gradient(
    model: nn.Module, batch: dict, *, method: str, max_grad_norm: float, noise_multiplier: float,
    expected_batch_size: float, physical_batch: int | None = None, secure: bool = False, views: int = 1,
    across_ranks: bool = False, generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The DP gradient of one logical (Poisson) batch: per-image clipped gradients summed over
    physical chunks (an image with a non-finite gradient adds nothing), one Gaussian draw, divided
    by the expected batch size. ``batch`` is a preprocessed Ultralytics training batch; ``method``
    is "ghost" or "vmap" (see ``resolve_grad_method``). With ``views`` > 1 (augmentation
    multiplicity) the batch holds each sampled record's ``views`` augmented images consecutively;
    a record's gradient is the mean over its views, clipped once, and chunks hold whole records.
    ``across_ranks``: ``batch`` is this rank's share of the Poisson batch of a multi-process run; the
    ranks' clipped sums are added and noised once (``distributed.private_mean``). ``generator``:
    the noise generator (tests; default: the engine's OS-seeded one)."""
    check_no_train_batchnorm(model)
    clipped_sum = CLIPPED_SUM[method]
    total: dict[str, Tensor] | None = None
    n = batch["img"].shape[0]
    if n % views:
        raise ValueError(f"a batch of {n} images is not whole records of {views} views")
    per_chunk = max(1, (physical_batch or max(n, 1)) // views)  # physical_batch counts images
    overlap = getattr(getattr(model, "args", None), "overlap_mask", True)
    try:
        for records in split_physical(list(range(n // views)), per_chunk):
            idx = [r * views + k for r in records for k in range(views)]
            sums, _ = clipped_sum(model, select(batch, idx, overlap), max_grad_norm, views)
            total = sums if total is None else {k: v.add_(sums[k]) for k, v in total.items()}
    except RuntimeError as err:
        if "out of memory" in str(err).lower():
            raise MemoryError(f"DP: per-sample gradients need less memory; lower physical_batch ({err})") from None
        raise
    if total is None:  # an empty Poisson batch: the step is noise alone
        total = {k: torch.zeros_like(p) for k, p in trainable_params(model).items()}
    mean = distributed.private_mean if across_ranks else private_mean
    return mean(total, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                expected_batch_size=expected_batch_size, generator=generator, secure=secure)


class PrivateStep:
    """Steps ``model`` privately: ``step(batch)`` puts the DP gradient of one Poisson batch into
    ``.grad`` and counts it in ``accountant``.

    ``limit()`` is the run's last allowed step (the plan's, lowered when the ledger grants fewer);
    ``sigma``, ``q`` and the expected batch q*N are the plan's, fixed for the run. ``across_ranks``:
    the batch is this process's share of a multi-process run's Poisson batch."""

    def __init__(self, model: Callable[[], nn.Module], config: DPConfig, *, noise_multiplier: float,
                 sample_rate: float, expected_batch_size: float, accountant: PrivacyAccountant,
                 limit: Callable[[], int], method: str, across_ranks: bool = False) -> None:
        self.model, self.config, self.accountant, self.limit = model, config, accountant, limit
        self.noise_multiplier, self.sample_rate, self.expected_batch_size = (
            noise_multiplier, sample_rate, expected_batch_size)
        self.method, self.across_ranks = method, across_ranks

    def __call__(self, batch: dict[str, Any]) -> bool:
        """One DP-SGD step; True if it was the last the budget allows."""
        if self.accountant.steps >= self.limit():  # the loader never yields past the budget: fail closed
            raise RuntimeError(f"DP: step {self.accountant.steps + 1} would exceed the budget of {self.limit()}")
        model, config = self.model(), self.config
        grad = private_gradient(
            model, batch, method=self.method, max_grad_norm=config.max_grad_norm,
            noise_multiplier=self.noise_multiplier, expected_batch_size=self.expected_batch_size,
            physical_batch=config.physical_batch, secure=config.secure_mode, views=config.augmult,
            across_ranks=self.across_ranks,
        )
        for name, p in trainable_params(model).items():
            p.grad = grad[name].to(p.dtype)
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return self.accountant.steps >= self.limit()
