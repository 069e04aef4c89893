"""Ghost clipping against the torch.func path, on plain layers and on YOLO models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ultralytics_dp.integration.norms import to_group_norm
from ultralytics_dp.losses.per_image import batch_losses, per_image_loss_fn, sample_batch
from ultralytics_dp.mechanism.gaussian import clipped_grad_sum
from ultralytics_dp.mechanism.ghost import clipped_grad_sum_ghost, supports

from helpers import SmallCNN, ce_loss, det_batch, image, max_rel_err, seg_batch, trainer_model


@pytest.mark.parametrize("seed", range(8))
def test_an_image_whose_positions_nearly_cancel_is_still_clipped_to_c(seed):
    """A float32 1x1 convolution (ghost form) where two positions' gradients nearly cancel: the ghost
    identity's T^2 products are ~1e12 while the image's squared norm is ~1e5, which float32 Gram
    products cannot resolve (the estimate came out 0 and the image was added unclipped, 1000 C).
    The clipped contribution must be within float32 rounding of the float64 reference, so <= C."""
    gen = torch.Generator().manual_seed(seed)
    d, c = 64, 1.0

    def unit(scale):
        v = torch.randn(d, generator=gen)
        return v / v.norm() * scale

    a, b, delta = unit(1662.0), unit(1662.0), unit(0.2 + seed / 10)
    x, out_grad = torch.zeros(1, d, 4, 4), torch.zeros(1, d, 4, 4)
    x[0, :, 0, 0] = x[0, :, 0, 1] = a
    out_grad[0, :, 0, 0], out_grad[0, :, 0, 1] = b, -b + delta
    model = nn.Sequential(nn.Conv2d(d, d, 1, bias=False))
    # loss = <conv(x), out_grad>: its gradient with respect to the conv's output is out_grad exactly
    sums, norms = clipped_grad_sum_ghost(model, lambda m: (m(x) * out_grad).flatten(1).sum(1), max_grad_norm=c)

    exact = torch.einsum("ot,dt->od", out_grad[0].flatten(1).double(), x[0].flatten(1).double())
    reference = exact * min(1.0, c / exact.norm().item())
    clipped = sums["0.weight"].double().reshape(d, d)
    assert exact.norm().item() <= norms[0].item() <= exact.norm().item() * (1 + 1e-4)  # an upper bound, tight
    assert clipped.norm().item() <= c * (1 + 1e-3)
    assert (clipped - reference).norm().item() <= 1e-3 * c


@pytest.mark.parametrize("threads", [1, 2])
def test_ghost_path_on_plain_layers_and_refusals(threads):
    """The ghost path against the torch.func path on a conv/linear/BN/GroupNorm net with a frozen
    conv weight (bias still trained), and its refusal of tied weights and unsupported layers; with
    2 intra-op threads the per-layer work runs one layer per thread, and the thread count is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.SiLU(), nn.Conv2d(6, 6, 3, padding=2, dilation=2),
        nn.Conv2d(6, 6, 3, stride=2, groups=3),
        nn.GroupNorm(3, 6), nn.ConvTranspose2d(6, 4, 2, stride=2), nn.SiLU(), nn.ConvTranspose2d(4, 4, 3, padding=1),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 4),
    ).double().eval()
    with torch.no_grad():  # GroupNorm's affine parameters away from their init (1, 0)
        model[5].weight.uniform_(0.5, 1.5)
        model[5].bias.uniform_(-0.5, 0.5)
    model[0].weight.requires_grad_(False)
    batch = {"x": torch.randn(5, 3, 8, 8, dtype=torch.float64), "y": torch.randint(0, 4, (5,))}

    def losses(m):
        return nn.functional.cross_entropy(m(batch["x"]), batch["y"], reduction="none")

    assert supports(model)
    ref, ref_norms = clipped_grad_sum(model, ce_loss, batch, max_grad_norm=0.1)
    try:
        ours, norms = clipped_grad_sum_ghost(model, losses, max_grad_norm=0.1)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert torch.allclose(norms.double(), ref_norms.double(), rtol=1e-5)
    assert "0.weight" not in ours and set(ours) == set(ref)
    assert max_rel_err(ours, ref) <= 1e-5

    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    assert not supports(tied)
    assert not supports(SmallCNN())  # its attention's LayerNorm is not handled by the ghost path
    with pytest.raises(ValueError, match="max_grad_norm"):
        clipped_grad_sum_ghost(model, losses, max_grad_norm=0.0)



