"""Per-image keypoint terms of Ultralytics' pose losses: ``v8PoseLoss`` (YOLOv8/YOLO11) and
``PoseLoss26`` (YOLO26, with its RLE term).

Privacy assumption relied on here: image i's keypoint terms depend on image i and its labels only.
Ultralytics averages the keypoint (OKS) loss and the keypoint-visibility BCE over every foreground
anchor of the *batch*, and YOLO26's RLE loss over every visible keypoint of the batch's foreground
anchors, clamping that batch mean at 0; so one image's gradient scales with the other images'
labels. Here each term is averaged over the image's own foreground anchors (or visible keypoints),
and the RLE term is clamped per image, which equals Ultralytics' loss for that image alone in a
batch of one.

The assignment (``losses.assign_targets``) is per image and yields, per anchor, the keypoints of
the box it was assigned to (``<branch>.kpts`` [B, A, K, 3], grid units and visibility), that box's
area (``<branch>.kpt_area`` [B, A], grid units) and, for the RLE term, each image's foreground
anchors (``<branch>.kpt_idx`` / ``<branch>.kpt_on`` [B, F], F the batch's largest foreground count,
padding off). The differentiable part uses only fixed shapes, so it runs under ``torch.func`` too.
This module is imported by ``losses`` only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from ultralytics.utils.loss import PoseLoss26, v8PoseLoss
from ultralytics.utils.ops import xyxy2xywh


def _keypoints(crit: v8PoseLoss, p: dict, anchor_points: Tensor) -> Tensor:
    """[B, A, K, C] predicted keypoints, x and y decoded to grid units as Ultralytics' ``kpts_decode``
    (not in place); C = 2 or 3 (+ 2 RLE sigma logits for YOLO26)."""
    k, ndim = crit.kpt_shape
    pred = p["kpts"].permute(0, 2, 1)
    pred = pred.reshape(*pred.shape[:2], k, ndim)
    if _rle(crit) and p.get("kpts_sigma") is not None:
        sigma = p["kpts_sigma"].permute(0, 2, 1)
        pred = torch.cat((pred, sigma.reshape(*sigma.shape[:2], k, 2)), -1)
    if isinstance(crit, PoseLoss26):
        xy = pred[..., :2] + anchor_points[:, None, :]
    else:
        xy = pred[..., :2] * 2.0 + (anchor_points - 0.5)[:, None, :]
    return torch.cat((xy, pred[..., 2:]), -1)


def _rle(crit: v8PoseLoss) -> bool:
    return getattr(crit, "rle_loss", None) is not None


def assigner_kwargs(crit: v8PoseLoss, p: dict, kpts: Tensor, anchor_points: Tensor, stride_tensor: Tensor) -> dict:
    """YOLO26's assigner ranks anchors by keypoint OKS: it takes the predicted keypoints (pixels),
    the labelled ones (``kpts`` [B, M, K, 3], pixels) and each anchor's stride. None for YOLOv8."""
    if not isinstance(crit, PoseLoss26):
        return {}
    xy = _keypoints(crit, p, anchor_points)[..., :2].detach()
    return {"pd_kpts": xy * stride_tensor[:, None], "gt_kpts": kpts, "anc_strides": stride_tensor.view(-1)}


@torch.no_grad()
def targets(kpts: Tensor, target_gt_idx: Tensor, target_bboxes: Tensor, fg_mask: Tensor, stride_tensor: Tensor,
            name: str) -> dict[str, Tensor]:
    """Fixed-shape keypoint targets of each anchor from the assigner's box index (``target_gt_idx``
    [B, A] into the image's own boxes) and assigned boxes (``target_bboxes`` [B, A, 4], pixels);
    ``kpts`` [B, M, K, 3] are the labelled keypoints in pixels, padded per image."""
    n, a = target_gt_idx.shape
    if kpts.shape[1] == 0:  # no labels in the batch: every anchor is background
        gt = kpts.new_zeros((n, a, *kpts.shape[2:]))
    else:
        gt = kpts.gather(1, target_gt_idx.long()[..., None, None].expand(-1, -1, *kpts.shape[2:]))
    scale = stride_tensor.view(1, -1, 1)
    gt = torch.cat((gt[..., :2] / scale[..., None], gt[..., 2:]), -1)
    area = xyxy2xywh(target_bboxes / scale)[..., 2:].prod(-1)
    fg = fg_mask.float()
    width = max(1, int(fg.sum(1).max()))  # each image's foreground anchors first, padding after
    idx = torch.sort(fg, dim=1, descending=True, stable=True).indices[:, :width]
    return {f"{name}.kpts": gt.float(), f"{name}.kpt_area": area.float(), f"{name}.kpt_idx": idx,
            f"{name}.kpt_on": fg.gather(1, idx)}


