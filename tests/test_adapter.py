"""Private YOLO training through the Ultralytics trainer, end to end: steps, budget, BatchNorm,
checkpoints, classification, empty Poisson batches, and a crash-safe resume."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import ultralytics_dp  # noqa: F401  (import hooks before Ultralytics)
from ultralytics import YOLO

from ultralytics_dp import DifferentialPrivacy

from ultralytics_dp.datasets import embedded as datasets
from helpers import released_epsilon
from ultralytics_dp.accounting.ledger import Ledger
from ultralytics_dp.integration.norms import has_group_norm

from helpers import ledger_steps, train_tiny


@pytest.mark.slow
def test_end_to_end_private_detection(tiny_det, tmp_path, no_network):
    # norm="batch": frozen BatchNorm, whose statistics must not move (from scratch GroupNorm is the default)
    dp = DifferentialPrivacy(epsilon=6.0, delta=1e-3, max_grad_norm=1.0, physical_batch=4, norm="batch")
    _, spy, save_dir = train_tiny(tiny_det, tmp_path, dp)
    assert dp.steps == 8 and dp.noise_draws == dp.steps == spy.optimizer_steps
    assert dp.accountant.steps == dp.steps
    assert 0 < dp.epsilon <= 6.0 and not dp.stopped_by_budget
    assert spy.bn_before and all(torch.equal(spy.bn_before[k], spy.bn_after[k]) for k in spy.bn_before)
    for name in ("last.pt", "best.pt"):
        entry = torch.load(save_dir / "weights" / name, map_location="cpu", weights_only=False)["dp"]
        assert entry["privacy_unit"] == "image" and entry["accountant"] == "max(pld, prv_accountant)"
    last = torch.load(save_dir / "weights" / "last.pt", map_location="cpu", weights_only=False)["dp"]
    assert last["steps"] == dp.steps and last["epsilon"] == pytest.approx(dp.epsilon)
    assert last["noise_multiplier"] == dp.noise_multiplier and last["settings"]["delta"] == dp.delta
    assert last["sample_rate"] == pytest.approx(8 / 32) and last["settings"]["max_grad_norm"] == 1.0
    assert DifferentialPrivacy.report(save_dir / "weights" / "last.pt")["steps"] == dp.steps
    leaked = [p.name for p in save_dir.iterdir() if p.name.startswith("train_batch") or p.name.startswith("labels")]
    assert not leaked
    header = (save_dir / "results.csv").read_text().splitlines()[0]
    assert "dp/epsilon" in header
    model = YOLO("yolo26n.yaml")
    dp.attach(model)
    with pytest.raises(ValueError, match="already trained a run"):  # its accountant and ledger record are spent
        model.train(data=str(tiny_det), epochs=1, imgsz=64, batch=8, project=str(tmp_path), name="again")
    assert not (tmp_path / "again").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name,cfg", [("digits-obb", "yolo26n-obb.yaml"), ("digits-seg", "yolo26n-seg.yaml"),
                                      ("digits-pose", "yolov8n-pose.yaml"), ("digits-pose", "yolo26n-pose.yaml")])
def test_end_to_end_private_obb_segmentation_and_pose(tmp_path, no_network, name, cfg):
    """A private yolo26n-obb / -seg / -pose or yolov8n-pose run (from scratch: GroupNorm) on a small
    embedded set, through the stock trainer: Poisson steps, mosaic and copy-paste off, the dp entry's epsilon from the
    accountant, the ledger."""
    data = datasets.build(name, imgsz=64, n_train=40, n_val=8, root=tmp_path / "data")
    ledger = tmp_path / "ledger.sqlite"
    dp = DifferentialPrivacy(epsilon=4.0, delta=1e-3, physical_batch=8, ledger=ledger)
    model = YOLO(cfg)
    dp.attach(model)
    model.train(data=str(data), epochs=2, imgsz=64, batch=10, workers=0, project=str(tmp_path), name="run")
    save_dir = tmp_path / "run"
    assert dp.steps == 8 and dp.noise_draws == 8 and model.trainer.args.mosaic == model.trainer.args.copy_paste == 0
    entry = torch.load(save_dir / "weights" / "last.pt", map_location="cpu", weights_only=False)["dp"]
    assert entry["sample_rate"] == pytest.approx(10 / 40) and entry["steps"] == 8
    spent = released_epsilon(noise_multiplier=entry["noise_multiplier"], sample_rate=0.25, steps=8, delta=1e-3)
    assert entry["epsilon"] == pytest.approx(spent) and spent <= 4.0
    assert ledger_steps(ledger) >= 8 and has_group_norm(model.model)


def test_a_missing_resume_checkpoint_is_refused(tmp_path):
    """Ultralytics would silently resume the latest run under the working directory instead."""
    model = YOLO("yolo26n.yaml")
    DifferentialPrivacy(epsilon=1.0, ledger=False).attach(model)
    with pytest.raises(ValueError, match="resume=.* does not exist"):
        model.train(resume=str(tmp_path / "missing.pt"))


def test_tuning_is_refused_after_attach():
    """Ultralytics' tuner trains through trainers that never see the DP callbacks."""
    model = YOLO("yolo26n.yaml")
    DifferentialPrivacy(epsilon=1.0, ledger=False).attach(model)
    with pytest.raises(ValueError, match="tune"):
        model.tune(data="digits-det", epochs=1, iterations=1)


