"""Per-image instance-segmentation loss terms (``v8SegmentationLoss``, YOLO26's ``SegmentLoss26``).

Privacy assumption relied on here: the loss of image i depends on image i and its labels only.
Ultralytics' mask loss breaks this: it sums every foreground anchor's mask loss over the batch and
divides by the batch's foreground count (``fg_mask.sum()``), and YOLO26's semantic branch is
computed only when the *batch* has a foreground anchor. Here each image's mask loss is divided by
its own foreground count, and its semantic loss counts when it has a foreground anchor itself:
the terms then equal Ultralytics' for that image alone in a batch of one.

The box, class and distance terms are the detection ones (``losses``). Assignment (including
YOLO26's mask-aware assigner) is Ultralytics' own code on a detached forward: its foreground
anchors, padded to the batch's largest count, select fixed-shape targets (each anchor's
ground-truth mask, box and area at prototype resolution), which the differentiable part consumes
with gathers and weighted sums instead of boolean indexing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from ultralytics.utils.loss import v8SegmentationLoss

from .batch import select

# Ultralytics' semantic branch: BCEDiceLoss(weight_bce=0.5, weight_dice=0.5), Dice smoothing 1
_SEM_BCE, _SEM_DICE, _DICE_SMOOTH = 0.5, 0.5, 1.0


@torch.no_grad()
def assign(crit: v8SegmentationLoss, p: dict, batch: dict, name: str) -> dict[str, Tensor]:
    """Ultralytics' assignment for one branch, image by image, and the fixed-shape segmentation
    targets it selects.

    Image by image because YOLO26's mask-aware assigner pads and chunks the images of a batch
    together (by anchor count): on identical predictions its batched result agreed with this one
    (to 1.5e-8, measured), but assigning each image as a batch of one makes image i's targets a
    function of image i by construction, not by Ultralytics' implementation. Returns ``name.bboxes`` /
    ``name.scores`` / ``name.fg`` as for detection, plus, over K = the batch's largest foreground
    count: ``name.seg_idx`` [B, K] (anchor index), ``name.seg_valid`` [B, K], ``name.seg_masks``
    [B, K, H, W] (each anchor's ground-truth mask), ``name.seg_boxes`` [B, K, 4] (xyxy in mask
    pixels) and ``name.seg_area`` [B, K] (box area as an image fraction); with a semantic branch
    ``name.sem`` [B, nc, h, w] (one-hot classes where an instance covers the pixel) and
    ``name.sem_on`` [B].
    """
    n = batch["img"].shape[0]
    per_image = [_assign_one(crit, _image(p, i), select(batch, [i], crit.overlap)) for i in range(n)]
    k = max(1, max(t["seg_idx"].shape[1] for t in per_image))
    out = {}
    for key in per_image[0]:
        parts = [t[key] for t in per_image]
        if key.startswith("seg_"):  # pad the foreground slots to K with invalid (zero) entries
            parts = [F.pad(t, (0, 0) * (t.dim() - 2) + (0, k - t.shape[1])) for t in parts]
        out[f"{name}.{key}"] = torch.cat(parts)
    return out


def _image(x: Any, i: int) -> Any:
    """Image i of the model's (detached) training outputs, as a batch of one, in float32 (the only
    dtype Ultralytics' assigners accept beside the labels')."""
    if isinstance(x, Tensor):
        x = x[i : i + 1]
        return x.float() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _image(v, i) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_image(v, i) for v in x)
    return x


def _assign_one(crit: v8SegmentationLoss, p: dict, batch: dict) -> dict[str, Tensor]:
    """One image's targets (a batch of one): Ultralytics prepares them (and YOLO26's mask inputs)
    in its own ``get_assigned_targets_and_loss``; the assigner's outputs are kept on the way."""
    seen: dict[str, Any] = {}
    assigner = crit.assigner

    def keep(*args: Any, **kwargs: Any) -> Any:
        seen["out"] = assigner(*args, **kwargs)
        return seen["out"]

    crit.assigner, stride = keep, crit.stride
    crit.stride = stride.float()  # a float64 model's stride would make YOLO26's mask inputs float64
    try:
        crit.get_assigned_targets_and_loss(p, batch)
    finally:
        crit.assigner, crit.stride = assigner, stride
    _, target_bboxes, target_scores, fg_mask, target_gt_idx = seen["out"]
    proto = p["proto"][0] if isinstance(p["proto"], tuple) else p["proto"]
    masks = batch["masks"].to(proto.device).float()
    mask_h, mask_w = masks.shape[-2:]  # Ultralytics upsamples the prototypes to the masks' size
    imgsz = torch.tensor(p["feats"][0].shape[2:], device=proto.device, dtype=torch.float32) * crit.stride[0]
    anchors = fg_mask[0].nonzero().view(-1)
    gt_idx = target_gt_idx[0, anchors]
    boxes = target_bboxes[0, anchors].float() / imgsz[[1, 0, 1, 0]]
    if crit.overlap:
        gt = (masks[0] == (gt_idx + 1).view(-1, 1, 1)).float()
    else:
        gt = masks[gt_idx] if len(masks) else masks.new_zeros(0, mask_h, mask_w)
    out = {
        "bboxes": target_bboxes.float(), "scores": target_scores.float(), "fg": fg_mask.float(),
        "seg_idx": anchors[None], "seg_valid": torch.ones_like(anchors, dtype=torch.float)[None], "seg_masks": gt[None],
        "seg_boxes": (boxes * boxes.new_tensor([mask_w, mask_h, mask_w, mask_h]))[None],
        "seg_area": ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None],
    }
    if isinstance(p["proto"], tuple):  # YOLO26's semantic branch
        sem_pred = p["proto"][1]
        present = (masks != 0) if crit.overlap else (masks.sum(0, keepdim=True) != 0)
        if not crit.overlap and not len(masks):
            present = torch.zeros(1, mask_h, mask_w, dtype=torch.bool, device=proto.device)
        sem = torch.zeros(1, crit.nc, mask_h, mask_w, device=proto.device)
        sem.scatter_(1, batch["sem_masks"].to(proto.device).long().unsqueeze(1), present.unsqueeze(1).float())
        if sem.shape[-2:] != sem_pred.shape[-2:]:
            sem = F.interpolate(sem, sem_pred.shape[-2:], mode="nearest")
        out["sem"] = sem
        out["sem_on"] = (fg_mask.sum(1) > 0).float()
    return out