@pytest.mark.parametrize("frozen", ["1.weight", "1.bias"])
def test_a_batchnorm_with_one_affine_parameter_frozen(frozen):
    """Eval BatchNorm with running statistics away from (0, 1) and only its weight or only its bias
    trained: its weight term needs the output gradient's sum whether or not the bias is trained."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.SiLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3)).double().eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-2.0, 2.0)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
    dict(model.named_parameters())[frozen].requires_grad_(False)
    batch = {"x": torch.randn(4, 3, 6, 6, dtype=torch.float64), "y": torch.randint(0, 3, (4,))}

    def losses(m):
        return nn.functional.cross_entropy(m(batch["x"]), batch["y"], reduction="none")

    ref, ref_norms = clipped_grad_sum(model, ce_loss, batch, max_grad_norm=0.1)
    ours, norms = clipped_grad_sum_ghost(model, losses, max_grad_norm=0.1)
    assert frozen not in ours and set(ours) == set(ref)
    assert torch.allclose(norms.double(), ref_norms.double(), rtol=1e-5)
    assert max_rel_err(ours, ref) <= 1e-5


@pytest.mark.parametrize("cfg,norm", [("yolo26n.yaml", "batch"), ("yolov8n.yaml", "batch"),
                                      ("yolo26n-cls.yaml", "batch"), ("yolo26n.yaml", "group"),
                                      ("yolo26n-cls.yaml", "group")])
@pytest.mark.parametrize("max_grad_norm", [1e6, 0.003])
def test_ghost_path_matches_torch_func_path(cfg, norm, max_grad_norm):
    model = trainer_model(cfg)
    if norm == "group":
        to_group_norm(model)
    assert supports(model)
    if cfg.endswith("-cls.yaml"):
        batch = {"img": torch.rand(5, 3, 32, 32), "cls": torch.tensor([1, 2, 3, 4, 0])}
    else:
        batch = det_batch([1, 0, 3, 2, 5])
    ref, ref_norms = clipped_grad_sum(model, per_image_loss_fn(model), sample_batch(model, batch),
                                      max_grad_norm=max_grad_norm)
    ours, norms = clipped_grad_sum_ghost(model, lambda m: batch_losses(m, batch), max_grad_norm=max_grad_norm)
    assert torch.allclose(norms, ref_norms, rtol=1e-5)
    flat = lambda d: torch.cat([d[k].flatten() for k in sorted(d)])  # noqa: E731
    assert ((flat(ours) - flat(ref)).norm() / flat(ref).norm()).item() <= 1e-5
    if max_grad_norm < 1:
        assert (ref_norms > max_grad_norm).any()  # clipping was exercised


@pytest.mark.parametrize("host_checks", [True, False])
def test_ghost_path_skips_a_non_finite_image(host_checks, monkeypatch):
    """With and without the host's finiteness check (on an accelerator the non-finite values are
    zeroed without asking the host, so that path is exercised here on CPU too)."""
    model = trainer_model("yolo26n.yaml")
    batch = det_batch([1, 2, 1])
    bad = {**batch, "img": batch["img"].clone()}
    bad["img"][1] = float("nan")
    if not host_checks:
        from ultralytics_dp.mechanism import ghost

        checked, _ = clipped_grad_sum_ghost(model, lambda m: batch_losses(m, batch), max_grad_norm=0.5)
        monkeypatch.setattr(ghost, "_host_checks_finiteness", lambda device: False)
        unchecked, _ = clipped_grad_sum_ghost(model, lambda m: batch_losses(m, batch), max_grad_norm=0.5)
        assert all(torch.equal(checked[k], unchecked[k]) for k in checked)
    total, norms = clipped_grad_sum_ghost(model, lambda m: batch_losses(m, bad), max_grad_norm=0.5)
    assert torch.isfinite(norms[[0, 2]]).all() and not torch.isfinite(norms[1])
    keep = batch["batch_idx"] != 1
    rest = {"img": batch["img"][[0, 2]], "batch_idx": (batch["batch_idx"][keep] > 1).float(),
            "cls": batch["cls"][keep], "bboxes": batch["bboxes"][keep]}
    expected, _ = clipped_grad_sum_ghost(model, lambda m: batch_losses(m, rest), max_grad_norm=0.5)
    for k in expected:
        assert torch.isfinite(total[k]).all()
        assert torch.allclose(total[k], expected[k], rtol=1e-4, atol=1e-7)


def test_ghost_path_under_bf16_autocast_matches_the_fp32_reference():
    """amp=True: autocast saves bf16 layer inputs while some output gradients stay fp32; the ghost
    norms must still be computed (they used to fail on mixed dtypes) and stay close to fp32's."""
    model = trainer_model("yolo26n-cls.yaml")
    batch = {"img": torch.rand(4, 3, 32, 32), "cls": torch.tensor([1, 2, 3, 0])}
    ref, ref_norms = clipped_grad_sum(model, per_image_loss_fn(model), sample_batch(model, batch), max_grad_norm=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, norms = clipped_grad_sum_ghost(model, lambda m: batch_losses(m, batch), max_grad_norm=0.5)
    assert all(ours[k].dtype == ref[k].dtype for k in ref)
    assert torch.allclose(norms.double(), ref_norms.double(), rtol=0.05)
    flat = lambda d: torch.cat([d[k].double().flatten() for k in sorted(d)])  # noqa: E731
    assert ((flat(ours) - flat(ref)).norm() / flat(ref).norm()).item() <= 0.05


@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolov8n-seg.yaml"])
def test_under_bf16_autocast_a_clipped_image_adds_at_most_c(cfg):
    """The sensitivity under the trainer's autocast: each image alone, clipped to a C below its
    norm, adds a vector of norm <= C. The ghost norms and weighted sums used to run in bf16, so a
    clipped image could add about 1.002 C (found by an independent review)."""
    model = trainer_model(cfg)
    batch = seg_batch([1, 2, 3]) if "-seg" in cfg else det_batch([1, 2, 3])
    c = 0.002
    for i in range(3):
        one = image(batch, i)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            total, norms = clipped_grad_sum_ghost(model, lambda m: batch_losses(m, one), max_grad_norm=c)
        assert norms[0] > c
        size = torch.sqrt(sum(v.double().pow(2).sum() for v in total.values()))
        assert size <= c * (1 + 1e-5), (i, float(size / c))


def test_a_layer_called_twice_in_ghost_and_in_gradient_form():
    """YOLO26 pose runs its flow's Linear layers in both branches, on different numbers of
    positions, so one call took the ghost form ([B, 1, O, D]) and the other the gradient form
    ([B, O, D]); their sum broadcast to [B, B, O, D] (wrong norms, then a crash)."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, 10, 2]: 1 position, then 10
            return self.lin(x[:, :1]).pow(2).sum((1, 2)) + self.lin(x).tanh().sum((1, 2))

    torch.manual_seed(0)
    model = Twice().double()
    batch = {"x": torch.randn(4, 10, 2, dtype=torch.float64)}
    ref, ref_norms = clipped_grad_sum(model, lambda call, s: call(s["x"]).sum(), batch, max_grad_norm=1.0)
    ours, norms = clipped_grad_sum_ghost(model, lambda m: m(batch["x"]), max_grad_norm=1.0)
    assert torch.allclose(norms.double(), ref_norms.double(), rtol=1e-10)
    assert max_rel_err(ours, ref) <= 1e-10


def test_a_squared_norm_summed_over_many_groups_is_still_an_upper_bound():
    """4096 groups of one position each: the flat sum of their Gram products drops each tiny group's
    square (under half an ulp of the running total near 2); the rounding allowance must count every
    term summed, not one group's."""
    from fractions import Fraction

    from ultralytics_dp.mechanism.ghost import _sq_norm

    groups = 4096
    x = torch.full((groups,), 0.70710677 * 2**-26, dtype=torch.float32)
    x[0] = 1.4142135
    left, right = x.view(1, groups, 1, 1), torch.ones(1, groups, 1, 1)
    exact = sum(Fraction(float(v)) ** 2 for v in x)
    assert Fraction(_sq_norm(left, right).item()) >= exact


@pytest.mark.parametrize("kernel,stride,padding,dilation,groups", [
    (1, 1, 0, 1, 1), (1, 1, 0, 1, 2), (1, 2, 0, 1, 1), (1, 1, 1, 1, 1), (3, 1, 1, 1, 1), (3, 2, 1, 1, 4),
    (3, 1, 2, 2, 1), ((3, 5), (2, 1), (0, 2), (1, 2), 2), (3, 1, 1, 1, 8)])
def test_conv_patches_are_torch_unfolds(kernel, stride, padding, dilation, groups):
    """The per-sample gradients and ghost factors of a convolution read its input's patches from a
    strided view; ``F.unfold`` is the independent reference, on a non-contiguous input (YOLO's
    blocks convolve channel slices of a chunked tensor)."""
    from ultralytics_dp.mechanism.ghost import _conv_unfold

    conv = nn.Conv2d(8, 8, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups)
    x = torch.randn(3, 16, 9, 11)[:, ::2]
    cols = nn.functional.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    assert torch.equal(_conv_unfold(conv, x), cols.view(3, groups, -1, cols.shape[-1]))


def test_a_model_that_is_one_layer_and_a_layer_with_an_extra_parameter():
    """A bare layer's parameters are named "weight", not ".weight": its sum must be its own
    (against the torch.func path), not zeros. A supported layer type that carries a parameter the
    ghost path has no per-sample term for is refused rather than summed from uninitialised memory."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    batch = {"x": torch.randn(4, 5, dtype=torch.float64), "y": torch.randint(0, 3, (4,))}
    ref, ref_norms = clipped_grad_sum(model, ce_loss, batch, max_grad_norm=0.5)
    ours, norms = clipped_grad_sum_ghost(
        model, lambda m: nn.functional.cross_entropy(m(batch["x"]), batch["y"], reduction="none"), max_grad_norm=0.5)
    assert torch.allclose(norms.double(), ref_norms.double(), rtol=1e-10)
    assert max_rel_err(ours, ref) <= 1e-10 and all(v.abs().sum() > 0 for v in ours.values())

    class Scaled(nn.Conv2d):
        def __init__(self) -> None:
            super().__init__(3, 4, 1)
            self.gain = nn.Parameter(torch.ones(4, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * self.gain

    scaled = nn.Sequential(Scaled())
    with pytest.raises(RuntimeError, match=r"no per-sample term for \['0.gain'\].*vmap"):
        clipped_grad_sum_ghost(scaled, lambda m: m(torch.randn(2, 3, 4, 4)).flatten(1).sum(1), max_grad_norm=1.0)


def test_row_norms_in_float32_runs_are_upper_bounds_within_4e_6():
    """The gradient matrix's squared row norms are summed in float32 over runs of 64 columns: never
    below the exact sum of squares (math.fsum over the float32 values, whose squares are exact in
    float64), and at most 4e-6 relative above it (2e-6 on the norm); a row of one large value and many tiny ones, which
    a float32 running sum would drop, included."""
    import math

    from ultralytics_dp.mechanism.ghost import _rows_sq_norm

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 1000, generator=gen) * torch.logspace(-3, 3, 40).view(-1, 1)
    spiky = torch.full((1, 1000), 2.0**-13)
    spiky[0, 0] = 1.0
    x = torch.cat([x, spiky])
    for cols in (1000, 960, 7):  # a remainder run, whole runs only, one short run
        part = x[:, :cols]
        got = _rows_sq_norm(part)
        for row, value in zip(part.double().tolist(), got.tolist()):
            exact = math.fsum(v * v for v in row)
            assert exact <= value <= exact * (1 + 4e-6)


def test_layers_whose_terms_are_not_per_image_are_refused():
    """Found in review. A layer run once on an input that is not the batch's (a learnt query,
    broadcast to every image) has a [1, ...] term: the sum over all images, which was copied into
    every image's row (one image moved the sum by 14 C). An output changed in place after the layer
    (ReLU(inplace=True)) makes its gradient the activation's. An eval-mode BatchNorm without running
    statistics normalises with the batch's, mixing images. Each is refused (or not supported, so
    'auto' picks the torch.func path)."""

    class Query(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f, self.q = nn.Linear(4, 1), nn.Linear(4, 1)
            self.register_buffer("e", torch.ones(1, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.f(x) * self.q(self.e)

    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"layer 'q' runs on a batch of 1, not on the 6 images.*vmap"):
        clipped_grad_sum_ghost(Query(), lambda m: m(x).pow(2).sum(1), max_grad_norm=1.0)
    inplace = nn.Sequential(nn.Linear(4, 3), nn.ReLU(inplace=True))
    with pytest.raises(ValueError, match=r"layer '0': its output is changed in place.*vmap"):
        clipped_grad_sum_ghost(inplace, lambda m: m(x).pow(2).sum(1), max_grad_norm=1.0)
    batch_statistics = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False)).eval()
    assert not supports(batch_statistics)
    with pytest.raises(ValueError, match="BatchNorm with running statistics"):
        clipped_grad_sum_ghost(batch_statistics, lambda m: m(x).pow(2).sum(1), max_grad_norm=1.0)
