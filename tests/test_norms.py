"""GroupNorm in place of BatchNorm: the conversion, that it mixes no images, and that its models
load, fuse, validate, resume and fine-tune with their weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from ultralytics import YOLO
from ultralytics.nn.modules import Conv
from ultralytics.nn.tasks import ClassificationModel

from ultralytics_dp import DifferentialPrivacy
from ultralytics_dp.losses.per_image import batch_losses
from ultralytics_dp.integration.norms import build_with, has_group_norm, to_group_norm, untrained_batch_norm, wants_group_norm

from helpers import det_batch, trainer_model, train_tiny


def test_converted_conv_computes_group_norm_of_its_own_image():
    """A converted Conv is act(GroupNorm(conv(x))) with the BatchNorm's affine parameters (the same
    objects, so the optimizer keeps them), checked against F.group_norm written out by hand."""
    torch.manual_seed(0)
    conv = Conv(4, 16, 3)
    with torch.no_grad():
        conv.bn.weight.uniform_(0.5, 1.5)
        conv.bn.bias.uniform_(-1, 1)
    weight, bias = conv.bn.weight, conv.bn.bias
    model = to_group_norm(nn.Sequential(conv))
    x = torch.randn(3, 4, 8, 8)
    y = conv.conv(x)
    g = y.view(3, 8, -1)  # 8 groups of 2 channels, statistics over one image's group only
    xhat = ((g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-5)).view_as(y)
    expected = F.silu(xhat * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1))
    assert torch.allclose(model(x), expected, atol=1e-5)
    gn = conv.act[0]
    assert gn.weight is weight and gn.bias is bias and not hasattr(conv, "bn")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_group_norm_model_mixes_no_images():
    """Image 0's loss does not change when the other images of the batch are replaced."""
    model = to_group_norm(trainer_model("yolo26n.yaml"))
    batch = det_batch([2, 1, 3])
    other = det_batch([2, 4, 1], seed=1)
    mixed = {**other, "img": torch.cat([batch["img"][:1], other["img"][1:]])}
    keep = other["batch_idx"] != 0  # image 0's labels from ``batch``, the others' from ``other``
    first = batch["batch_idx"] == 0
    mixed.update({k: torch.cat([batch[k][first], other[k][keep]]) for k in ("batch_idx", "cls", "bboxes")})
    assert torch.allclose(batch_losses(model, batch)[0], batch_losses(model, mixed)[0], rtol=1e-6)


def test_fuse_leaves_a_group_norm_model_unchanged_and_refusals():
    model = to_group_norm(ClassificationModel("yolo26n-cls.yaml", nc=10, verbose=False)).eval()
    x = torch.rand(2, 3, 32, 32)
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    before = first(model(x))
    assert torch.equal(first(copy.deepcopy(model).fuse()(x)), before)  # Ultralytics' fuse() skips Conv without bn
    with pytest.raises(ValueError, match=r"BatchNorm 1 is not the 'bn' of an Ultralytics Conv.*norm='batch'"):
        to_group_norm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))


def test_which_norm_a_run_builds_and_what_is_refused():
    untrained = ClassificationModel("yolo26n-cls.yaml", nc=10, verbose=False)
    gn = to_group_norm(copy.deepcopy(untrained))
    pretrained = copy.deepcopy(untrained)
    for m in pretrained.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.fill_(2.0)  # statistics that saw (public) data
    assert untrained_batch_norm(untrained) and not untrained_batch_norm(gn) and not untrained_batch_norm(pretrained)
    assert [wants_group_norm(n, None) for n in ("auto", "group", "batch")] == [True, True, False]
    assert [wants_group_norm(n, pretrained) for n in ("auto", "group", "batch")] == [False, True, False]
    assert [wants_group_norm(n, gn) for n in ("auto", "group")] == [True, True]
    assert [wants_group_norm(n, untrained) for n in ("group", "batch")] == [True, False]
    with pytest.raises(ValueError, match="never saw data"):  # YOLO(yaml).load(gn.pt) dropped the GroupNorm weights
        wants_group_norm("auto", untrained)
    with pytest.raises(ValueError, match="have GroupNorm.*pretrained="):
        wants_group_norm("batch", gn)
    mixed = copy.deepcopy(gn)
    mixed.model[-1].conv = Conv(3, 4)  # a BatchNorm head loaded into a GroupNorm body
    with pytest.raises(ValueError, match="have GroupNorm"):
        wants_group_norm("auto", mixed)


