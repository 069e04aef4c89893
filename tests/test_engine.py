"""The DP-SGD mechanism against independent computations: a naive per-sample autograd loop,
norm and sensitivity bounds, and statistical tests of the noise and the Poisson sampler."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from ultralytics_dp.engine import (
    PoissonBatchSampler,
    add_noise,
    clipped_grad_sum,
    per_sample_grads,
    private_mean,
    split_physical,
)


class Attention(nn.Module):
    """Single-head self-attention over spatial positions (matmul + softmax)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(c, 3 * c)
        self.norm = nn.LayerNorm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.norm(x.flatten(2).transpose(1, 2))
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1)
        return x + (a @ v).transpose(1, 2).reshape(b, c, h, w)


class SmallCNN(nn.Module):
    """Every layer type the engine promises to support."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU())
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.gn = nn.GroupNorm(2, 8)
        self.pool = nn.MaxPool2d(2)
        self.attn = Attention(8)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = nn.Linear(16 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.stem(x)
        b = self.pool(torch.nn.functional.silu(self.gn(self.dw(a))))
        b = self.up(self.attn(b))
        return self.head(torch.cat([a, b], dim=1).flatten(1))


def ce_loss(model_call, sample):
    return nn.functional.cross_entropy(model_call(sample["x"]), sample["y"])


def make(dtype=torch.float64, b=6, seed=0):
    torch.manual_seed(seed)
    model = SmallCNN().to(dtype)
    # non-trivial running stats, then BN frozen as the engine requires
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 8, 8, dtype=dtype))
    model.eval()
    batch = {"x": torch.randn(b, 3, 8, 8, dtype=dtype), "y": torch.randint(0, 5, (b,))}
    return model, batch


def naive_grads(model, batch, loss_fn=ce_loss):
    """Independent reference: autograd on each sample alone."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = {n: [] for n in params}
    n = next(iter(batch.values())).shape[0]
    for i in range(n):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        loss = loss_fn(model, one)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for name, g, p in zip(params, grads, params.values()):
            out[name].append(torch.zeros_like(p) if g is None else g)
    return {k: torch.stack(v) for k, v in out.items()}


def max_rel_err(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)).item() for k in b)


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
    s_full, n_full = clipped_grad_sum(model, ce_loss, batch, max_grad_norm=0.5)
    s_chunk, n_chunk = clipped_grad_sum(model, ce_loss, batch, max_grad_norm=0.5, chunk_size=chunk)
    assert max_rel_err(s_chunk, s_full) <= 1e-10
    assert torch.allclose(n_chunk.double(), n_full.double())


def test_frozen_parameters_get_no_gradient():
    model, batch = make(torch.float64)
    model.stem[0].weight.requires_grad_(False)
    grads = per_sample_grads(model, ce_loss, batch)
    assert "stem.0.weight" not in grads
    assert max_rel_err(grads, naive_grads(model, batch)) <= 1e-5


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
        [add_noise(zero, noise_multiplier=sigma, max_grad_norm=c, generator=gen)["w"] for _ in range(draws)]
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
    a = add_noise(zero, noise_multiplier=1.0, max_grad_norm=1.0)["w"]
    torch.manual_seed(0)
    b = add_noise(zero, noise_multiplier=1.0, max_grad_norm=1.0)["w"]
    assert not torch.equal(a, b)


def test_default_noise_differs_across_processes_with_same_seed():
    code = (
        "import torch; from ultralytics_dp.engine import add_noise; torch.manual_seed(0);"
        "print(add_noise({'w': torch.zeros(4)}, noise_multiplier=1.0, max_grad_norm=1.0)['w'].tolist())"
    )
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert len(outs) == 2


def test_poisson_sampler_statistics():
    n, q, steps = 200, 0.05, 4000
    sampler = PoissonBatchSampler(n, q, steps, generator=torch.Generator().manual_seed(1))
    assert len(sampler) == steps
    batches = list(sampler)
    assert len(batches) == steps
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    mean, var = n * q, n * q * (1 - q)
    assert abs(sizes.mean().item() - mean) < 5 * math.sqrt(var / steps)
    # the sample variance's standard error for a ~normal variable: var * sqrt(2 / (steps - 1))
    assert abs(sizes.var().item() - var) < 5 * var * math.sqrt(2 / (steps - 1))
    counts = torch.zeros(n)
    for b in batches:
        assert len(set(b)) == len(b) and all(0 <= i < n for i in b)
        counts[b] += 1
    freq = counts / steps
    se = math.sqrt(q * (1 - q) / steps)
    assert ((freq - q).abs() < 5 * se).all()


