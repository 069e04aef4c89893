"""One private step: clipped sums over physical chunks, one noise draw, division by q*N."""

from __future__ import annotations

import pytest
import torch

from ultralytics_dp.losses.per_image import per_image_loss_fn, sample_batch
from ultralytics_dp.mechanism.gaussian import clipped_grad_sum
from ultralytics_dp.integration.private_step import private_gradient
from ultralytics_dp.losses.batch import select

from helpers import det_batch, image, trainer_model


def test_private_gradient_divides_by_the_expected_batch_size():
    """The realised Poisson batch size is private: the step divides by q*N, never by B."""
    model = trainer_model("yolo26n-cls.yaml")
    batch = {"img": torch.rand(3, 3, 32, 32), "cls": torch.tensor([1, 2, 3])}
    grad = private_gradient(model, batch, method="ghost", max_grad_norm=0.5, noise_multiplier=0.0,
                            expected_batch_size=10.0, physical_batch=2)
    total, _ = clipped_grad_sum(model, per_image_loss_fn(model), sample_batch(model, batch), max_grad_norm=0.5)
    for k in total:
        assert torch.allclose(grad[k], total[k] / 10.0, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_physical_chunks_give_the_sum_of_each_image_alone(method):
    """Chunks re-index the detection labels: the step over chunks of 2 equals the sum of each
    image's clipped gradient computed alone (a naive loop), for either back-end."""
    model = trainer_model("yolo26n.yaml")
    batch = det_batch([2, 0, 3, 1, 1])
    grad = private_gradient(model, batch, method=method, max_grad_norm=0.05, noise_multiplier=0.0,
                            expected_batch_size=1.0, physical_batch=2)
    alone = [clipped_grad_sum(model, per_image_loss_fn(model), sample_batch(model, image(batch, i)),
                              max_grad_norm=0.05)[0] for i in range(5)]
    for k in grad:
        expected = sum(a[k] for a in alone)
        assert torch.allclose(grad[k], expected, rtol=1e-4, atol=1e-7), k



@pytest.mark.parametrize("cfg", ["yolo26n.yaml", "yolo26n-cls.yaml"])
@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_augmentation_multiplicity_clips_the_mean_of_each_records_views(cfg, method):
    """views=2: images (2r, 2r+1) are record r's views; its gradient is the mean of theirs, clipped
    once. Checked against a naive loop over records (autograd of the mean of the two per-image
    losses), with chunks that hold one or two whole records."""
    from ultralytics_dp.mechanism.grad_sample import trainable_params
    from ultralytics_dp.losses.per_image import per_sample_losses

    model = trainer_model(cfg)
    if cfg.endswith("-cls.yaml"):
        torch.manual_seed(0)
        batch = {"img": torch.rand(6, 3, 32, 32), "cls": torch.tensor([1, 1, 3, 3, 0, 0])}
    else:
        batch = det_batch([2, 1, 0, 1, 3, 2])
    params = trainable_params(model)
    expected = {k: torch.zeros_like(p) for k, p in params.items()}
    norms = []
    for r in range(3):
        loss = sum(per_sample_losses(model, image(batch, i))[0] for i in (2 * r, 2 * r + 1)) / 2
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.values())]
        norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads))
        norms.append(norm)
        for k, g in zip(params, grads):
            expected[k] += g * min(1.0, 0.05 / (norm.item() + 1e-6))
    assert max(norms) > 0.05  # clipping is exercised
    for physical_batch in (3, 4):  # one record per chunk, then two
        grad = private_gradient(model, batch, method=method, max_grad_norm=0.05, noise_multiplier=0.0,
                                expected_batch_size=1.0, physical_batch=physical_batch, views=2)
        flat = lambda d: torch.cat([d[k].flatten() for k in sorted(d)])  # noqa: E731
        assert ((flat(grad) - flat(expected)).norm() / flat(expected).norm()).item() <= 1e-5


def test_a_batch_of_partial_records_is_refused():
    model = trainer_model("yolo26n-cls.yaml")
    batch = {"img": torch.rand(3, 3, 32, 32), "cls": torch.tensor([1, 1, 2])}
    with pytest.raises(ValueError, match="whole records"):
        private_gradient(model, batch, method="ghost", max_grad_norm=1.0, noise_multiplier=0.0,
                         expected_batch_size=1.0, views=2)


def test_select_keeps_each_images_masks():
    """Segmentation chunks: one mask per image (overlap_mask) or per instance, and the class map."""
    batch = {"img": torch.arange(3.0).view(3, 1, 1, 1), "batch_idx": torch.tensor([0.0, 2, 2]),
             "cls": torch.tensor([[1.0], [2], [3]]), "bboxes": torch.rand(3, 4),
             "masks": torch.arange(3.0).view(3, 1, 1), "sem_masks": torch.arange(3.0).view(3, 1, 1) + 10}
    chunk = select(batch, [2, 0])
    assert chunk["masks"].view(-1).tolist() == [2.0, 0.0] and chunk["sem_masks"].view(-1).tolist() == [12.0, 10.0]
    assert chunk["batch_idx"].tolist() == [1.0, 0.0, 0.0] and chunk["cls"].view(-1).tolist() == [1.0, 2.0, 3.0]
    per_instance = select(batch, [2], overlap_masks=False)  # instances 1 and 2 belong to image 2
    assert per_instance["masks"].view(-1).tolist() == [1.0, 2.0] and per_instance["batch_idx"].tolist() == [0.0, 0.0]


def test_the_torch_func_path_runs_under_the_trainers_autocast():
    """With amp=True the step runs under autocast; torch.func's per-sample forward then failed in
    eval-mode BatchNorm ('expected scalar type BFloat16 but found Float', found by a review). The
    path now runs in the parameters' precision: the same clipped sum as without autocast, which an
    independent computation (the naive per-image clip below) checks."""
    model = trainer_model("yolov8n.yaml")
    batch = det_batch([1, 2, 0])
    c = 0.01
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = private_gradient(model, batch, method="vmap", max_grad_norm=c, noise_multiplier=0.0,
                                expected_batch_size=1.0)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    expected = {k: torch.zeros_like(p) for k, p in params.items()}
    for i in range(3):
        loss = per_image_loss_fn(model)(model, sample_batch(model, image(batch, i)))
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))
        norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads.values() if g is not None))
        for k, g in grads.items():
            if g is not None:
                expected[k] += g * min(1.0, c / (float(norm) + 1e-6))
    flat = lambda d: torch.cat([d[k].flatten() for k in sorted(d)])  # noqa: E731
    assert all(v.dtype == torch.float32 for v in ours.values())
    assert ((flat(ours) - flat(expected)).norm() / flat(expected).norm()).item() <= 1e-5
