"""One private step: clipped sums over physical chunks, one noise draw, division by q*N."""

from __future__ import annotations

import pytest
import torch

from ultralytics_dp.losses import per_image_loss_fn, sample_batch
from ultralytics_dp.mechanism import clipped_grad_sum
from ultralytics_dp.private_step import private_gradient

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