def test_poisson_sampler_yields_empty_batches():
    sampler = PoissonBatchSampler(10, 0.02, 500, generator=torch.Generator().manual_seed(0))
    sizes = [len(b) for b in sampler]
    assert len(sizes) == 500
    assert sizes.count(0) > 300  # P(empty) = 0.98^10 ≈ 0.82


def test_poisson_sampler_default_generator_ignores_global_seed():
    torch.manual_seed(0)
    a = list(PoissonBatchSampler(100, 0.5, 3))
    torch.manual_seed(0)
    b = list(PoissonBatchSampler(100, 0.5, 3))
    assert a != b


@pytest.mark.parametrize(
    "args", [(0, 0.1, 1), (10, 0.0, 1), (10, 1.5, 1), (10, 0.1, -1), (10.5, 0.1, 1)]
)
def test_poisson_sampler_rejects_bad_input(args):
    with pytest.raises(ValueError):
        PoissonBatchSampler(*args)


def test_split_physical():
    idx = list(range(10))
    parts = split_physical(idx, 4)
    assert parts == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert split_physical([], 4) == []
    with pytest.raises(ValueError, match="max_physical_batch_size"):
        split_physical(idx, 0)


def weighted_loss(model_call, sample):
    return ce_loss(model_call, sample) * sample["w"].sum()


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
    for k, v in total.items():
        # the independent reference: the same Gaussian draws, scaled by hand
        assert torch.allclose(grad[k], torch.randn(v.shape, generator=g2, dtype=v.dtype) * sigma * c / expected)


def test_train_mode_batchnorm_raises():
    model, batch = make(torch.float64)
    model.stem[1].train()
    with pytest.raises(ValueError, match="stem.1"):
        per_sample_grads(model, ce_loss, batch)


@pytest.mark.parametrize(
    "kwargs", [{"noise_multiplier": -1.0, "max_grad_norm": 1.0}, {"noise_multiplier": 1.0, "max_grad_norm": 0.0},
               {"noise_multiplier": float("nan"), "max_grad_norm": 1.0}]
)
def test_add_noise_rejects_bad_input(kwargs):
    with pytest.raises(ValueError):
        add_noise({"w": torch.zeros(2)}, **kwargs)


def test_engine_does_not_import_ultralytics():
    code = (
        "import sys, ultralytics_dp.engine, ultralytics_dp.sampling, ultralytics_dp.accounting, ultralytics_dp.ledger,"
        " ultralytics_dp.ghost;"
        "print('ultralytics' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_ghost_path_on_plain_layers_and_refusals():
    """The ghost path against the torch.func path on a conv/linear/BN net with a frozen conv weight
    (bias still trained), and its refusal of tied weights and unsupported layers."""
    from ultralytics_dp.ghost import clipped_grad_sum_ghost, supports

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.SiLU(), nn.Conv2d(6, 6, 3, stride=2, groups=3),
        nn.Flatten(), nn.Linear(6 * 3 * 3, 4),
    ).double().eval()
    model[0].weight.requires_grad_(False)
    batch = {"x": torch.randn(5, 3, 8, 8, dtype=torch.float64), "y": torch.randint(0, 4, (5,))}

    def losses(m):
        return nn.functional.cross_entropy(m(batch["x"]), batch["y"], reduction="none")

    assert supports(model)
    ref, ref_norms = clipped_grad_sum(model, ce_loss, batch, max_grad_norm=0.1)
    ours, norms = clipped_grad_sum_ghost(model, losses, max_grad_norm=0.1)
    assert torch.allclose(norms.double(), ref_norms.double(), rtol=1e-5)
    assert "0.weight" not in ours and set(ours) == set(ref)
    assert max_rel_err(ours, ref) <= 1e-5

    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    assert not supports(tied)
    assert not supports(SmallCNN())  # GroupNorm / LayerNorm are not handled by the ghost path
    with pytest.raises(ValueError, match="max_grad_norm"):
        clipped_grad_sum_ghost(model, losses, max_grad_norm=0.0)
