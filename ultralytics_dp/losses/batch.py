"""Slicing a collated Ultralytics training batch into the images of a physical chunk.

Ultralytics collates a batch's labels flat, each row naming its image (``batch_idx``); a chunk
must carry exactly its own images' labels, re-indexed, so that each image's loss sees its own
labels and no other's.
"""

from __future__ import annotations

import torch

WHOLE = ("img", "batch_idx", "cls", "bboxes", "keypoints", "masks", "sem_masks")  # what a chunk carries


def select(batch: dict, idx: list[int], overlap_masks: bool = True) -> dict:
    """The images ``idx`` of a collated Ultralytics batch, with their labels (detection labels and
    keypoints are re-indexed to the chunk). Segmentation masks are one per image (``overlap_masks``,
    Ultralytics' ``overlap_mask``) or one per instance."""
    if list(idx) == list(range(batch["img"].shape[0])):  # the whole batch (one chunk): nothing to slice
        return {k: v for k, v in batch.items() if k in WHOLE}
    index = torch.tensor(idx, dtype=torch.long, device=batch["img"].device)
    out = {"img": batch["img"][index]}
    if "batch_idx" in batch:
        owner = batch["batch_idx"].long()
        remap = torch.full((batch["img"].shape[0],), -1, dtype=torch.long, device=owner.device)
        remap[index.to(owner.device)] = torch.arange(len(idx), device=owner.device)
        keep = remap[owner] >= 0
        out.update(batch_idx=remap[owner][keep].to(batch["batch_idx"].dtype),
                   cls=batch["cls"][keep], bboxes=batch["bboxes"][keep])
        if "keypoints" in batch:  # one set per instance, like the boxes
            out["keypoints"] = batch["keypoints"][keep.to(batch["keypoints"].device)]
        if "masks" in batch:
            out["masks"] = batch["masks"][index.to(batch["masks"].device) if overlap_masks else keep]
        if "sem_masks" in batch:
            out["sem_masks"] = batch["sem_masks"][index.to(batch["sem_masks"].device)]
    else:
        out["cls"] = batch["cls"][index]
    return out
