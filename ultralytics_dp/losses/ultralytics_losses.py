"""Ultralytics' loss classes that the per-image losses mirror, the same across the tested window of
releases (``integration.keys.ULTRALYTICS_WINDOW``) but for one: ``SegmentLoss26`` (YOLO26's
segmentation loss with its semantic branch) exists from 8.4.190; before it, YOLO26 segmentation
trains with ``v8SegmentationLoss``. Every difference between releases lives here. (Releases before
8.4.187 assign YOLO26 pose targets without the anchors' strides, and around 8.4.150 build anchors
in a way ``torch.func.vmap`` cannot run: they are outside the window.)
"""

from __future__ import annotations

from ultralytics.utils import loss
from ultralytics.utils.loss import (E2EDetectLoss, E2ELoss, PoseLoss26, v8DetectionLoss, v8OBBLoss, v8PoseLoss,
                                    v8SegmentationLoss)

SEGMENT_LOSSES: tuple[type, ...] = (v8SegmentationLoss, *((loss.SegmentLoss26,) if hasattr(loss, "SegmentLoss26") else ()))

__all__ = ["E2EDetectLoss", "E2ELoss", "PoseLoss26", "SEGMENT_LOSSES", "v8DetectionLoss", "v8OBBLoss", "v8PoseLoss",
           "v8SegmentationLoss"]
