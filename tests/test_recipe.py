"""DP-aware defaults (``ultralytics_dp.integration.recipe``): unset arguments take them, explicit values win, the
learning rate follows the noise, and the optimizer step does not clip the noisy gradient again."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import ultralytics_dp  # noqa: F401  (import hooks before Ultralytics)
from ultralytics import YOLO
from ultralytics.utils import YAML

from ultralytics_dp import DifferentialPrivacy
from ultralytics_dp.integration.guard import TrainerGuard
from ultralytics_dp.integration.recipe import DEFAULTS, with_defaults


def test_unset_arguments_take_the_dp_default_and_explicit_ones_win() -> None:
    args, changed = with_defaults({"lr0": 0.01, "optimizer": "auto", "epochs": 3}, {"lr0": 0.01, "epochs": 3})
    assert args["lr0"] == 0.01 and "lr0" not in changed  # explicit
    assert args["optimizer"] == DEFAULTS["optimizer"][0] != "auto" and args["epochs"] == 3
    assert set(changed) == set(DEFAULTS) - {"lr0", "epochs"}
    args, changed = with_defaults({"lr0": 0.01}, {})
    assert "lr0" in changed and args["lr0"] == 0.01  # fitted to sigma later, never None in the trainer's args
    for optimizer in ("AdamW", "auto"):  # the lr rule is SGD's: other optimizers keep their lr0
        args, changed = with_defaults({"lr0": 0.001}, {"optimizer": optimizer})
        assert "lr0" not in changed and args["lr0"] == 0.001
    args, changed = with_defaults({"lr0": 0.002}, {"optimizer": "Adam", "lr0": 0.002})  # both set by the user
    assert "lr0" not in changed and "optimizer" not in changed and args["lr0"] == 0.002
    args, _ = with_defaults({}, {}, augmult=4)
    assert args["scale"] == 0.2 and args["fliplr"] == 0 and args["optimizer"] == "SGD"  # a mild crop with augmult
    args, _ = with_defaults({}, {"scale": 0.5}, augmult=4)
    assert "scale" not in args  # explicit wins there too


def test_the_optimizer_step_applies_the_noisy_gradient_unclipped() -> None:
    model = nn.Linear(10, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = SimpleNamespace(model=model, optimizer=optimizer, ema=None, train_loader=None, accumulate=4,
                              scaler=None, optimizer_step=None, _get_memory=lambda fraction=False: 0.0)
    guard = TrainerGuard(step=lambda batch: None, loader=object(), progress=dict)
    guard.install(trainer)
    before = [p.detach().clone() for p in model.parameters()]
    grads = [torch.full_like(p, 5.0) for p in model.parameters()]  # norm 5 * sqrt(110) > 10
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    guard._fresh = True
    trainer.optimizer_step()
    for p, b, g in zip(model.parameters(), before, grads):
        assert torch.allclose(b - p.detach(), g)  # exactly lr * gradient: no rescaling to norm 10


@pytest.mark.slow
def test_a_private_run_records_the_defaults_it_used(tiny_det, tmp_path) -> None:
    model = YOLO("yolo26n.yaml")
    DifferentialPrivacy(epsilon=8, delta=1e-3, physical_batch=4).attach(model)
    seen = {}
    model.add_callback("on_train_end", lambda trainer: seen.update(val_batch=trainer.test_loader.batch_size))
    model.train(data=str(tiny_det), epochs=1, imgsz=64, lr0=0.05, workers=0, project=str(tmp_path), name="run")
    assert seen["val_batch"] == 2 * 4  # validation is chunked like the private step, not 2 x the expected batch
    args = YAML.load(tmp_path / "run" / "args.yaml")
    train_args = torch.load(tmp_path / "run" / "weights" / "last.pt", weights_only=False)["train_args"]
    for recorded in (args, train_args):
        assert recorded["lr0"] == 0.05  # explicit wins
        assert (recorded["epsilon"], recorded["physical_batch"]) == (8, 4) and recorded.get("ledger") is None  # DP keys
        assert recorded["optimizer"] == "SGD" and recorded["warmup_epochs"] == 0 and recorded["fliplr"] == 0
        assert recorded["batch"] == 24  # the default 1024, fitted to 3/4 of the 32 training images
    entry = torch.load(tmp_path / "run" / "weights" / "last.pt", weights_only=False)["dp"]
    assert entry["sample_rate"] == 0.75


@pytest.mark.slow
def test_hand_registered_callbacks_get_the_defaults_too(tiny_det, tmp_path) -> None:
    """Callbacks added one by one (no ``attach``): the trainer's copy of epochs follows the default."""
    from ultralytics_dp.integration.recipe import DEFAULTS

    model = YOLO("yolo26n.yaml")
    for event, fn in DifferentialPrivacy(epsilon=8, delta=1e-3).callbacks.items():
        model.add_callback(event, fn)
    epochs = []
    model.add_callback("on_train_epoch_end", lambda trainer: epochs.append(trainer.epoch))
    model.train(data=str(tiny_det), imgsz=64, workers=0, project=str(tmp_path), name="run")
    assert len(epochs) == DEFAULTS["epochs"][0] == YAML.load(tmp_path / "run" / "args.yaml")["epochs"]


