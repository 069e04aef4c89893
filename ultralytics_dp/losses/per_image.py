"""Per-image losses for Ultralytics detection and classification models.

Privacy assumption relied on here: the loss of image i depends on image i and its labels only.
Ultralytics' detection loss breaks this: ``v8DetectionLoss`` divides by ``target_scores_sum``
summed over the whole batch, so one image's gradient depends on every other image's labels.
We normalise by each image's own ``max(target_scores_sum_i, 1)`` instead. The loss of an image
then equals Ultralytics' loss for that image alone in a batch of one.

Task-aligned assignment has data-dependent shapes and cannot run under ``vmap``. It is per image
already, so it runs outside ``vmap`` on a detached forward (BatchNorm frozen, so that forward is
per image too) and yields fixed-shape padded targets and masks, which the differentiable
per-image loss consumes with weighted sums instead of boolean indexing.

Supported: ``DetectionModel`` (YOLOv8/11 ``v8DetectionLoss``, YOLO26 ``E2ELoss``), ``OBBModel``
(``v8OBBLoss``, YOLO26 ``E2ELoss`` of it), ``SegmentationModel`` (``v8SegmentationLoss``, YOLO26
``E2ELoss`` of ``SegmentLoss26``; mask terms in ``segment_loss``), ``PoseModel`` (``v8PoseLoss``,
YOLO26 ``E2ELoss`` of ``PoseLoss26``; keypoint terms in ``pose_loss``) and ``ClassificationModel``.
Others are refused.
"""

from __future__ import annotations

import math
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from ultralytics.nn.tasks import ClassificationModel, DetectionModel, OBBModel, PoseModel, SegmentationModel
from ultralytics.utils.tal import make_anchors, rbox2dist

from ..console import quiet_console
from ..mechanism.grad_sample import Batch, ModelCall, per_sample_grads
from . import pose as pose_loss
from . import segment as segment_loss
from .ultralytics_losses import (SEGMENT_LOSSES, E2EDetectLoss, E2ELoss, PoseLoss26, v8DetectionLoss, v8OBBLoss,
                                 v8PoseLoss, v8SegmentationLoss)

SUPPORTED = ("detection (YOLOv8/YOLO11/YOLO26 DetectionModel), oriented boxes (OBBModel), instance segmentation "
             "(SegmentationModel), pose (PoseModel) and classification (ClassificationModel)")
_DUMMY_BOX = (0.0, 0.0, 1.0, 1.0)
_DUMMY_RBOX = (0.5, 0.5, 1.0, 1.0, 0.0)
# exact types: subclasses add terms not written here
_BRANCH_LOSSES = (v8DetectionLoss, v8OBBLoss, *SEGMENT_LOSSES, v8PoseLoss, PoseLoss26)


def _task(model: nn.Module) -> str:
    if type(model) is DetectionModel:  # subclasses (segment, pose) have other losses
        return "detect"
    if type(model) is OBBModel:
        return "obb"
    if type(model) is SegmentationModel:
        return "segment"
    if type(model) is PoseModel:
        return "pose"
    if isinstance(model, ClassificationModel):
        return "classify"
    raise ValueError(f"unsupported model {type(model).__name__} for differential privacy; supported: {SUPPORTED}")


def check_supported(model: nn.Module) -> str:
    """Return the task (one of ``TASKS``), or raise naming what is
    supported. Creates the model's criterion (the trainer reads it at every epoch end)."""
    task = _task(model)
    if task != "classify":
        _branches(model)
    else:
        _criterion(model)
    return task


def _criterion(model: nn.Module) -> object:
    if getattr(model, "criterion", None) is None:
        model.criterion = model.init_criterion()
    return model.criterion


def _branches(model: nn.Module) -> list[tuple[str | None, v8DetectionLoss, float]]:
    """(output key, branch criterion, weight) for each detection branch, weights as of now (YOLO26's
    one-to-many / one-to-one weights decay every epoch)."""
    crit = _criterion(model)
    if isinstance(crit, E2ELoss) and type(crit.one2many) in _BRANCH_LOSSES:
        return [("one2many", crit.one2many, crit.o2m), ("one2one", crit.one2one, crit.o2o)]
    if isinstance(crit, E2EDetectLoss):
        return [("one2many", crit.one2many, 1.0), ("one2one", crit.one2one, 1.0)]
    if type(crit) in _BRANCH_LOSSES:
        return [(None, crit, 1.0)]
    inner = type(getattr(crit, "one2many", crit)).__name__
    raise ValueError(f"unsupported loss {inner} for differential privacy; supported: {SUPPORTED}")


