"""Per-image Ultralytics losses: equal to Ultralytics' own loss on a batch of one, independent of
the other images, and exact per-image gradients against a naive loop."""

from __future__ import annotations

import pytest
import torch

from ultralytics_dp import per_sample_grad_norms, per_sample_losses
from ultralytics_dp.ghost import clipped_grad_sum_ghost
from ultralytics_dp.losses import batch_losses, per_image_loss_fn, sample_batch
from ultralytics_dp.mechanism import clipped_grad_sum

from helpers import det_batch, image, naive_image_grads, trainer_model, ultralytics_loss_alone


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
    other = det_batch([3, 2, 1, 5], seed=1, rotated=True, dtype=torch.float64)
    mixed = {**other, "img": torch.cat([batch["img"][:3], other["img"][3:]])}
    keep, take = batch["batch_idx"] < 3, other["batch_idx"] >= 3
    mixed.update({k: torch.cat([batch[k][keep], other[k][take]]) for k in ("batch_idx", "cls", "bboxes")})
    assert torch.allclose(per_sample_losses(model, mixed)[:3], losses[:3], rtol=1e-9)

    naive = naive_image_grads(model, batch, 4)
    naive_norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in gs)) for gs in naive])
    assert torch.allclose(per_sample_grad_norms(model, batch).double(), naive_norms, rtol=1e-6)
    c = float(naive_norms[naive_norms > 0].min()) * 1.5  # clips some images, not all
    ref, _ = clipped_grad_sum(model, per_image_loss_fn(model), sample_batch(model, batch), max_grad_norm=c)
    ours, _ = clipped_grad_sum_ghost(model, lambda m: batch_losses(m, batch), max_grad_norm=c)
    flat = lambda d: torch.cat([d[k].flatten() for k in sorted(d)])  # noqa: E731
    assert ((flat(ours) - flat(ref)).norm() / flat(ref).norm()).item() <= 1e-5
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    expected = {name: sum(min(1.0, c / float(n)) * gs[j] for gs, n in zip(naive, naive_norms))
                for j, name in enumerate(names)}
    # 1e-5: the assigner's targets are float32 (as in Ultralytics), computed alone vs. in the batch
    assert ((flat(ref) - flat(expected)).norm() / flat(expected).norm()).item() <= 1e-5
