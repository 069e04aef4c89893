"""Per-sample gradients with torch.func against a naive per-sample autograd loop."""

from __future__ import annotations

import pytest
import torch

from ultralytics_dp.mechanism.grad_sample import per_sample_grads

from helpers import ce_loss, make, max_rel_err, naive_grads


def test_per_sample_grads_match_naive_loop_float64():
    model, batch = make(torch.float64)
    ours = per_sample_grads(model, ce_loss, batch)
    ref = naive_grads(model, batch)
    assert set(ours) == set(ref)
    for k in ref:
        assert ours[k].shape == ref[k].shape
    assert max_rel_err(ours, ref) <= 1e-5


def test_per_sample_grads_match_naive_loop_float32():
    model, batch = make(torch.float32)
    assert max_rel_err(per_sample_grads(model, ce_loss, batch), naive_grads(model, batch)) <= 1e-4


@pytest.mark.parametrize("chunk", [1, 3, 6])
def test_chunk_size_gives_same_result(chunk):
    model, batch = make(torch.float64, b=6)
    full = per_sample_grads(model, ce_loss, batch)
    assert max_rel_err(per_sample_grads(model, ce_loss, batch, chunk_size=chunk), full) <= 1e-10


def test_frozen_parameters_get_no_gradient():
    model, batch = make(torch.float64)
    model.stem[0].weight.requires_grad_(False)
    grads = per_sample_grads(model, ce_loss, batch)
    assert "stem.0.weight" not in grads
    assert max_rel_err(grads, naive_grads(model, batch)) <= 1e-5


def test_train_mode_batchnorm_raises():
    model, batch = make(torch.float64)
    model.stem[1].train()
    with pytest.raises(ValueError, match="stem.1"):
        per_sample_grads(model, ce_loss, batch)


def test_a_loss_that_calls_the_models_own_modules_gets_their_gradients():
    """YOLO26 pose's loss runs the head's flow after the forward. The parameters used to be
    substituted for the forward only, so such modules got a zero per-sample gradient."""

    class Body(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = torch.nn.Linear(3, 4), torch.nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)  # the head is not part of the forward

    torch.manual_seed(0)
    model = Body().double()
    batch = {"x": torch.randn(5, 3, dtype=torch.float64)}

    def loss_fn(model_call, sample):
        return model.head(model_call(sample["x"])).pow(2).sum()

    ours = per_sample_grads(model, loss_fn, batch)
    for i in range(5):
        model.zero_grad()
        loss_fn(model, {"x": batch["x"][i : i + 1]}).backward()
        for name, p in model.named_parameters():
            assert torch.allclose(ours[name][i], p.grad, rtol=1e-10), (name, i)
