"""Per-image Ultralytics losses: equal to Ultralytics' own loss on a batch of one, independent of
the other images, and exact per-image gradients against a naive loop."""

from __future__ import annotations

import copy

import pytest
import torch

from ultralytics_dp import per_sample_grad_norms, per_sample_losses
from ultralytics_dp.mechanism.ghost import clipped_grad_sum_ghost
from ultralytics_dp.losses.per_image import _branches, batch_losses, check_supported, per_image_loss_fn, sample_batch
from ultralytics_dp.mechanism.gaussian import clipped_grad_sum

from helpers import (det_batch, image, naive_image_grads, per_instance_masks, pose_batch, seg_batch, trainer_model,
                     ultralytics_loss_alone)


@pytest.mark.parametrize("cfg", ["yolo26n.yaml", "yolov8n.yaml"])
def test_detection_loss_is_per_image(cfg):
    model = trainer_model(cfg)
    batch = det_batch([0, 1, 4, 2])  # no box, one box, several boxes
    losses = per_sample_losses(model, batch)
    assert losses.shape == (4,)
    for i in range(4):
        alone = per_sample_losses(model, image(batch, i))
        assert torch.allclose(losses[i], alone[0], rtol=1e-5, atol=1e-7)
        reference = ultralytics_loss_alone(model, image(batch, i))
        assert torch.allclose(losses[i], reference, rtol=1e-4), (i, losses[i], reference)
    # changing another image's pixels and labels leaves image 0..1's losses alone
    other = det_batch([0, 1, 7, 3], seed=1)
    mixed = {**batch}
    mixed["img"] = torch.cat([batch["img"][:2], other["img"][2:]])
    keep = batch["batch_idx"] < 2
    take = other["batch_idx"] >= 2
    for k in ("batch_idx", "cls", "bboxes"):
        mixed[k] = torch.cat([batch[k][keep], other[k][take]])
    assert torch.allclose(per_sample_losses(model, mixed)[:2], losses[:2], rtol=1e-5, atol=1e-7)


def test_classification_loss_is_per_image():
    model = trainer_model("yolo26n-cls.yaml")
    batch = {"img": torch.rand(5, 3, 32, 32), "cls": torch.tensor([0, 3, 3, 7, 9])}
    losses = per_sample_losses(model, batch)
    for i in range(5):
        one = image(batch, i)
        assert torch.allclose(losses[i], per_sample_losses(model, one)[0], rtol=1e-5)
        assert torch.allclose(losses[i], model.init_criterion()(model(one["img"]), one)[0], rtol=1e-5)


@pytest.mark.parametrize("cfg", ["yolo26n.yaml", "yolov8n.yaml"])
def test_detection_per_sample_gradients_are_exact(cfg):
    model = trainer_model(cfg)
    batch = det_batch([1, 0, 3])
    naive = naive_image_grads(model, batch, 3)
    naive_norms = torch.stack([torch.sqrt(sum(g.double().pow(2).sum() for g in gs)) for gs in naive])
    norms = per_sample_grad_norms(model, batch)
    assert torch.allclose(norms.double(), naive_norms, rtol=1e-4)
    # with C far above every norm (no clipping) the clipped sum is the plain sum of per-image grads
    total, _ = clipped_grad_sum(model, per_image_loss_fn(model), sample_batch(model, batch), max_grad_norm=1e6)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    rel = max(
        ((total[n] - sum(gs[j] for gs in naive)).norm() / sum(gs[j] for gs in naive).norm().clamp_min(1e-12)).item()
        for j, n in enumerate(names)
        if sum(gs[j] for gs in naive).norm() > 0
    )
    assert rel <= 1e-4


@pytest.mark.parametrize("cfg", ["yolo26n-obb.yaml", "yolov8n-obb.yaml"])
def test_obb_loss_is_per_image_and_its_gradients_exact(cfg):
    """Rotated boxes (float64): each image's loss equals Ultralytics' v8OBBLoss on that image alone
    (to 1e-6; its loss buffer is float32), ignores the other images, and its gradient matches a
    naive loop; ghost and torch.func clipped sums agree."""
    model = trainer_model(cfg).double()
    batch = det_batch([0, 1, 4, 2], rotated=True, dtype=torch.float64)
    losses = per_sample_losses(model, batch)
    for i in range(4):
        reference = ultralytics_loss_alone(model, image(batch, i))
        assert torch.allclose(losses[i], reference.double(), rtol=1e-6), (i, losses[i], reference)
    _independent_and_exact(model, batch, det_batch([3, 2, 1, 5], seed=1, rotated=True, dtype=torch.float64))


