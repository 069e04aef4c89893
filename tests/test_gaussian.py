"""The Gaussian mechanism against independent computations: manual clipping, norm and
sensitivity bounds, statistical tests of the noise; and the layering rule (no Ultralytics)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from ultralytics_dp.mechanism.gaussian import add_, clipped_grad_sum, flatten, noisy_flat, private_mean, unflatten, views

from helpers import ce_loss, make, max_rel_err, naive_grads, weighted_loss


def test_clipped_sum_matches_manual_clipping():
    model, batch = make(torch.float64)
    c = 0.3
    ref = naive_grads(model, batch)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in ref.values()))
    factor = (c / (norms + 1e-6)).clamp(max=1)
    expected = {k: torch.einsum("b,b...->...", factor, g) for k, g in ref.items()}
    total, got_norms = clipped_grad_sum(model, ce_loss, batch, max_grad_norm=c)
    assert max_rel_err(total, expected) <= 1e-6
    assert torch.allclose(got_norms.double(), norms, rtol=1e-5)
    assert (norms > c).any(), "the test must actually clip something"


def test_each_clipped_gradient_bounded_and_sensitivity_at_most_c():
    model, batch = make(torch.float64, b=5)
    c = 0.2
    flat = lambda d: torch.cat([v.flatten() for v in d.values()])  # noqa: E731
    full = flat(clipped_grad_sum(model, ce_loss, batch, max_grad_norm=c)[0])
    for i in range(5):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        assert flat(clipped_grad_sum(model, ce_loss, one, max_grad_norm=c)[0]).norm() <= c * (1 + 1e-6)
        rest = {k: torch.cat([v[:i], v[i + 1 :]]) for k, v in batch.items()}
        without = flat(clipped_grad_sum(model, ce_loss, rest, max_grad_norm=c)[0])
        assert (full - without).norm() <= c * (1 + 1e-6)


def test_noise_statistics():
    sigma, c, n, draws = 1.3, 0.7, 1000, 200
    gen = torch.Generator().manual_seed(123)
    zero = {"w": torch.zeros(n, dtype=torch.float64)}
    samples = torch.stack(
        [noisy_flat(zero, noise_multiplier=sigma, max_grad_norm=c, generator=gen) for _ in range(draws)]
    )
    target = sigma * c
    per_coord_std = samples.std(dim=0)
    assert abs(per_coord_std.mean().item() / target - 1) < 0.03
    assert abs(samples.std().item() / target - 1) < 0.03
    se = target / math.sqrt(samples.numel())
    assert abs(samples.mean().item()) < 3 * se
    assert torch.equal(zero["w"], torch.zeros(n, dtype=torch.float64)), "input must not be modified"


def test_default_noise_ignores_global_seed():
    zero = {"w": torch.zeros(100)}
    torch.manual_seed(0)
    a = noisy_flat(zero, noise_multiplier=1.0, max_grad_norm=1.0)
    torch.manual_seed(0)
    b = noisy_flat(zero, noise_multiplier=1.0, max_grad_norm=1.0)
    assert not torch.equal(a, b)


def test_default_noise_differs_across_processes_with_same_seed():
    code = (
        "import torch; from ultralytics_dp.mechanism.gaussian import noisy_flat; torch.manual_seed(0);"
        "print(noisy_flat({'w': torch.zeros(4)}, noise_multiplier=1.0, max_grad_norm=1.0).tolist())"
    )
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert len(outs) == 2


def test_non_finite_sample_contributes_zero_and_others_unaffected():
    model, batch = make(torch.float64, b=5)
    batch["w"] = torch.ones(5, dtype=torch.float64)
    batch["w"][2] = float("nan")
    batch["w"][4] = float("inf")
    total, norms = clipped_grad_sum(model, weighted_loss, batch, max_grad_norm=0.5)
    assert (~torch.isfinite(norms)).sum().item() == 2
    good = {k: v[[0, 1, 3]] for k, v in batch.items()}
    expected, _ = clipped_grad_sum(model, weighted_loss, good, max_grad_norm=0.5)
    assert all(torch.isfinite(v).all() for v in total.values())
    assert max_rel_err(total, expected) <= 1e-10


def test_all_non_finite_step_still_adds_noise_and_stays_finite():
    model, batch = make(torch.float64, b=3)
    batch["w"] = torch.full((3,), float("nan"), dtype=torch.float64)
    total, norms = clipped_grad_sum(model, weighted_loss, batch, max_grad_norm=1.0)
    assert not torch.isfinite(norms).any()
    assert all((v == 0).all() for v in total.values())
    grad = private_mean(total, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=3.0)
    assert all(torch.isfinite(v).all() and (v != 0).any() for v in grad.values())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for name, p in model.named_parameters():
        p.grad = grad[name]
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_empty_batch_is_pure_noise_over_expected_size():
    model, batch = make(torch.float64, b=4)
    empty = {k: v[:0] for k, v in batch.items()}
    total, norms = clipped_grad_sum(model, ce_loss, empty, max_grad_norm=1.0)
    assert norms.numel() == 0 and all((v == 0).all() for v in total.values())
    sigma, c, expected = 2.0, 1.0, 8.0
    g1 = torch.Generator().manual_seed(5)
    g2 = torch.Generator().manual_seed(5)
    grad = private_mean(total, noise_multiplier=sigma, max_grad_norm=c, expected_batch_size=expected, generator=g1)
    # the independent reference: the same Gaussian draws (one for all coordinates, in parameter order), scaled by hand
    draws = torch.randn(sum(v.numel() for v in total.values()), generator=g2, dtype=torch.float64)
    start = 0
    for k, v in total.items():
        assert grad[k].shape == v.shape
        assert torch.allclose(grad[k].flatten(), draws[start:start + v.numel()] * sigma * c / expected)
        start += v.numel()


@pytest.mark.parametrize(
    "kwargs", [{"noise_multiplier": -1.0, "max_grad_norm": 1.0}, {"noise_multiplier": 1.0, "max_grad_norm": 0.0},
               {"noise_multiplier": float("nan"), "max_grad_norm": 1.0}]
)
def test_noise_rejects_bad_input(kwargs):
    with pytest.raises(ValueError):
        noisy_flat({"w": torch.zeros(2)}, **kwargs)


def test_mechanism_and_accounting_do_not_import_ultralytics():
    code = (
        "import sys, ultralytics_dp.mechanism.grad_sample, ultralytics_dp.mechanism.gaussian, ultralytics_dp.mechanism.sampling, ultralytics_dp.mechanism.ghost,"
        " ultralytics_dp.accounting.pld, ultralytics_dp.accounting.ledger, ultralytics_dp.accounting.planning, ultralytics_dp.config,"
        " ultralytics_dp.integration.checkpoint, ultralytics_dp.mechanism.distributed;"
        "print('ultralytics' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"



def test_secure_noise_statistics_and_no_seed():
    sigma, c = 1.3, 0.7
    zero = {"w": torch.zeros(200_000, dtype=torch.float64)}
    torch.manual_seed(0)
    a = noisy_flat(zero, noise_multiplier=sigma, max_grad_norm=c, secure=True)
    torch.manual_seed(0)
    b = noisy_flat(zero, noise_multiplier=sigma, max_grad_norm=c, secure=True)
    assert not torch.equal(a, b)
    for sample in (a, b):
        assert abs(sample.std().item() / (sigma * c) - 1) < 0.03
        assert abs(sample.mean().item()) < 3 * sigma * c / math.sqrt(sample.numel())
        kurtosis = ((sample / sample.std()) ** 4).mean().item()
        assert abs(kurtosis - 3) < 0.1  # Gaussian tails, not a sum of uniforms
    with pytest.raises(ValueError, match="secure"):
        noisy_flat(zero, noise_multiplier=1.0, max_grad_norm=1.0, secure=True, generator=torch.Generator())


def test_noise_refuses_gradients_of_mixed_dtype():
    with pytest.raises(ValueError, match="one device and dtype"):
        noisy_flat({"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.float64)}, noise_multiplier=1.0,
                   max_grad_norm=1.0)


def test_sums_that_are_views_of_one_buffer_keep_their_coordinates():
    """The ghost path returns each parameter's sum as a view of one flat buffer in parameter order;
    the noise is added to a copy of it. Every process of a multi-process run must flatten its sums
    in the same order whatever their layout (the all-reduce adds coordinates by position), and each
    parameter must get back its own coordinates plus noise: checked against copies made before,
    with the noise drawn by hand from the same generator."""
    shapes = {"a": (2, 3), "b": (4,), "c": (1, 2, 2)}
    buffer = torch.arange(14, dtype=torch.float64)
    in_order = {"a": (0, torch.Size(shapes["a"])), "b": (6, torch.Size(shapes["b"])), "c": (10, torch.Size(shapes["c"]))}
    permuted = {"a": (8, torch.Size(shapes["a"])), "b": (0, torch.Size(shapes["b"])), "c": (4, torch.Size(shapes["c"]))}
    for layout in (in_order, permuted):
        sums = views(buffer, layout)
        expected = {k: buffer[o:o + torch.Size(s).numel()].view(s).clone() for k, (o, s) in layout.items()}
        concatenated = torch.cat([v.flatten() for v in expected.values()])  # dict order, independently
        assert torch.equal(flatten(sums), concatenated) and flatten(sums).data_ptr() != buffer.data_ptr()
        assert all(torch.equal(unflatten(flatten(sums), sums)[k], expected[k]) for k in shapes)

        draws = torch.randn(14, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        noisy = private_mean(sums, noise_multiplier=2.0, max_grad_norm=0.5, expected_batch_size=4.0,
                             generator=torch.Generator().manual_seed(3))
        start = 0
        for k, v in expected.items():
            assert torch.allclose(noisy[k], (v + draws[start:start + v.numel()].view(v.shape)) / 4.0)
            start += v.numel()
        assert all(torch.equal(sums[k], expected[k]) for k in shapes)  # the sums themselves are not noised

    sums = views(buffer, in_order)
    before = {k: v.clone() for k, v in sums.items()}
    add_(sums, views(torch.ones(14, dtype=torch.float64), in_order))  # both tile a buffer: one addition
    add_(sums, {k: torch.ones(s, dtype=torch.float64) for k, s in shapes.items()})  # per tensor
    add_(sums, views(torch.ones(14, dtype=torch.float64), permuted))  # per tensor (not in dict order)
    assert all(torch.equal(sums[k], before[k] + 3) for k in shapes)
    overlapping = {"a": buffer[:6].view(2, 3), "b": buffer[4:8]}  # not a tiling: concatenated
    assert torch.equal(flatten(overlapping), torch.cat([buffer[:6], buffer[4:8]]))
