"""Per-sample gradients with ``torch.func`` (``functional_call`` + ``vmap`` + ``grad``).

Privacy assumption relied on here: the loss of sample i is computed from sample i alone. The
function under ``vmap`` sees one sample at a time, so anything that would mix samples inside the
forward (BatchNorm in training mode) is refused instead of silently computed.
This module must not import Ultralytics.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

Batch = dict[str, Tensor]
ModelCall = Callable[..., object]
LossFn = Callable[[ModelCall, Batch], Tensor]


def check_no_train_batchnorm(model: nn.Module) -> None:
    """Raise if any BatchNorm layer is in training mode.

    Train-mode BatchNorm normalises each image with statistics of the whole batch (mixing records
    before the per-sample gradient) and writes those statistics, un-noised, into its buffers.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise ValueError(
                f"BatchNorm module {name or type(module).__name__!r} is in training mode: it mixes "
                "samples and leaks batch statistics; call .eval() on every BatchNorm layer "
                "(their affine weights may still train)"
            )


def trainable_params(model: nn.Module) -> dict[str, Tensor]:
    """The parameters that get a (private) gradient: those with ``requires_grad=True``."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def batch_size(batch: Batch) -> int:
    """Leading dimension shared by every tensor in ``batch`` (raises if they disagree)."""
    if not isinstance(batch, dict) or not batch:
        raise ValueError(f"batch must be a non-empty dict of tensors, got {type(batch).__name__}")
    sizes = {}
    for key, value in batch.items():
        if not isinstance(value, Tensor) or value.dim() == 0:
            raise ValueError(f"batch[{key!r}] must be a tensor with a leading batch dimension")
        sizes[key] = value.shape[0]
    if len(set(sizes.values())) != 1:
        raise ValueError(f"every tensor in batch must share dim 0, got sizes {sizes}")
    return next(iter(sizes.values()))


def per_sample_grads(
    model: nn.Module, loss_fn: LossFn, batch: Batch, *, chunk_size: int | None = None
) -> dict[str, Tensor]:
    """Stacked per-sample gradients ``[B, *param.shape]`` of every trainable parameter.

    ``loss_fn(model_call, sample)`` gets a callable running the model functionally and ONE sample
    as a batch of one (each tensor keeps a leading dim of size 1). Buffers pass through unchanged;
    frozen parameters (``requires_grad=False``) get no gradient and cost no memory.
    ``chunk_size`` bounds how many samples ``vmap`` runs at once (memory only).
    """
    check_no_train_batchnorm(model)
    n = batch_size(batch)
    params = {k: v.detach() for k, v in trainable_params(model).items()}
    if not params:
        raise ValueError("model has no parameter with requires_grad=True: nothing to train")
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}
    buffers = dict(model.named_buffers())
    if n == 0:
        return {k: v.new_zeros((0, *v.shape)) for k, v in params.items()}

    whole = _ModelAndLoss(model, loss_fn)
    prefixed = lambda d: {f"model.{k}": v for k, v in d.items()}  # noqa: E731
    fixed = (prefixed(frozen), prefixed(buffers))

    def sample_loss(p: dict[str, Tensor], sample: Batch) -> Tensor:
        one = {k: v.unsqueeze(0) for k, v in sample.items()}
        return functional_call(whole, (prefixed(p), *fixed), (one,))

    return vmap(grad(sample_loss), in_dims=(None, 0), randomness="different", chunk_size=chunk_size)(params, batch)


class _ModelAndLoss(nn.Module):
    """The model and the loss as one module, so that ``functional_call`` substitutes the parameters
    for the whole loss and not only for the model's forward: a loss may call the model's own
    modules after the forward (YOLO26 pose's flow), and those parameters need their gradient too."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, sample: Batch) -> Tensor:
        return self.loss_fn(self.model, sample)