def _parse(preds: object) -> dict:
    return preds[1] if isinstance(preds, tuple) else preds


# criterion -> its strides as numbers, read from the device once per criterion
_STRIDES: "weakref.WeakKeyDictionary[v8DetectionLoss, tuple[float, ...]]" = weakref.WeakKeyDictionary()


def _strides(crit: v8DetectionLoss) -> tuple[float, ...]:
    """The criterion's strides as numbers (read from the device on first use only)."""
    strides = _STRIDES.get(crit)
    if strides is None:
        strides = _STRIDES[crit] = tuple(float(s) for s in torch.as_tensor(crit.stride).tolist())
    return strides


def _image_size(crit: v8DetectionLoss, p: dict) -> tuple[float, float]:
    """The input's (height, width) in pixels as Ultralytics' loss takes it: the first feature
    map's size times the first stride."""
    h, w = p["feats"][0].shape[2:]
    stride = _strides(crit)[0]
    return h * stride, w * stride


def _geometry(crit: v8DetectionLoss, p: dict) -> tuple[Tensor, Tensor, Tensor]:
    """Anchor points [A, 2], their strides [A, 1] and the input size [4] (w, h, w, h pixels, the
    scale of xyxy boxes) as Ultralytics' loss computes them, from numbers on the host: no tensor
    is read back or built from host data (each would stall an accelerator's queue)."""
    anchor_points, stride_tensor = make_anchors(list(p["feats"]), _strides(crit), 0.5)
    h, w = _image_size(crit, p)
    scale = anchor_points.new_full((4,), w)
    scale[1::2] = h
    return anchor_points, stride_tensor, scale


@torch.no_grad()
def assign_targets(model: nn.Module, batch: Batch, preds: object | None = None) -> dict[str, Tensor]:
    """Fixed-shape per-image targets from Ultralytics' task-aligned assigner, on detached predictions.

    Returns, per branch ``b``: ``b.bboxes`` [B, A, 4] (pixels, xyxy; OBB: [B, A, 5] xywhr, pixels
    and radians), ``b.scores`` [B, A, nc] and
    ``b.fg`` [B, A] (float mask). The assigner works image by image; padding to the batch's largest
    label count is masked out, so image i's targets depend on image i only.
    """
    if preds is None:
        preds = model(batch["img"])
    with quiet_console():  # after an out-of-memory error, the assigner logs the chunk's size and label count
        return _assign(model, batch, _parse(preds))


def _assign(model: nn.Module, batch: Batch, preds: dict) -> dict[str, Tensor]:
    out = {}
    n = batch["img"].shape[0]
    for key, crit, _ in _branches(model):
        p = preds[key] if key else preds
        if isinstance(crit, v8SegmentationLoss):
            out.update(segment_loss.assign(crit, p, batch, key or "det"))
            continue
        pred_distri = p["boxes"].permute(0, 2, 1).contiguous()
        pred_scores = p["scores"].permute(0, 2, 1).contiguous()
        anchor_points, stride_tensor, scale = _geometry(crit, p)
        rotated = isinstance(crit, v8OBBLoss)
        targets = torch.cat((batch["batch_idx"].view(-1, 1), batch["cls"].view(-1, 1),
                             batch["bboxes"].view(-1, 5 if rotated else 4)), 1)
        if rotated:  # Ultralytics drops rotated boxes under 2 pixels wide or high, label by label
            h, w = _image_size(crit, p)
            targets = targets[(targets[:, 4] * w >= 2) & (targets[:, 5] * h >= 2)]
        targets = crit.preprocess(targets.to(pred_scores.device), n, scale_tensor=scale)
        gt_labels, gt_bboxes = targets.split((1, targets.shape[-1] - 1), 2)
        mask_gt = gt_bboxes.sum(2, keepdim=True).gt_(0.0)
        if rotated:
            pred_bboxes = crit.bbox_decode(anchor_points, pred_distri, p["angle"].permute(0, 2, 1))
            pred_bboxes = torch.cat((pred_bboxes[..., :4] * stride_tensor, pred_bboxes[..., 4:]), -1)
        else:
            pred_bboxes = crit.bbox_decode(anchor_points, pred_distri) * stride_tensor
        pose = isinstance(crit, v8PoseLoss)
        kpts = crit._batch_keypoints(batch, n, scale[:2].flip(0)) if pose else None  # [B, M, K, 3] pixels, per image
        _, target_bboxes, target_scores, fg_mask, target_gt_idx = crit.assigner(
            pred_scores.sigmoid(),
            pred_bboxes.type(gt_bboxes.dtype),
            anchor_points * stride_tensor,
            gt_labels,
            gt_bboxes,
            mask_gt,
            **(pose_loss.assigner_kwargs(crit, p, kpts, anchor_points, stride_tensor) if pose else {}),
        )
        name = key or "det"
        out[f"{name}.bboxes"] = target_bboxes.float()
        out[f"{name}.scores"] = target_scores.float()
        out[f"{name}.fg"] = fg_mask.float()
        if pose:
            out.update(pose_loss.targets(kpts, target_gt_idx, target_bboxes, fg_mask, stride_tensor, name))
    return out


