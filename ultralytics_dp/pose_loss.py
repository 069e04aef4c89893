"""Per-image keypoint terms of Ultralytics' ``v8PoseLoss`` (YOLOv8/YOLO11 pose).

Privacy assumption relied on here: image i's keypoint terms depend on image i and its labels only.
Ultralytics averages the keypoint (OKS) loss and the keypoint-visibility BCE over every foreground
anchor of the *batch* (``KeypointLoss.forward(...).mean()``, ``BCEWithLogitsLoss``), so one image's
gradient scales with the other images' foreground counts. Here each image's terms are averaged
over its own foreground anchors (zero without any), which equals Ultralytics' loss for that image
alone in a batch of one.

The assignment (``losses.assign_targets``) is per image and yields, per anchor, the keypoints of
the box it was assigned to (``<branch>.kpts`` [B, A, K, 3], grid units and visibility) and that
box's area (``<branch>.kpt_area`` [B, A], grid units); the differentiable part below uses only
fixed shapes, so it runs under ``torch.func`` too. YOLO26's ``PoseLoss26`` (RLE keypoints with a
normalising flow) is not covered and is refused by ``losses``.
This module is imported by ``losses`` only.
"""

from __future__ import annotations

import torch
from torch import Tensor
from ultralytics.utils.loss import v8PoseLoss
from ultralytics.utils.ops import xyxy2xywh


@torch.no_grad()
def assign(crit: v8PoseLoss, batch: dict, n: int, imgsz: Tensor, target_gt_idx: Tensor, target_bboxes: Tensor,
           stride_tensor: Tensor, name: str) -> dict[str, Tensor]:
    """Fixed-shape keypoint targets of each anchor from the assigner's box index (``target_gt_idx``
    [B, A] into the image's own boxes) and assigned boxes (``target_bboxes`` [B, A, 4], pixels)."""
    kpts = crit._batch_keypoints(batch, n, imgsz)  # [B, M, K, 3] pixels, padded per image
    a = target_gt_idx.shape[1]
    if kpts.shape[1] == 0:  # no labels in the batch: every anchor is background
        gt = kpts.new_zeros((n, a, *kpts.shape[2:]))
    else:
        gt = kpts.gather(1, target_gt_idx.long()[..., None, None].expand(-1, -1, *kpts.shape[2:]))
    scale = stride_tensor.view(1, -1, 1)
    gt = torch.cat((gt[..., :2] / scale[..., None], gt[..., 2:]), -1)
    area = xyxy2xywh(target_bboxes / scale)[..., 2:].prod(-1)
    return {f"{name}.kpts": gt.float(), f"{name}.kpt_area": area.float()}


def losses(crit: v8PoseLoss, p: dict, targets: dict, name: str, anchor_points: Tensor, fg: Tensor) -> Tensor:
    """[B] gain-weighted keypoint (OKS) and visibility terms of each image, each averaged over the
    image's own foreground anchors and keypoints. ``fg`` [B, A] is the image's foreground mask."""
    k, ndim = crit.kpt_shape
    pred = p["kpts"].permute(0, 2, 1)
    pred = pred.reshape(*pred.shape[:2], k, ndim)
    dtype = torch.promote_types(pred.dtype, torch.float32)  # targets stay float32 under autocast
    keep = fg.to(dtype)[..., None]  # [B, A, 1]
    gt = targets[f"{name}.kpts"].to(dtype) * keep[..., None]  # background anchors see zeros: no NaN
    area = torch.where(fg > 0, targets[f"{name}.kpt_area"].to(dtype), 1.0)
    xy = pred[..., :2] * 2.0 + (anchor_points - 0.5)[:, None, :]  # Ultralytics' kpts_decode, not in place
    d = (xy - gt[..., :2]).pow(2).sum(-1)  # [B, A, K]
    visible = (gt[..., 2] != 0).to(dtype)
    factor = k / (visible.sum(-1, keepdim=True) + 1e-9)
    sigmas = crit.keypoint_loss.sigmas.to(dtype)
    e = d / ((2 * sigmas).pow(2) * (area[..., None] + 1e-9) * 2)
    count = (fg.to(dtype).sum(1) * k).clamp(min=1)  # the image's own foreground anchors x keypoints
    total = (factor * (1 - torch.exp(-e)) * visible * keep).sum((1, 2)) / count * crit.hyp.pose
    if ndim == 3:  # visibility logits
        logit = pred[..., 2]
        bce = torch.nn.functional.softplus(logit) - logit * visible
        total = total + (bce * keep).sum((1, 2)) / count * crit.hyp.kobj
    return total