def losses(crit: v8PoseLoss, p: dict, targets: dict, name: str, anchor_points: Tensor, fg: Tensor) -> Tensor:
    """[B] gain-weighted keypoint (OKS), visibility and (YOLO26) RLE terms of each image, each
    averaged over the image's own foreground anchors. ``fg`` [B, A] is the image's foreground mask."""
    k, ndim = crit.kpt_shape
    pred = _keypoints(crit, p, anchor_points)
    dtype = torch.promote_types(pred.dtype, torch.float32)  # targets stay float32 under autocast
    keep = fg.to(dtype)[..., None]  # [B, A, 1]
    gt = targets[f"{name}.kpts"].to(dtype) * keep[..., None]  # background anchors see zeros: no NaN
    area = torch.where(fg > 0, targets[f"{name}.kpt_area"].to(dtype), 1.0)
    d = (pred[..., :2] - gt[..., :2]).pow(2).sum(-1)  # [B, A, K]
    visible = (gt[..., 2] != 0).to(dtype)
    factor = k / (visible.sum(-1, keepdim=True) + 1e-9)
    sigmas = crit.keypoint_loss.sigmas.to(dtype)
    e = d / ((2 * sigmas).pow(2) * (area[..., None] + 1e-9) * 2)
    count = (fg.to(dtype).sum(1) * k).clamp(min=1)  # the image's own foreground anchors x keypoints
    total = (factor * (1 - torch.exp(-e)) * visible * keep).sum((1, 2)) / count * crit.hyp.pose
    if ndim == 3:  # visibility logits
        logit = pred[..., 2]
        bce = F.softplus(logit) - logit * visible
        total = total + (bce * keep).sum((1, 2)) / count * crit.hyp.kobj
    if _rle(crit) and pred.shape[-1] in (4, 5):
        total = total + _rle_loss(crit, pred, gt, targets, name) * crit.hyp.rle
    return total


def _rle_loss(crit: PoseLoss26, pred: Tensor, gt: Tensor, targets: dict, name: str) -> Tensor:
    """[B] YOLO26's residual log-likelihood term: over the image's visible keypoints on its
    foreground anchors (gathered, so the flow sees F anchors, not all), clamped at 0 per image."""
    idx, on = targets[f"{name}.kpt_idx"], targets[f"{name}.kpt_on"].to(gt.dtype)
    take = lambda x: x.gather(1, idx[..., None, None].expand(-1, -1, *x.shape[2:]))  # noqa: E731  [B, F, K, C]
    pred, gt = take(pred).to(gt.dtype), take(gt)  # float32 at least, as Ultralytics' sigma
    sigma = pred[..., -2:].sigmoid().clamp_min(torch.finfo(pred.dtype).tiny)
    error = (pred[..., :2] - gt[..., :2]) / (sigma + 1e-9)
    # Ultralytics drops non-finite errors; here they are masked (the image's gradient is then
    # non-finite anyway, and the clipping drops the image)
    mask = (gt[..., 2] != 0).to(gt.dtype) * on[..., None] * torch.isfinite(error).all(-1)  # [B, F, K]
    error = torch.where(mask[..., None] > 0, error, 0.0).clamp(-100, 100)
    log_phi = flow_log_prob(crit.flow_model, error)  # [B, F, K]
    per = torch.log(sigma) - log_phi[..., None] + torch.log(sigma * 2) + error.abs()  # [B, F, K, 2]
    per = per * crit.target_weights.to(per.dtype)[:, None] * mask[..., None]
    return (per.sum((1, 2, 3)) / mask.sum((1, 2)).clamp(min=1)).clamp(min=0)


def flow_log_prob(flow: nn.Module, x: Tensor) -> Tensor:
    """``RealNVP.log_prob`` on any leading shape ([..., 2] -> [...]); Ultralytics' takes [N, 2] only.
    The same coupling layers, masks and standard-normal prior, so the flow's Linear layers see the
    images on dim 0 (as the ghost path needs)."""
    log_det, z = x.new_zeros(x.shape[:-1]), x
    for i in reversed(range(len(flow.t))):
        m = flow.mask[i].to(x.dtype)
        z_ = m * z
        s = flow.s[i](z_) * (1 - m)
        t = flow.t[i](z_) * (1 - m)
        z = (1 - m) * (z - t) * torch.exp(-s) + z_
        log_det = log_det - s.sum(-1)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    return -0.5 * z.pow(2).sum(-1) - math.log(2 * math.pi) + log_det
