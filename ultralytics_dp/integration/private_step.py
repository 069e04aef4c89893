"""One private step, in one place: from a Poisson batch to the ``.grad`` the optimizer steps on,
counted by the accountant (``PrivateStep``, read it like Opacus' ``DPOptimizer.pre_step``):

1. the budget: a step past the run's last allowed step fails closed;
2. per-record clipping: physical chunks of whole records (``mechanism.grouping``) -> per-image losses
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
* A record may be several consecutive images of the batch (``mechanism.grouping``): a person's
  images when the person is the privacy unit, an image's K views with augmentation multiplicity
  (random functions of that image alone), or both. Its gradient is the mean of its images' and
  is clipped once, so it adds one vector of norm <= C, and chunks never split a record. Which
  images form a record comes with the batch from the loader (``RECORD_SIZES``); a batch without
  it is refused.
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

from ..mechanism import distributed, gaussian, ghost
from ..mechanism.grad_sample import check_no_train_batchnorm, trainable_params
from ..losses.per_image import batch_losses, per_image_loss_fn, sample_batch
from ..mechanism.gaussian import clipped_grad_sum, private_mean
from ..losses.batch import select
from ..mechanism.grouping import Groups
from ..mechanism.sampling import RECORD_SIZES

# (model, chunk, C, its records) -> (sum of clipped per-record gradients by parameter name, per-record norms)
ClippedSum = Callable[[nn.Module, dict, float, Groups], tuple[dict[str, Tensor], Tensor]]


def resolve_grad_method(model: nn.Module, method: str) -> str:
    """'auto' -> 'ghost' when every trainable layer supports it, else 'vmap'."""
    if method == "auto":
        return "ghost" if ghost.supports(model) else "vmap"
    if method == "ghost" and not ghost.supports(model):
        raise ValueError("grad_method='ghost' needs a model whose trainable layers are Conv2d, ConvTranspose2d, "
                         "Linear and BatchNorm/GroupNorm only; use grad_method='vmap'")
    return method


def _ghost(model: nn.Module, chunk: dict, max_grad_norm: float, groups: Groups) -> tuple[dict[str, Tensor], Tensor]:
    return ghost.clipped_grad_sum_ghost(model, lambda m: batch_losses(m, chunk), max_grad_norm=max_grad_norm,
                                        groups=groups)


def _vmap(model: nn.Module, chunk: dict, max_grad_norm: float, groups: Groups) -> tuple[dict[str, Tensor], Tensor]:
    # torch.func's per-sample forward fails under autocast (eval BatchNorm gets mixed dtypes): this
    # path runs in the parameters' precision even when the trainer uses amp=True
    with torch.autocast(chunk["img"].device.type, enabled=False):
        return clipped_grad_sum(model, per_image_loss_fn(model), sample_batch(model, chunk),
                                max_grad_norm=max_grad_norm, groups=groups)


CLIPPED_SUM: dict[str, ClippedSum] = {"ghost": _ghost, "vmap": _vmap}


def private_gradient(
    model: nn.Module, batch: dict, *, method: str, max_grad_norm: float, noise_multiplier: float,
    expected_batch_size: float, physical_batch: int | None = None, secure: bool = False,
    groups: Groups | None = None, across_ranks: bool = False, generator: torch.Generator | None = None,
    extra_records: Callable[[dict[str, Tensor]], None] | None = None,
) -> dict[str, Tensor]:
    """The DP gradient of one logical (Poisson) batch: per-image clipped gradients summed over
    physical chunks (an image with a non-finite gradient adds nothing), one Gaussian draw, divided
    by the expected batch size. ``batch`` is a preprocessed Ultralytics training batch; ``method``
    is "ghost" or "vmap" (see ``resolve_grad_method``). ``groups``: which consecutive images form
    each record (default: one image each); a record's gradient is the mean over its images,
    clipped once, and chunks hold whole records.
    ``across_ranks``: ``batch`` is this rank's share of the Poisson batch of a multi-process run; the
    ranks' clipped sums are added and noised once (``distributed.private_mean``). ``generator``:
    the noise generator (tests; default: the engine's OS-seeded one). ``extra_records``: adds
    records that are not images (an audit's gradient canaries, each clipped to C) to the clipped
    sum, in place, before the noise draw; a single-process run only."""
    check_no_train_batchnorm(model)
    clipped_sum = CLIPPED_SUM[method]
    total: dict[str, Tensor] | None = None
    n = batch["img"].shape[0]
    groups = Groups.uniform(n) if groups is None else groups
    if groups.images != n:
        raise ValueError(f"a batch of {n} images is not whole records of {list(groups.sizes)} images")
    overlap = getattr(getattr(model, "args", None), "overlap_mask", True)
    try:
        for idx, chunk_groups in groups.chunks(physical_batch or max(n, 1)):
            sums, _ = clipped_sum(model, select(batch, idx, overlap), max_grad_norm, chunk_groups)
            total = sums if total is None else gaussian.add_(total, sums)
    except RuntimeError as err:
        if "out of memory" in str(err).lower():
            fix = ("lower physical_batch" if groups.largest <= (physical_batch or groups.largest) else
                   f"lower max_images_per_person or augmult (a record of {groups.largest} images is one chunk)")
            raise MemoryError(f"DP: per-sample gradients need less memory; {fix} ({err})") from None
        raise
    if total is None:  # an empty Poisson batch: the step is noise alone
        total = {k: torch.zeros_like(p) for k, p in trainable_params(model).items()}
    if extra_records is not None:
        if across_ranks:
            raise ValueError("extra records (audit canaries) need a single-process run")
        extra_records(total)
    mean = distributed.private_mean if across_ranks else private_mean
    return mean(total, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                expected_batch_size=expected_batch_size, generator=generator, secure=secure)


def record_groups(batch: dict[str, Any]) -> Groups:
    """Which images of a loader's batch form each record (``sampling.PoissonLoader`` says so with
    every batch); fail closed on a batch that does not say, or says something else."""
    sizes = batch.get(RECORD_SIZES)
    if sizes is None:
        raise RuntimeError("DP: a training batch that did not come from the Poisson loader; refusing the step")
    groups = Groups(tuple(sizes))
    if groups.images != batch["img"].shape[0]:
        raise RuntimeError(f"DP: the batch has {batch['img'].shape[0]} images, its records {groups.images}; "
                           "refusing the step")
    return groups


class PrivateStep:
    """Steps ``model`` privately: ``step(batch)`` puts the DP gradient of one Poisson batch into
    ``.grad`` and counts it in ``accountant``.

    ``limit()`` is the run's last allowed step (the plan's, lowered when the ledger grants fewer);
    ``sigma``, ``q`` and the expected batch q*N are the plan's, fixed for the run. ``across_ranks``:
    the batch is this process's share of a multi-process run's Poisson batch. ``canaries``: an
    audit's gradient canaries (``auditing.canaries.GradientCanaries``), sampled at q, clipped to C and
    added to every step's sum; they read each step's private gradient back."""

    def __init__(self, model: Callable[[], nn.Module], config: DPConfig, *, noise_multiplier: float,
                 sample_rate: float, expected_batch_size: float, accountant: PrivacyAccountant,
                 limit: Callable[[], int], method: str, across_ranks: bool = False, canaries: Any = None) -> None:
        self.model, self.config, self.accountant, self.limit = model, config, accountant, limit
        self.noise_multiplier, self.sample_rate, self.expected_batch_size = (
            noise_multiplier, sample_rate, expected_batch_size)
        self.method, self.across_ranks, self.canaries = method, across_ranks, canaries

    def _add_canaries(self, total: dict[str, Tensor]) -> None:
        self.canaries.add_to(total, sample_rate=self.sample_rate, max_grad_norm=self.config.max_grad_norm)

    def __call__(self, batch: dict[str, Any]) -> bool:
        """One DP-SGD step; True if it was the last the budget allows."""
        if self.accountant.steps >= self.limit():  # the loader never yields past the budget: fail closed
            raise RuntimeError(f"DP: step {self.accountant.steps + 1} would exceed the budget of {self.limit()}")
        model, config = self.model(), self.config
        grad = private_gradient(
            model, batch, method=self.method, max_grad_norm=config.max_grad_norm,
            noise_multiplier=self.noise_multiplier, expected_batch_size=self.expected_batch_size,
            physical_batch=config.physical_batch, secure=config.secure_mode, groups=record_groups(batch),
            across_ranks=self.across_ranks, extra_records=self._add_canaries if self.canaries is not None else None,
        )
        if self.canaries is not None:
            self.canaries.observe(grad, sample_rate=self.sample_rate, divisor=self.expected_batch_size,
                                  noise_std=self.noise_multiplier * config.max_grad_norm)
        for name, p in trainable_params(model).items():
            p.grad = grad[name] if grad[name].dtype == p.dtype else grad[name].to(p.dtype)
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return self.accountant.steps >= self.limit()