def _ciou(box1: Tensor, box2: Tensor, eps: float = 1e-7) -> Tensor:
    """Complete IoU of xyxy boxes, as Ultralytics' ``bbox_iou(..., CIoU=True)`` but without
    in-place ops (which have no ``vmap`` batching rule)."""
    b1_x1, b1_y1, b1_x2, b1_y2 = box1.unbind(-1)
    b2_x1, b2_y1, b2_x2, b2_y2 = box2.unbind(-1)
    w1, h1 = b1_x2 - b1_x1, b1_y2 - b1_y1 + eps
    w2, h2 = b2_x2 - b2_x1, b2_y2 - b2_y1 + eps
    inter = (b1_x2.minimum(b2_x2) - b1_x1.maximum(b2_x1)).clamp(min=0) * (
        b1_y2.minimum(b2_y2) - b1_y1.maximum(b2_y1)
    ).clamp(min=0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    cw = b1_x2.maximum(b2_x2) - b1_x1.minimum(b2_x1)
    ch = b1_y2.maximum(b2_y2) - b1_y1.minimum(b2_y1)
    c2 = cw.pow(2) + ch.pow(2) + eps
    rho2 = ((b2_x1 + b2_x2 - b1_x1 - b1_x2).pow(2) + (b2_y1 + b2_y2 - b1_y1 - b1_y2).pow(2)) / 4
    v = (4 / math.pi**2) * ((w2 / h2).atan() - (w1 / h1).atan()).pow(2)
    alpha = (v / (1 - iou + v + eps)).detach()
    return iou - (rho2 / c2 + v * alpha)


def _bce_with_logits(x: Tensor, y: Tensor) -> Tensor:
    """``softplus(x) - x*y``: one formula on every path (ATen's fused kernel and the one used
    under ``vmap``/``grad`` differ slightly at large negative logits)."""
    return F.softplus(x) - x * y


def _distance_loss(crit: v8DetectionLoss, pred_distri: Tensor, ltrb: Tensor, stride_tensor: Tensor, box_scale: Tensor,
                   weight: Tensor, score_sum: Tensor) -> Tensor:
    """[B] DFL (reg_max > 1) or, for YOLO26 (reg_max == 1), L1 on image-size-normalised distances,
    between the predicted distances and the target's ``ltrb`` distances from each anchor."""
    if crit.use_dfl:
        reg_max = crit.reg_max
        ltrb = ltrb.clamp(0, reg_max - 1 - 0.01)
        left = ltrb.long()
        w_left = left + 1 - ltrb
        logp = F.log_softmax(pred_distri.reshape(*pred_distri.shape[:2], 4, reg_max), dim=-1)
        loss = -(
            logp.gather(-1, left.unsqueeze(-1)).squeeze(-1) * w_left
            + logp.gather(-1, (left + 1).unsqueeze(-1)).squeeze(-1) * (1 - w_left)
        ).mean(-1)
    else:
        scale = stride_tensor / box_scale
        loss = (pred_distri * scale - ltrb * scale).abs().mean(-1)
    return (loss * weight).sum(1) / score_sum


def _branch_losses(crit: v8DetectionLoss, p: dict, targets: Batch, name: str) -> Tensor:
    """[B] gain-weighted (box + cls + dfl/l1 [+ angle | + mask | + keypoints]) losses, each image
    normalised by its own score sum (mask and keypoint terms by its own foreground count). Boxes are
    xyxy, or xywhr for OBB (``v8OBBLoss``: ProbIoU and an angle term)."""
    rotated = isinstance(crit, v8OBBLoss)
    pred_distri = p["boxes"].permute(0, 2, 1)
    pred_scores = p["scores"].permute(0, 2, 1)
    anchor_points, stride_tensor, box_scale = _geometry(crit, p)
    # targets stay float32 under autocast, as in Ultralytics: in bf16 the DFL clamp to reg_max - 1.01
    # rounds up to reg_max - 1, and the right-hand bin would index past the distribution; segment_loss too
    dtype = torch.promote_types(pred_scores.dtype, torch.float32)
    scores = targets[f"{name}.scores"].to(dtype)
    fg = targets[f"{name}.fg"].to(dtype)
    pixels = targets[f"{name}.bboxes"].to(dtype)
    score_sum = scores.flatten(1).sum(1).clamp(min=1)  # per image, not per batch

    bce = _bce_with_logits(pred_scores, scores)
    if crit.class_weights is not None:
        bce = bce * crit.class_weights
    loss_cls = bce.flatten(1).sum(1) / score_sum

    weight = scores.sum(-1) * fg  # [B, A], zero on background anchors
    keep = fg.unsqueeze(-1) > 0
    # background anchors see a constant box pair: no gradient and no NaN can come from them
    if rotated:
        pred_bboxes = crit.bbox_decode(anchor_points, pred_distri, p["angle"].permute(0, 2, 1))  # grid units
        target_bboxes = torch.cat((pixels[..., :4] / stride_tensor, pixels[..., 4:]), -1)
        dummy = pred_bboxes.new_tensor(_DUMMY_RBOX)
        iou = _probiou(torch.where(keep, pred_bboxes, dummy), torch.where(keep, target_bboxes, dummy),
                       floor=crit.bbox_loss.floor)
        ltrb = rbox2dist(target_bboxes[..., :4], anchor_points, target_bboxes[..., 4:5])
    else:
        pred_bboxes = crit.bbox_decode(anchor_points, pred_distri)
        target_bboxes = pixels / stride_tensor
        dummy = pred_bboxes.new_tensor(_DUMMY_BOX)
        iou = _ciou(torch.where(keep, pred_bboxes, dummy), torch.where(keep, target_bboxes, dummy))
        ltrb = torch.cat((anchor_points - target_bboxes[..., :2], target_bboxes[..., 2:] - anchor_points), -1)
    loss_box = ((1.0 - iou) * weight).sum(1) / score_sum
    ltrb = torch.where(keep, ltrb, 0.0)  # Ultralytics takes distances on foreground anchors only
    loss_dfl = _distance_loss(crit, pred_distri, ltrb, stride_tensor, box_scale, weight, score_sum)
    hyp = crit.hyp
    total = loss_box * hyp.box + loss_cls * hyp.cls + loss_dfl * hyp.dfl
    if rotated:
        total = total + _angle_loss(pred_bboxes, target_bboxes, weight) / score_sum * hyp.angle
    if isinstance(crit, v8SegmentationLoss):
        total = total + segment_loss.losses(crit, p, targets, name)
    if isinstance(crit, v8PoseLoss):
        total = total + pose_loss.losses(crit, p, targets, name, anchor_points, fg)
    return total


def _probiou(obb1: Tensor, obb2: Tensor, floor: float, eps: float = 1e-7) -> Tensor:
    """Ultralytics' ``probiou`` (xywhr boxes, Bhattacharyya distance of their Gaussians) without
    in-place ops, which have no ``vmap`` batching rule."""
    def covariance(b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a, bb, r = b[..., 2].pow(2) / 12 + floor, b[..., 3].pow(2) / 12 + floor, b[..., 4]
        cos, sin = r.cos(), r.sin()
        return a * cos.pow(2) + bb * sin.pow(2), a * sin.pow(2) + bb * cos.pow(2), (a - bb) * cos * sin

    (x1, y1), (x2, y2) = obb1[..., :2].unbind(-1), obb2[..., :2].unbind(-1)
    (a1, b1, c1), (a2, b2, c2) = covariance(obb1), covariance(obb2)
    den = (a1 + a2) * (b1 + b2) - (c1 + c2).pow(2) + eps
    t1 = ((a1 + a2) * (y1 - y2).pow(2) + (b1 + b2) * (x1 - x2).pow(2)) / den * 0.25
    t2 = ((c1 + c2) * (x2 - x1) * (y1 - y2)) / den * 0.5
    dets = ((a1 * b1 - c1.pow(2)).clamp(min=0) * (a2 * b2 - c2.pow(2)).clamp(min=0)).sqrt()
    t3 = (((a1 + a2) * (b1 + b2) - (c1 + c2).pow(2)) / (4 * dets + eps) + eps).log() * 0.5
    bd = (t1 + t2 + t3).clamp(eps, 100.0)
    return 1 - (1.0 - (-bd).exp() + eps).sqrt()


def _angle_loss(pred_bboxes: Tensor, target_bboxes: Tensor, weight: Tensor) -> Tensor:
    """[B] weighted sum of sin^2 of twice the wrapped angle difference, damped for near-square boxes
    (Ultralytics' ``calculate_angle_loss``)."""
    log_ar = torch.log((target_bboxes[..., 2] + 1e-9) / (target_bboxes[..., 3] + 1e-9))
    delta = pred_bboxes[..., 4] - target_bboxes[..., 4]
    wrapped = delta - torch.round(delta / math.pi) * math.pi
    return (torch.exp(-log_ar.pow(2) / 9) * torch.sin(2 * wrapped).pow(2) * weight).sum(1)


def losses_from_preds(model: nn.Module, preds: object, batch: Batch) -> Tensor:
    """[B] per-image losses from the model's training-mode outputs and per-image targets
    (``assign_targets`` output for detection, ``cls`` for classification)."""
    if _task(model) == "classify":
        logits = preds[1] if isinstance(preds, (list, tuple)) else preds
        return F.cross_entropy(logits, batch["cls"].long().view(-1), reduction="none")
    preds = _parse(preds)
    total = 0.0
    for key, crit, weight in _branches(model):
        total = total + weight * _branch_losses(crit, preds[key] if key else preds, batch, key or "det")
    return total


def sample_batch(model: nn.Module, batch: Batch) -> Batch:
    """The per-sample view of an Ultralytics training batch: every tensor has the images on dim 0
    (``img`` plus padded targets for detection, ``img`` and ``cls`` for classification)."""
    if _task(model) == "classify":
        return {"img": batch["img"], "cls": batch["cls"].view(-1)}
    return {"img": batch["img"], **assign_targets(model, batch)}


def _detached(preds: object) -> object:
    if isinstance(preds, Tensor):
        return preds.detach()
    if isinstance(preds, dict):
        return {k: _detached(v) for k, v in preds.items()}
    if isinstance(preds, (list, tuple)):
        return type(preds)(_detached(v) for v in preds)
    return preds


def batch_losses(model: nn.Module, batch: Batch) -> Tensor:
    """[B] per-image losses from ONE batched forward: the assignment reuses its detached outputs
    instead of a second forward (BatchNorm is frozen, so the batched forward is per image)."""
    preds = model(batch["img"])
    if _task(model) == "classify":
        return losses_from_preds(model, preds, {"cls": batch["cls"].view(-1)})
    return losses_from_preds(model, preds, assign_targets(model, batch, preds=_detached(preds)))


def per_image_loss_fn(model: nn.Module) -> Callable[[ModelCall, Batch], Tensor]:
    """``loss_fn(model_call, sample)`` for the engine: the loss of one image (a batch of one)."""

    def loss_fn(model_call: ModelCall, sample: Batch) -> Tensor:
        return losses_from_preds(model, model_call(sample["img"]), sample).mean()

    return loss_fn


def per_sample_losses(model: nn.Module, batch: Batch) -> Tensor:
    """[B] loss of each image, depending on that image and its labels only.

    ``model`` as the trainer holds it (``model.args`` set, train mode, BatchNorm frozen) and
    ``batch`` its preprocessed training batch (``img``, plus ``cls``/``bboxes``/``batch_idx``).
    """
    samples = sample_batch(model, batch)
    return losses_from_preds(model, model(samples["img"]), samples)


def per_sample_grad_norms(model: nn.Module, batch: Batch, *, chunk_size: int | None = None) -> Tensor:
    """[B] L2 norm of each image's gradient over all trainable parameters (before clipping)."""
    grads = per_sample_grads(model, per_image_loss_fn(model), sample_batch(model, batch), chunk_size=chunk_size)
    return torch.sqrt(sum(g.flatten(1).double().pow(2).sum(1) for g in grads.values())).float()