@pytest.mark.parametrize("cfg", ["yolov8n-pose.yaml", "yolo26n-pose.yaml"])
def test_pose_loss_is_per_image_and_its_gradients_exact(cfg):
    """Keypoints (float64): each image's loss equals Ultralytics' v8PoseLoss / YOLO26's PoseLoss26
    (with its RLE flow term) on that image alone (to 1e-6; their loss buffers and RLE sigmas are
    float32), although Ultralytics averages the keypoint terms over the batch's foreground anchors;
    ignores the other images; per-image gradients match a naive loop; ghost = torch.func."""
    model = trainer_model(cfg).double()
    batch = pose_batch([0, 1, 4, 2], dtype=torch.float64)
    losses = per_sample_losses(model, batch)
    for i in range(4):
        reference = ultralytics_loss_alone(model, image(batch, i))
        assert torch.allclose(losses[i], reference.double(), rtol=1e-6), (i, losses[i], reference)
    _independent_and_exact(model, batch, pose_batch([3, 2, 1, 5], seed=1, dtype=torch.float64))


def test_an_unsupported_model_is_refused_by_name():
    from ultralytics import RTDETR

    with pytest.raises(ValueError, match="RTDETRDetectionModel.*supported"):
        check_supported(RTDETR("rtdetr-l.yaml").model)


def _independent_and_exact(model, batch, other):
    """Images 0-2's losses unchanged when image 3 and its labels come from ``other`` (1e-9, float64);
    per-image gradient norms equal a naive loop's (1e-6); clipped sums agree (``_clipped_sums_agree``)."""
    losses = per_sample_losses(model, batch)
    per_image = [k for k in ("img", "masks", "sem_masks") if k in batch]
    mixed = {k: torch.cat([batch[k][:3], other[k][3:]]) for k in per_image}
    keep, take = batch["batch_idx"] < 3, other["batch_idx"] >= 3
    labels = [k for k in ("batch_idx", "cls", "bboxes", "keypoints") if k in batch]
    mixed.update({k: torch.cat([batch[k][keep], other[k][take]]) for k in labels})
    assert torch.allclose(per_sample_losses(model, mixed)[:3], losses[:3], rtol=1e-9)

    naive = naive_image_grads(model, batch, len(batch["img"]))
    naive_norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in gs)) for gs in naive])
    assert torch.allclose(per_sample_grad_norms(model, batch).double(), naive_norms, rtol=1e-6)
    _clipped_sums_agree(model, batch, naive, naive_norms)


def _clipped_sums_agree(model, batch, naive, naive_norms):
    """ghost = torch.func clipped sums (1e-5), and torch.func = the naive loop's clipped sum (1e-5:
    the assigner's float32 targets, computed alone vs. in the batch)."""
    c = float(naive_norms[naive_norms > 0].min()) * 1.5  # clips some images, not all
    ref, _ = clipped_grad_sum(model, per_image_loss_fn(model), sample_batch(model, batch), max_grad_norm=c)
    ours, _ = clipped_grad_sum_ghost(model, lambda m: batch_losses(m, batch), max_grad_norm=c)
    flat = lambda d: torch.cat([d[k].flatten() for k in sorted(d)])  # noqa: E731
    assert ((flat(ours) - flat(ref)).norm() / flat(ref).norm()).item() <= 1e-5
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    expected = {name: sum(min(1.0, c / float(n)) * gs[j] for gs, n in zip(naive, naive_norms))
                for j, name in enumerate(names)}
    assert ((flat(ref) - flat(expected)).norm() / flat(expected).norm()).item() <= 1e-5


@pytest.mark.parametrize("cfg", ["yolo26n-seg.yaml", "yolov8n-seg.yaml"])
def test_segmentation_loss_is_per_image_and_its_gradients_exact(cfg):
    """Masks (and YOLO26's semantic branch): each image's loss equals Ultralytics' own on that image
    alone (float32: its assigners run in float32 only), and in float64 it is the same in any batch,
    ignores the other images, and its gradients match a naive loop."""
    model = trainer_model(cfg)
    batch = seg_batch([0, 1, 4, 2])
    for i in range(4):
        reference = ultralytics_loss_alone(model, image(batch, i))
        assert torch.allclose(per_sample_losses(model, image(batch, i))[0], reference, rtol=1e-5), i

    model = copy.deepcopy(model).double()
    batch = seg_batch([0, 1, 4, 2], dtype=torch.float64)
    losses = per_sample_losses(model, batch)
    alone = torch.cat([per_sample_losses(model, image(batch, i)) for i in range(4)])
    assert torch.allclose(losses, alone, rtol=1e-9)
    _independent_and_exact(model, batch, seg_batch([3, 2, 1, 5], seed=1, dtype=torch.float64))