@pytest.mark.slow
def test_small_budget_stops_before_exceeding(tiny_det, tmp_path):
    from helpers import released_epsilon

    dp = DifferentialPrivacy(epsilon=3.0, delta=1e-3, noise_multiplier=1.0, physical_batch=8, grad_method="vmap")
    _, spy, save_dir = train_tiny(tiny_det, tmp_path, dp, epochs=5)  # 20 steps planned, ~5 affordable
    assert dp.stopped_by_budget
    assert 0 < dp.steps < 20 and spy.optimizer_steps == dp.noise_draws == dp.steps
    assert dp.epsilon <= 3.0 < released_epsilon(noise_multiplier=1.0, sample_rate=0.25, steps=dp.steps + 1, delta=1e-3)
    entry = torch.load(save_dir / "weights" / "last.pt", map_location="cpu", weights_only=False)["dp"]
    assert entry["stopped_by_budget"] and entry["steps"] == dp.steps


@pytest.mark.slow
def test_classification_end_to_end(tmp_path):
    from ultralytics_dp.datasets import embedded as datasets

    root = datasets.build("digits-cls", root=tmp_path / "data")
    dp = DifferentialPrivacy(epsilon=3.0, delta=1e-4, physical_batch=16)
    model = YOLO("yolo26n-cls.yaml")
    dp.attach(model)
    model.train(data=str(root), epochs=1, imgsz=32, batch=32, fraction=0.1, workers=0, project=str(tmp_path),
                name="cls")
    assert dp.steps == dp.noise_draws > 0 and dp.epsilon <= 3.0
    assert torch.load(tmp_path / "cls" / "weights" / "last.pt", weights_only=False)["dp"]["steps"] == dp.steps


@pytest.mark.slow
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



TRAIN_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import ultralytics_dp
    from ultralytics import YOLO
    from ultralytics_dp import DifferentialPrivacy
    from ultralytics_dp.datasets import embedded as datasets

    data, ledger, log, project, resume = sys.argv[1:6]

    def log_step(trainer):  # an independent record of every optimizer step actually taken
        with open(log, "a") as f:
            f.write("step\\n")
            f.flush()
            os.fsync(f.fileno())

    dp = DifferentialPrivacy(epsilon=20.0, delta=1e-3, noise_multiplier=2.0, ledger=ledger, physical_batch=8)
    model = YOLO(os.path.join(project, "run", "weights", "last.pt") if resume == "1" else "yolo26n.yaml")
    dp.attach(model)
    model.add_callback("on_train_batch_end", log_step)
    kwargs = dict(resume=True) if resume == "1" else dict(
        data=data, epochs=4, imgsz=64, batch=8, workers=0, project=project, name="run", exist_ok=True)
    model.train(**kwargs)
    print("FINAL", dp.steps, dp.epsilon)
    """
)



@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume(tiny_det, tmp_path):
    ledger_path, log = tmp_path / "ledger.sqlite", tmp_path / "steps.log"
    args = [sys.executable, "-c", TRAIN_SCRIPT, str(tiny_det), str(ledger_path), str(log), str(tmp_path)]
    proc = subprocess.Popen([*args, "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # 4 steps per epoch: wait for epoch 1's checkpoint and two steps into epoch 2
    while time.time() < deadline and not (log.exists() and len(log.read_text().split()) >= 6
                                          and (tmp_path / "run" / "weights" / "last.pt").exists()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    taken_before_kill = len(log.read_text().split())
    assert 6 <= taken_before_kill < 16

    # changing DP settings on resume is refused and spends nothing
    reserved = ledger_steps(ledger_path)
    changed = DifferentialPrivacy(epsilon=20.0, delta=1e-3, noise_multiplier=2.0, max_grad_norm=0.5,
                                  ledger=ledger_path)
    model = YOLO(tmp_path / "run" / "weights" / "last.pt")
    changed.attach(model)
    with pytest.raises(ValueError, match="max_grad_norm"):
        model.train(resume=True)
    assert ledger_steps(ledger_path) == reserved

    out = subprocess.run([*args, "1"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    final_steps, final_eps = (float(v) for v in out.stdout.split("FINAL")[1].split())
    taken = len(log.read_text().split())
    assert taken > taken_before_kill
    # the resumed run continued its own accountant from the checkpoint and stayed within budget
    assert final_eps <= 20.0 and final_steps == 16
    # the ledger never undercounts what was actually spent, crash included
    ledger_eps = Ledger(ledger_path).epsilons()["worst_epsilon"]
    assert ledger_eps >= released_epsilon(noise_multiplier=2.0, sample_rate=0.25, steps=taken, delta=1e-3) - 1e-6
    assert ledger_steps(ledger_path) >= taken


@pytest.mark.parametrize("granted", [3, 0])
def test_an_epoch_the_ledger_grants_fewer_steps_takes_all_it_was_granted(tmp_path, granted):
    """Another run spent on the same images: the ledger grants fewer steps than the epoch asked for.
    The epoch takes every granted step (the trainer stops after the last, not after the first);
    with none granted it stops at the epoch's end."""
    from types import SimpleNamespace

    class Ledger:
        def reserve(self, run_id, *, steps, noise_multiplier, sample_rate):
            return min(steps, granted)

    dp = DifferentialPrivacy(epsilon=3, ledger=tmp_path / "ledger.sqlite")
    dp.ledger, dp.run_id, dp.max_steps = Ledger(), "run", 100
    dp.plan = SimpleNamespace(noise_multiplier=1.0, sample_rate=0.1)
    dp.guard = SimpleNamespace(trainer=SimpleNamespace(stop=False))
    assert dp._reserve(10) == granted
    assert dp.max_steps == granted and dp.stopped_by_budget
    assert dp.guard.trainer.stop is (granted == 0)