def losses(crit: v8SegmentationLoss, p: dict, targets: dict, name: str) -> Tensor:
    """[B] the gain-weighted mask (and semantic) terms of each image, normalised by its own count."""
    proto, sem_pred = p["proto"] if isinstance(p["proto"], tuple) else (p["proto"], None)
    dtype = torch.promote_types(proto.dtype, torch.float32)  # targets stay float32 under autocast (``losses``)
    gt = targets[f"{name}.seg_masks"].to(dtype)
    if proto.shape[-2:] != gt.shape[-2:]:
        proto = F.interpolate(proto, gt.shape[-2:], mode="bilinear", align_corners=False)
    coef = p["mask_coefficient"].permute(0, 2, 1)  # [B, A, nm]
    idx = targets[f"{name}.seg_idx"]
    coef = coef.gather(1, idx.unsqueeze(-1).expand(-1, -1, coef.shape[-1]))  # [B, K, nm]
    pred = torch.einsum("bkn,bnhw->bkhw", coef, proto)
    bce = F.softplus(pred) - pred * gt
    x1, y1, x2, y2 = targets[f"{name}.seg_boxes"].to(dtype).unbind(-1)
    cols = torch.arange(gt.shape[-1], device=gt.device, dtype=dtype)
    rows = torch.arange(gt.shape[-2], device=gt.device, dtype=dtype)
    inside_x = (cols >= x1[..., None]) & (cols < x2[..., None])  # [B, K, W]
    inside_y = (rows >= y1[..., None]) & (rows < y2[..., None])  # [B, K, H]
    inside = (inside_y[..., :, None] & inside_x[..., None, :]).to(dtype)
    valid = targets[f"{name}.seg_valid"].to(dtype)
    area = torch.where(valid > 0, targets[f"{name}.seg_area"].to(dtype), 1.0)
    per_anchor = (bce * inside).mean((2, 3)) / area * valid
    total = per_anchor.sum(1) / valid.sum(1).clamp(min=1)
    if sem_pred is not None:
        sem = targets[f"{name}.sem"].to(dtype)
        bce_sem = (F.softplus(sem_pred) - sem_pred * sem).flatten(1).mean(1)
        prob = sem_pred.sigmoid()
        dice = (2 * (prob * sem).sum((2, 3)) + _DICE_SMOOTH) / (prob.sum((2, 3)) + sem.sum((2, 3)) + _DICE_SMOOTH)
        semantic = _SEM_BCE * bce_sem + _SEM_DICE * (1 - dice).mean(1)
        total = total + semantic * targets[f"{name}.sem_on"].to(dtype)
    return total * crit.hyp.box
