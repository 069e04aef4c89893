"""The self-check before a private run: an Ultralytics whose loss mixes images, or a clipping
back-end that lets an image through unclipped, is refused before anything is spent or recorded."""

from __future__ import annotations

import pytest
import torch

import ultralytics_dp  # noqa: F401  (import hooks before Ultralytics)
from ultralytics.utils import tal

from helpers import assert_refused


@pytest.mark.slow
def test_an_ultralytics_whose_assignment_mixes_images_is_refused(tiny_det, tmp_path, monkeypatch):
    forward = tal.TaskAlignedAssigner.forward

    def mixing(self, pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt, *args, **kwargs):
        # each image is assigned the next image's objects: a loss that mixes images across the batch
        roll = lambda t: torch.roll(t, 1, 0)  # noqa: E731
        return forward(self, pd_scores, pd_bboxes, anc_points, roll(gt_labels), roll(gt_bboxes), roll(mask_gt),
                       *args, **kwargs)

    monkeypatch.setattr(tal.TaskAlignedAssigner, "forward", mixing)
    assert_refused(tmp_path, tiny_det, r"DP self-check failed with Ultralytics 8\.4\.\d+ \(detect\): an image's loss "
                                       "in a batch differs from Ultralytics' own loss of that image alone")


@pytest.mark.slow
def test_a_back_end_that_does_not_clip_is_refused(tiny_det, tmp_path, monkeypatch):
    from ultralytics_dp.mechanism import ghost

    monkeypatch.setattr(ghost, "clip_factors", lambda norms, c: torch.ones_like(norms))
    assert_refused(tmp_path, tiny_det, r"DP self-check failed .*clipped gradient has norm", dp_kwargs={
        "max_grad_norm": 1e-4})