@pytest.mark.parametrize("cfg", ["yolov10n.yaml", "yolov9t.yaml"])
def test_architectures_whose_fuse_reads_batchnorm_are_refused(cfg):
    """RepVGGDW / RepConv fuse their convolutions' BatchNorm: GroupNorm would crash validation."""
    from ultralytics.nn.tasks import DetectionModel

    with pytest.raises(ValueError, match="cannot fuse with GroupNorm.*norm='batch'"):
        to_group_norm(DetectionModel(cfg, verbose=False))


def test_build_with_loads_weights_after_converting():
    """GroupNorm weights load into the rebuilt model (Ultralytics would drop them: its yaml builds
    BatchNorm); BatchNorm weights built with norm='group' keep their affine parameters."""
    def build(cfg=None, weights=None, verbose=True):
        model = ClassificationModel(cfg, nc=10, verbose=False)
        if weights is not None:
            model.load(weights, verbose=False)
        return model

    torch.manual_seed(0)
    source = build("yolo26n-cls.yaml")
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    gn_source = to_group_norm(copy.deepcopy(source))
    for norm in ("auto", "group"):
        rebuilt = build_with(build, norm)("yolo26n-cls.yaml", gn_source)
        assert has_group_norm(rebuilt)
        assert all(torch.equal(v, gn_source.state_dict()[k]) for k, v in rebuilt.state_dict().items())
    forced = build_with(build, "group")("yolo26n-cls.yaml", source)
    assert torch.equal(forced.model[0].act[0].weight, source.model[0].bn.weight)
    assert not has_group_norm(build_with(build, "batch")("yolo26n-cls.yaml", source))


@pytest.mark.slow
def test_private_run_from_scratch_uses_group_norm_and_its_checkpoint_is_ordinary(tiny_det, tmp_path, no_network):
    """From a yaml, a private run trains GroupNorm; best.pt validates with plain Ultralytics (its
    fuse() path); a new private run from last.pt starts from exactly its weights."""
    dp = DifferentialPrivacy(epsilon=6.0, delta=1e-3, physical_batch=4, ledger=False)
    _, spy, save_dir = train_tiny(tiny_det, tmp_path, dp, epochs=1)
    assert spy.optimizer_steps > 0 and not spy.bn_before  # no BatchNorm left to freeze
    last = YOLO(save_dir / "weights" / "last.pt")
    assert has_group_norm(last.model) and not any(isinstance(m, nn.BatchNorm2d) for m in last.model.modules())
    metrics = YOLO(save_dir / "weights" / "best.pt").val(data=str(tiny_det), imgsz=64, batch=4, workers=0,
                                                         plots=False, project=str(tmp_path), name="val")
    assert metrics.box.map50 >= 0

    expected = {k: v.float() for k, v in last.model.state_dict().items()}
    started = {}

    def record(trainer):
        started.update({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})

    model = YOLO(save_dir / "weights" / "last.pt")
    DifferentialPrivacy(epsilon=6.0, delta=1e-3, physical_batch=4, ledger=False).attach(model)
    model.add_callback("on_pretrain_routine_end", record)
    model.train(data=str(tiny_det), epochs=1, imgsz=64, batch=8, workers=0, project=str(tmp_path), name="again")
    assert set(started) == set(expected)
    assert all(torch.allclose(started[k], expected[k]) for k in expected)