@pytest.mark.slow
def test_the_default_learning_rate_follows_the_noise(tiny_det, tmp_path) -> None:
    """lr0 unset: the optimizer steps at lr0 = min(cap, c * batch / sigma), recorded in args.yaml."""
    from ultralytics_dp.integration.recipe import LR_NOISE

    lrs = {}
    for epsilon in (1, 8):
        model = YOLO("yolo26n.yaml")
        dp = DifferentialPrivacy(epsilon=epsilon, delta=1e-3).attach(model)
        used = set()
        model.add_callback("on_train_batch_end",
                           lambda trainer: used.update(g["initial_lr"] for g in trainer.optimizer.param_groups))
        model.train(data=str(tiny_det), epochs=1, imgsz=64, batch=8, workers=0, project=str(tmp_path), name=str(epsilon))
        lr0 = YAML.load(tmp_path / str(epsilon) / "args.yaml")["lr0"]
        assert used == {lr0}
        scale, cap = LR_NOISE["detect"]
        assert lr0 == pytest.approx(min(cap, scale * 8 / dp.noise_multiplier))
        lrs[epsilon] = lr0
    assert lrs[1] < lrs[8]  # more noise, smaller steps


@pytest.mark.slow
def test_fine_tuning_public_weights_with_another_class_count(tiny_det, tmp_path) -> None:
    """The main path: any ``*.pt`` (here a locally trained one with nc=10) fine-tuned privately on a
    dataset with another class count (12), as a user starting from COCO weights would."""
    YOLO("yolo26n.yaml").train(data=str(tiny_det), epochs=1, imgsz=64, batch=8, workers=0, plots=False,
                               project=str(tmp_path), name="public")
    public = tmp_path / "public" / "weights" / "last.pt"
    names = "".join(f"  {i}: c{i}\n" for i in range(12))
    data = tmp_path / "twelve.yaml"
    data.write_text(f"path: {tiny_det.parent}\ntrain: images/train\nval: images/val\nnames:\n{names}")
    model = YOLO(public)
    dp = DifferentialPrivacy(epsilon=8, delta=1e-3).attach(model)
    model.train(data=str(data), epochs=1, imgsz=64, batch=8, workers=0, project=str(tmp_path), name="private")
    checkpoint = torch.load(tmp_path / "private" / "weights" / "last.pt", weights_only=False)
    assert checkpoint["model"].nc == 12 and checkpoint["dp"]["steps"] == dp.steps > 0
    assert 0 < checkpoint["dp"]["epsilon"] <= 8


def test_readme_table_lists_every_dp_default() -> None:
    """The DP defaults table in docs/useful-models.md (linked from the README) is recipe.DEFAULTS."""
    page = (Path(__file__).parents[1] / "docs" / "useful-models.md").read_text()
    table = page.split("| argument | DP default | Ultralytics default | why |")[1].split("\n\n")[0]
    rows = {key: (dp, ul) for key, dp, ul in re.findall(r"^\| `(\w+)` \| (.+?) \| (.+?) \|", table, re.M)}
    assert rows == {key: (f"`{dp}`", f"`{ul}`") for key, (dp, ul, _) in DEFAULTS.items()}


class _Model:
    """What ``attach`` needs of a YOLO model; ``train`` records the arguments it is called with."""

    overrides = {"model": "yolo26n.yaml", "task": "detect"}
    ckpt_path = None

    def add_callback(self, event: str, fn: object) -> None:
        pass

    def train(self, **kwargs: object) -> None:
        self.kwargs = kwargs