def test_the_assigners_out_of_memory_warning_never_reaches_the_console(capsys, caplog):
    """After an out-of-memory error Ultralytics' assigner logs the chunk's size and its largest label
    count (private statistics); the assignment runs with the console closed."""
    model = trainer_model("yolo26n.yaml")
    batch = det_batch([1, 17, 2])
    for _, crit, _ in _branches(model):
        forward = crit.assigner._forward
        calls = []

        def out_of_memory_once(*args, forward=forward, calls=calls, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("CUDA out of memory (simulated)")
            return forward(*args, **kwargs)

        crit.assigner._forward = out_of_memory_once
    sample_batch(model, batch)
    printed = capsys.readouterr()
    assert "max_num_obj" not in printed.out + printed.err + caplog.text


@pytest.mark.parametrize("cfg", ["yolo26n-seg.yaml", "yolov8n-seg.yaml"])
def test_segmentation_with_one_mask_per_instance(cfg):
    """overlap_mask=False: masks come one per instance; the same equalities as with overlap."""
    model = trainer_model(cfg)
    model.args.overlap_mask = False
    batch = per_instance_masks(seg_batch([0, 1, 4, 2]))
    for i in range(4):
        reference = ultralytics_loss_alone(model, image(batch, i))
        assert torch.allclose(per_sample_losses(model, image(batch, i))[0], reference, rtol=1e-5), i
    model = copy.deepcopy(model).double()
    batch = per_instance_masks(seg_batch([0, 1, 4, 2], dtype=torch.float64))
    alone = torch.cat([per_sample_losses(model, image(batch, i)) for i in range(4)])
    assert torch.allclose(per_sample_losses(model, batch), alone, rtol=1e-9)


@pytest.mark.parametrize("cfg,dtype,make_batch", [
    ("yolov8n.yaml", torch.bfloat16, lambda: det_batch([2, 3], size=160)),  # DFL targets near reg_max (H200)
    ("yolov8n-obb.yaml", torch.float16, lambda: det_batch([1, 2, 0, 3], rotated=True)),  # an image without labels
    ("yolov8n-seg.yaml", torch.bfloat16, lambda: seg_batch([1, 2, 0, 3])),  # mask crop boxes
])
def test_losses_under_autocast_match_ultralytics(cfg, dtype, make_batch):
    """Under autocast (the trainer's amp=True, or bf16) the per-image losses stay finite and equal
    Ultralytics' own loss on each image alone under the same autocast. Casting the targets to the
    predictions' half precision once rounded the DFL clamp up to the last bin and indexed past it
    (bf16), made the loss of an image without labels NaN (fp16: its gradient silently dropped), and
    moved the mask crop boxes (bf16: mask losses up to 49% off)."""
    model = trainer_model(cfg)
    batch = make_batch()
    with torch.autocast("cpu", dtype=dtype):
        losses = per_sample_losses(model, batch)
        for i in range(len(batch["img"])):
            reference = ultralytics_loss_alone(model, image(batch, i)).float()
            assert torch.isfinite(losses[i]), (i, losses[i])
            assert torch.allclose(losses[i].float(), reference, rtol=1e-2), (i, losses[i], reference)


@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolov8n-obb.yaml", "yolo26n.yaml"])
def test_a_nan_label_is_ignored_as_ultralytics_ignores_it(cfg):
    """A box label with a NaN coordinate is never assigned, so Ultralytics' loss ignores it. Ours
    used to cast the background anchors' NaN distances to a DFL bin index and crash (IndexError;
    a device-side assert on CUDA) mid-run, or (YOLO26's L1) differ from Ultralytics'; now each
    image's loss equals Ultralytics' alone."""
    model = trainer_model(cfg)
    batch = det_batch([1, 2, 1], rotated="obb" in cfg)
    batch["bboxes"][1, 0] = float("nan")  # image 1's first box
    losses = per_sample_losses(model, batch)
    for i in range(3):
        reference = ultralytics_loss_alone(model, image(batch, i))
        assert torch.isfinite(losses[i]), (i, losses[i])
        assert torch.allclose(losses[i], reference, rtol=1e-4), (i, losses[i], reference)
