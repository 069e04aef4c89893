"""GroupNorm in place of BatchNorm for private training from scratch.

Why: a private run keeps BatchNorm in eval mode (train mode normalises each image with statistics
of the whole batch, mixing records, and writes those statistics into the weights without noise).
From a random init its running statistics stay at mean 0 / variance 1, activations are not
normalised at all and the model learns nothing (top-1 at chance on digits-cls even without noise).
GroupNorm normalises each image with its own statistics, so it mixes nothing and needs no
statistics of the training set; from scratch it learns under DP (``benchmarks/UTILITY.md``).
Estimating BatchNorm statistics on public images instead was measured too, and learned less.

How: in every Ultralytics ``Conv``/``DWConv`` (where all of YOLO's BatchNorm layers sit) the
BatchNorm ``bn`` becomes a GroupNorm that reuses its affine parameters (the optimizer's references
stay valid) and runs first inside ``act``; the layer's ``forward`` becomes Ultralytics' own
``forward_fuse`` (``act(conv(x))``). A layer without ``bn`` is one Ultralytics' ``fuse()`` leaves
alone, so a checkpoint loads, validates, predicts and exports with plain Ultralytics. The trainer
rebuilds models from their yaml (BatchNorm), so ``build_with`` wraps the trainer's ``get_model``
to convert before any weights are loaded (from scratch, resume, fine-tuning a GroupNorm model).

Privacy assumptions relied on here: none beyond the per-image loss; GroupNorm computes its
statistics over the channels and pixels of one image, never across images.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import torch
from torch import nn
from ultralytics.nn.modules import Conv, DWConv

# groups per layer (gcd with its channel count: YOLO's 16-1280 channels give 8 groups). Fixed a
# priori, not tuned: every tuning run on private data would spend privacy.
GROUPS = 8


def has_group_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.GroupNorm) for m in model.modules())


def _batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def untrained_batch_norm(model: nn.Module) -> bool:
    """True if every BatchNorm still has its initial statistics (mean 0, variance 1): a model from
    scratch, which frozen BatchNorm leaves unnormalised."""
    bns = [m for m in _batch_norms(model) if m.track_running_stats]
    return bool(bns) and all(torch.all(m.running_mean == 0) and torch.all(m.running_var == 1) for m in bns)


def to_group_norm(model: nn.Module, groups: int = GROUPS) -> nn.Module:
    """Replace, in place, every BatchNorm of an Ultralytics model by GroupNorm (see the module
    docstring); refuses a BatchNorm anywhere but in a plain ``Conv``/``DWConv`` (``Conv2``'s fused
    form drops a branch), and a model whose ``fuse()`` then fails (``RepConv``, ``RepVGGDW`` read
    their convolutions' BatchNorm), naming it: before any step, so nothing is spent."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.modules.batchnorm._BatchNorm):
                continue
            if child_name != "bn" or type(module) not in (Conv, DWConv):
                where = ".".join(filter(None, (name, child_name)))
                raise ValueError(f"BatchNorm {where} is not the 'bn' of an Ultralytics Conv; norm='group' cannot "
                                 "replace it: use norm='batch' (frozen BatchNorm) or pretrained weights")
            channels = child.num_features
            gn = nn.GroupNorm(math.gcd(channels, groups), channels, eps=child.eps, affine=child.affine)
            if child.affine:
                gn.weight, gn.bias = child.weight, child.bias
            del module.bn
            module.act = nn.Sequential(gn, module.act)
            module.forward = module.forward_fuse  # act(conv(x)), as Ultralytics' own fuse() sets it
    if hasattr(model, "fuse"):
        try:  # what validation, prediction and export will do with the checkpoint
            copy.deepcopy(model).fuse(verbose=False)
        except AttributeError as err:
            raise ValueError(f"this architecture cannot fuse with GroupNorm ({err}); use norm='batch' (frozen "
                             "BatchNorm) or pretrained weights") from None
    return model


def wants_group_norm(norm: str, weights: nn.Module | None) -> bool:
    """``auto``: GroupNorm from scratch (no weights) and for weights that have it; frozen BatchNorm
    when fine-tuning BatchNorm weights (their statistics come from the public pretraining).
    Refused: weights that mix both, or (``auto``) BatchNorm that never saw data, which is what
    Ultralytics' ``YOLO(yaml).load(groupnorm.pt)`` leaves after dropping the GroupNorm weights."""
    if weights is None:
        return norm in ("auto", "group")
    if has_group_norm(weights):
        if _batch_norms(weights) or norm == "batch":
            raise ValueError("these weights have GroupNorm (a private run from scratch); load them with "
                             "YOLO('weights.pt') or pretrained='weights.pt' (YOLO(yaml).load() drops GroupNorm "
                             "weights), with norm='auto' or 'group'")
        return True
    if norm == "auto" and untrained_batch_norm(weights):
        raise ValueError("the weights' BatchNorm never saw data (a model from a yaml, or YOLO(yaml).load() that "
                         "dropped GroupNorm weights): start from the checkpoint itself (YOLO('weights.pt')), or "
                         "choose norm='group' (GroupNorm) or norm='batch' (frozen BatchNorm)")
    return norm == "group"


def build_with(build: Callable[..., nn.Module], norm: str) -> Callable[..., nn.Module]:
    """The trainer's ``get_model(cfg, weights, verbose)`` building a GroupNorm model when
    ``wants_group_norm``, with the weights loaded after the conversion (BatchNorm weights are
    converted first, so their affine parameters carry over)."""

    def get_model(cfg: Any = None, weights: nn.Module | None = None, verbose: bool = True) -> nn.Module:
        if not wants_group_norm(norm, weights):
            return build(cfg=cfg, weights=weights, verbose=verbose)
        model = to_group_norm(build(cfg=cfg, weights=None, verbose=verbose))
        if weights is not None:
            model.load(weights if has_group_norm(weights) else to_group_norm(copy.deepcopy(weights)))
        return model

    return get_model