@pytest.mark.parametrize("via_cfg", [False, True])
def test_a_resumed_run_takes_no_default(tmp_path, via_cfg) -> None:
    """Resume keeps the run's own arguments, also when ``resume`` comes from a cfg= file (Ultralytics
    lets batch change on resume, which would change q or the learning rate silently)."""
    checkpoint = tmp_path / "last.pt"
    torch.save({"train_args": {"batch": 40, "epochs": 5, "lr0": 0.0123}}, checkpoint)
    model = _Model()
    DifferentialPrivacy(epsilon=3, ledger=False).attach(model)
    if via_cfg:
        YAML.save(tmp_path / "resume.yaml", {"resume": str(checkpoint)})
        model.train(cfg=str(tmp_path / "resume.yaml"))
    else:
        model.train(resume=str(checkpoint))
    assert not set(model.kwargs) & set(DEFAULTS)


def _ultralytics_val_loss(weights: Path, data: Path, imgsz: int) -> float:
    """Mean of Ultralytics' own training loss (its ``model.loss``: box, classification and the
    rest, summed) over the validation images in batches of 16: an independent measure of what a
    fine-tune learnt, on images no step saw."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_dataloader, build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    model = YOLO(weights).model.float()
    model.args = get_cfg()
    model.train()
    for m in model.modules():  # the heads' training outputs, with the running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    info = check_det_dataset(str(data))
    dataset = build_yolo_dataset(get_cfg(overrides={"imgsz": imgsz}), info["val"], 16, info, mode="val", stride=32)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in build_dataloader(dataset, 16, 0, shuffle=False):
            batch["img"] = batch["img"].float() / 255
            loss, _ = model.loss(batch)
            total, count = total + float(loss.sum()), count + 1
    return total / count


@pytest.mark.slow
def test_a_short_private_fine_tune_lowers_the_public_models_validation_loss(tmp_path) -> None:
    """``make demo`` in small: the demo's public detector, its 1,000 private training images and
    batch, 3 epochs (24 private steps) at epsilon = 8 with the DP defaults. Ultralytics' own loss
    on held-out handwritten digits must fall: the test fails if the private step stops learning
    (no update, an update swamped by noise or of the wrong sign). A loss, not a metric: no
    utility number is asserted."""
    from ultralytics_dp.datasets import embedded, public_weights

    public = public_weights.pretrained("digits-public-det", root=tmp_path / "weights", **public_weights.DEMO_DETECTOR)
    data = embedded.build("digits-det", n_val=64, root=tmp_path / "data")
    before = _ultralytics_val_loss(public, data, 128)
    model = YOLO(public)
    dp = DifferentialPrivacy(epsilon=8, delta=1e-5, ledger=tmp_path / "ledger.sqlite").attach(model)
    model.train(data=str(data), epochs=3, batch=125, imgsz=128, workers=0, plots=False, val=False,
                project=str(tmp_path), name="private")
    after = _ultralytics_val_loss(model.trainer.last, data, 128)
    assert dp.steps == 24 and dp.epsilon <= 8
    # measured 2026-12-07 (DEMO_DETECTOR): 29.99 -> 28.14, 27.76, 27.87 (-6.2, -7.4, -7.1 %); without an update it stays
    assert after < before, (before, after)


@pytest.mark.parametrize("epsilon", [1.0, 8.0])
def test_at_a_fixed_epsilon_and_epochs_the_largest_batch_has_the_least_noise_per_step(epsilon: float) -> None:
    """The reason given for the default batch: over a run of fixed epochs calibrated to one
    epsilon, a step's noise-to-signal sigma / batch (Sander et al. 2023's sigma / (qN), in units
    of C) falls as the expected batch grows, up to the default's 3/4 of the images. Checked
    through the planner the trainer uses."""
    from ultralytics_dp.accounting.planning import plan_run
    from ultralytics_dp.config import DPConfig

    config = DPConfig(epsilon=epsilon, delta=1e-5)
    ratios = []
    for batch in (125, 250, 500, 750):
        plan = plan_run(config, num_samples=1000, batch=batch, epochs=20)
        ratios.append(plan.noise_multiplier / plan.expected_batch_size)
    assert ratios == sorted(ratios, reverse=True) and ratios[0] > 1.5 * ratios[-1], ratios
