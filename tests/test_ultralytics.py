"""Private YOLO training through the Ultralytics trainer: per-image losses, gradients, and the
end-to-end contract (steps, budget, BatchNorm, checkpoints, artifacts, refusals)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import ultralytics_dp  # noqa: F401  (offline switches before Ultralytics)
from ultralytics import YOLO
from ultralytics.cfg import get_cfg

from ultralytics_dp import DifferentialPrivacy, per_sample_grad_norms, per_sample_losses
from ultralytics_dp.engine import clipped_grad_sum
from ultralytics_dp.losses import per_image_loss_fn, sample_batch

from helpers import train_tiny


def trainer_model(cfg: str) -> torch.nn.Module:
    """The model as the DP trainer holds it: args set, train mode, BatchNorm frozen."""
    torch.manual_seed(0)
    model = YOLO(cfg).model
    model.args = get_cfg()
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    return model


def det_batch(counts: list[int], size: int = 64, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    idx, cls, boxes = [], [], []
    for i, c in enumerate(counts):
        for _ in range(c):
            idx.append(i)
            cls.append(int(torch.randint(0, 80, (1,), generator=g)))
            boxes.append(torch.cat([torch.rand(2, generator=g) * 0.5 + 0.25, torch.rand(2, generator=g) * 0.3 + 0.1]))
    return {
        "img": torch.rand(len(counts), 3, size, size, generator=g),
        "batch_idx": torch.tensor(idx, dtype=torch.float),
        "cls": torch.tensor(cls, dtype=torch.float).view(-1, 1),
        "bboxes": torch.stack(boxes) if boxes else torch.zeros(0, 4),
    }


def image(batch: dict, i: int) -> dict:
    """Image i alone, as a batch of one."""
    if "batch_idx" not in batch:
        return {"img": batch["img"][i : i + 1], "cls": batch["cls"][i : i + 1]}
    m = batch["batch_idx"] == i
    return {"img": batch["img"][i : i + 1], "batch_idx": torch.zeros(int(m.sum())),
            "cls": batch["cls"][m], "bboxes": batch["bboxes"][m]}


def ultralytics_loss_alone(model, one: dict) -> torch.Tensor:
    """Ultralytics' own criterion on a batch of one, with its BCE switched to the formula we use
    (softplus(x) - x*y) so that only the normalisation and assignment logic are compared."""
    crit = copy.deepcopy(model.init_criterion())
    for branch in (getattr(crit, "one2many", None), getattr(crit, "one2one", None), crit):
        if branch is not None and hasattr(branch, "bce"):
            branch.bce = lambda x, y: F.softplus(x) - x * y
    return crit(model(one["img"]), one)[0].sum()


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


def naive_grads(model, batch, n):
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(n):
        loss = per_sample_losses(model, image(batch, i))[0]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)])
    return out


@pytest.mark.parametrize("cfg", ["yolo26n.yaml", "yolov8n.yaml"])
def test_detection_per_sample_gradients_are_exact(cfg):
    model = trainer_model(cfg)
    batch = det_batch([1, 0, 3])
    naive = naive_grads(model, batch, 3)
    naive_norms = torch.stack([torch.sqrt(sum(g.double().pow(2).sum() for g in gs)) for gs in naive])
    norms = per_sample_grad_norms(model, batch)
    assert torch.allclose(norms.double(), naive_norms, rtol=1e-4)
    # with C far above every norm (no clipping) the clipped sum is the plain sum of per-image grads
    total, _ = clipped_grad_sum(model, per_image_loss_fn(model), sample_batch(model, batch), max_grad_norm=1e6,
                                chunk_size=2)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    rel = max(
        ((total[n] - sum(gs[j] for gs in naive)).norm() / sum(gs[j] for gs in naive).norm().clamp_min(1e-12)).item()
        for j, n in enumerate(names)
        if sum(gs[j] for gs in naive).norm() > 0
    )
    assert rel <= 1e-4


@pytest.mark.parametrize("cfg", ["yolo26n.yaml", "yolov8n.yaml", "yolo26n-cls.yaml"])
@pytest.mark.parametrize("max_grad_norm", [1e6, 0.003])
def test_ghost_path_matches_torch_func_path(cfg, max_grad_norm):
    from ultralytics_dp.ghost import clipped_grad_sum_ghost, supports
    from ultralytics_dp.losses import batch_losses

    model = trainer_model(cfg)
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


def test_end_to_end_private_detection(tiny_det, tmp_path, no_network):
    dp = DifferentialPrivacy(epsilon=6.0, delta=1e-3, max_grad_norm=1.0, physical_batch=4)
    _, spy, save_dir = train_tiny(tiny_det, tmp_path, dp)
    assert dp.steps == 8 and dp.noise_draws == dp.steps == spy.optimizer_steps
    assert dp.accountant.steps == dp.steps
    assert 0 < dp.epsilon <= 6.0 and not dp.stopped_by_budget
    assert spy.bn_before and all(torch.equal(spy.bn_before[k], spy.bn_after[k]) for k in spy.bn_before)
    for name in ("last.pt", "best.pt"):
        entry = torch.load(save_dir / "weights" / name, map_location="cpu", weights_only=False)["dp"]
        assert entry["privacy_unit"] == "image" and entry["accountant"] == "prv"
    last = torch.load(save_dir / "weights" / "last.pt", map_location="cpu", weights_only=False)["dp"]
    assert last["steps"] == dp.steps and last["epsilon"] == pytest.approx(dp.epsilon)
    assert last["noise_multiplier"] == dp.noise_multiplier and last["delta"] == dp.delta
    assert last["sample_rate"] == pytest.approx(8 / 32) and last["max_grad_norm"] == 1.0
    assert DifferentialPrivacy.report(save_dir / "weights" / "last.pt")["steps"] == dp.steps
    leaked = [p.name for p in save_dir.iterdir() if p.name.startswith("train_batch") or p.name.startswith("labels")]
    assert not leaked
    header = (save_dir / "results.csv").read_text().splitlines()[0]
    assert "dp/epsilon" in header


def test_small_budget_stops_before_exceeding(tiny_det, tmp_path):
    from ultralytics_dp.accounting import compute_epsilon

    dp = DifferentialPrivacy(epsilon=3.0, delta=1e-3, noise_multiplier=1.0, physical_batch=8, grad_method="vmap")
    _, spy, save_dir = train_tiny(tiny_det, tmp_path, dp, epochs=5)  # 20 steps planned, ~5 affordable
    assert dp.stopped_by_budget
    assert 0 < dp.steps < 20 and spy.optimizer_steps == dp.noise_draws == dp.steps
    assert dp.epsilon <= 3.0 < compute_epsilon(noise_multiplier=1.0, sample_rate=0.25, steps=dp.steps + 1, delta=1e-3)
    entry = torch.load(save_dir / "weights" / "last.pt", map_location="cpu", weights_only=False)["dp"]
    assert entry["stopped_by_budget"] and entry["steps"] == dp.steps


def test_explicit_mosaic_is_refused_before_training(tiny_det, tmp_path):
    dp = DifferentialPrivacy(epsilon=4.0, delta=1e-3)
    model = YOLO("yolo26n.yaml")
    dp.attach(model)
    with pytest.raises(ValueError, match="mosaic"):
        model.train(data=str(tiny_det), epochs=1, imgsz=64, batch=8, mosaic=1.0, project=str(tmp_path), name="m")
    assert dp.steps == 0 and not (tmp_path / "m" / "weights" / "last.pt").exists()


def test_delta_at_least_one_over_n_is_refused(tiny_det, tmp_path):
    dp = DifferentialPrivacy(epsilon=4.0, delta=1 / 32)
    model = YOLO("yolo26n.yaml")
    dp.attach(model)
    with pytest.raises(ValueError, match="delta"):
        model.train(data=str(tiny_det), epochs=1, imgsz=64, batch=8, workers=0, project=str(tmp_path), name="d")
    assert dp.steps == 0


@pytest.mark.parametrize("kwargs", [dict(epsilon=0), dict(epsilon=float("nan")), dict(epsilon=1, delta=1.5),
                                    dict(epsilon=1, max_grad_norm=-1), dict(epsilon=1, noise_multiplier=0)])
def test_bad_settings_raise(kwargs):
    with pytest.raises(ValueError):
        DifferentialPrivacy(**kwargs)


def test_cli_trains_end_to_end(tiny_det, tmp_path, capsys):
    from ultralytics_dp.cli import main

    rc = main(["train", "model=yolo26n.yaml", f"data={tiny_det}", "epochs=1", "imgsz=64", "batch=8", "workers=0",
               "epsilon=5", "delta=1e-3", "max_grad_norm=0.5", f"project={tmp_path}", "name=cli"])
    assert rc == 0
    info = torch.load(tmp_path / "cli" / "weights" / "last.pt", map_location="cpu", weights_only=False)["dp"]
    assert info["steps"] == 4 and info["max_grad_norm"] == 0.5 and info["epsilon"] <= 5
    assert "DP per image" in capsys.readouterr().out


def test_classification_end_to_end(tmp_path):
    from ultralytics_dp import datasets

    root = datasets.build("digits-cls", root=tmp_path / "data")
    dp = DifferentialPrivacy(epsilon=3.0, delta=1e-4, physical_batch=16)
    model = YOLO("yolo26n-cls.yaml")
    dp.attach(model)
    model.train(data=str(root), epochs=1, imgsz=32, batch=32, fraction=0.1, workers=0, project=str(tmp_path),
                name="cls")
    assert dp.steps == dp.noise_draws > 0 and dp.epsilon <= 3.0
    assert torch.load(tmp_path / "cls" / "weights" / "last.pt", weights_only=False)["dp"]["steps"] == dp.steps


def test_empty_poisson_batches_are_steps(tiny_det, tmp_path):
    """batch=1 of N=32: q=1/32, so about a third of the 32 steps draw no image at all."""
    dp = DifferentialPrivacy(epsilon=50.0, delta=1e-3, noise_multiplier=5.0)
    model = YOLO("yolo26n.yaml")
    sizes = []

    def record(trainer):
        preprocess = trainer.preprocess_batch

        def recorded(batch):
            sizes.append(batch["img"].shape[0])
            return preprocess(batch)

        trainer.preprocess_batch = recorded

    dp.attach(model)
    model.add_callback("on_pretrain_routine_end", record)
    model.train(data=str(tiny_det), epochs=1, imgsz=64, batch=1, workers=0, project=str(tmp_path), name="e")
    assert len(sizes) == 32 == dp.steps == dp.noise_draws
    assert sizes.count(0) >= 3  # P(fewer than 3 empty of 32 at p=0.36) < 1e-3
    assert all(torch.isfinite(p).all() for p in model.model.parameters())


def test_ghost_path_skips_a_non_finite_image():
    from ultralytics_dp.ghost import clipped_grad_sum_ghost
    from ultralytics_dp.losses import batch_losses

    model = trainer_model("yolo26n.yaml")
    batch = det_batch([1, 2, 1])
    bad = {**batch, "img": batch["img"].clone()}
    bad["img"][1] = float("nan")
    total, norms = clipped_grad_sum_ghost(model, lambda m: batch_losses(m, bad), max_grad_norm=0.5)
    assert torch.isfinite(norms[[0, 2]]).all() and not torch.isfinite(norms[1])
    keep = batch["batch_idx"] != 1
    rest = {"img": batch["img"][[0, 2]], "batch_idx": (batch["batch_idx"][keep] > 1).float(),
            "cls": batch["cls"][keep], "bboxes": batch["bboxes"][keep]}
    expected, _ = clipped_grad_sum_ghost(model, lambda m: batch_losses(m, rest), max_grad_norm=0.5)
    for k in expected:
        assert torch.isfinite(total[k]).all()
        assert torch.allclose(total[k], expected[k], rtol=1e-4, atol=1e-7)


def test_private_gradient_divides_by_the_expected_batch_size():
    """The realised Poisson batch size is private: the step divides by q*N, never by B."""
    from ultralytics_dp.adapter import private_gradient

    model = trainer_model("yolo26n-cls.yaml")
    batch = {"img": torch.rand(3, 3, 32, 32), "cls": torch.tensor([1, 2, 3])}
    grad = private_gradient(model, batch, method="ghost", max_grad_norm=0.5, noise_multiplier=0.0,
                               expected_batch_size=10.0, physical_batch=2)
    total, _ = clipped_grad_sum(model, per_image_loss_fn(model), sample_batch(model, batch), max_grad_norm=0.5)
    for k in total:
        assert torch.allclose(grad[k], total[k] / 10.0, rtol=1e-4, atol=1e-9)
