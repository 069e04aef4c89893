"""What the Ultralytics trainer may do in a private run (``ultralytics_dp.integration.guard``): each test drives a
private run through the public API and provokes one side path of the trainer (what it writes, what
it prints, its out-of-memory and NaN recoveries, resume), then checks the run against an
independent record (the spy's optimizer steps, the ledger, the files on disk)."""

from __future__ import annotations

import hashlib
import re
import shutil
import uuid
from pathlib import Path

import pytest
import torch
from PIL import Image

import ultralytics_dp  # noqa: F401  (import hooks before Ultralytics)
from ultralytics import YOLO
from ultralytics.cfg import DEFAULT_CFG_DICT

from ultralytics_dp import DifferentialPrivacy

from ultralytics_dp.integration.guard import TRAINING_ARGS
from ultralytics_dp.accounting.ledger import Ledger
from ultralytics_dp.integration.training_set import identify_all
from ultralytics_dp.integration.norms import to_group_norm

from helpers import assert_refused, copy_dataset, ledger_steps, train_tiny

# What a private run may write: its arguments, the per-epoch metrics, validation plots (the
# validation set is public), the privacy report and checkpoints. Training images and training-label
# plots are not.
ALLOWED_FILES = re.compile(
    r"args\.yaml|results\.(csv|png)|privacy\.(png|html)|weights/(last|best|epoch\d+)\.pt|val_batch\d+_(labels|pred)\.jpg"
    r"|confusion_matrix(_normalized)?\.png|(Box|Mask|Pose)(F1|P|R|PR)_curve\.png"
)
CHECKPOINT_KEYS = {  # Ultralytics 8.4.190's own keys, and ours
    "epoch", "best_fitness", "stopper", "model", "ema", "updates", "modelopt", "optimizer", "scaler", "train_args",
    "train_metrics", "train_results", "date", "version", "git", "license", "docs", "dp",
}
DP_ENTRY_KEYS = {
    "settings", "epsilon", "epsilon_by_accountant", "noise_multiplier", "sample_rate", "num_samples", "steps",
    "stopped_by_budget", "accountant", "accountant_state", "prv_accountant_version", "run_id", "privacy_unit", "version",
    "person_epsilon",
}
# attributes a trained model carries beyond a freshly built one (set by Ultralytics' trainer and
# validator from public values: class count, an emptied criterion, the head's last validation shapes)
# (pose: the keypoint names and OKS sigmas of the data yaml, or their defaults; classify: the
# validation loader's inference transforms, resize, crop and a fixed normalisation)
MODEL_ATTRIBUTES = {"": {"nc", "criterion", "kpt_names", "kpt_oks_sigmas", "transforms"},
                    "head": {"strides", "anchors", "shape", "_end2end", "max_det"}}
# task -> (model, embedded dataset, expected batch, delta): every task a private run supports
TASKS = {"detect": ("yolo26n.yaml", "digits-det", 8, 1e-3), "segment": ("yolo26n-seg.yaml", "digits-seg", 8, 1e-3),
         "pose": ("yolo26n-pose.yaml", "digits-pose", 8, 1e-3), "obb": ("yolo26n-obb.yaml", "digits-obb", 8, 1e-3),
         "classify": ("yolo26n-cls.yaml", "digits-cls", 96, 1e-4)}


def private_secrets(images: list[Path], ledger: Path) -> list[str]:
    """Hashes that identify the training set: the ledger's fingerprint of it, and every training
    image's identities (pixels, file bytes) and label file's SHA-256."""
    book = Ledger(ledger)
    (run,) = book.summary(None)["datasets"][0]["runs"]
    records = identify_all(images)
    labels = [p.parent.parent.parent / "labels" / p.parent.name / f"{p.stem}.txt" for p in images]
    return [book.run(run["run_id"])["fingerprint"], *(r.pixels for r in records), *(r.file for r in records),
            *(hashlib.sha256(lb.read_bytes()).hexdigest() for lb in labels if lb.exists())]


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(TASKS))
def test_a_private_run_releases_only_allowed_files_and_keys(task, tiny_det, tmp_path):
    from ultralytics_dp.datasets import embedded

    cfg, name, batch, delta = TASKS[task]
    data = tiny_det if task == "detect" else (
        embedded.build(name, root=tmp_path / "data") if task == "classify" else
        embedded.build(name, imgsz=64, n_train=32, n_val=16, root=tmp_path / "data"))
    train_images = sorted(p for p in (data / "train" if task == "classify" else data.parent / "images" / "train")
                          .rglob("*.png"))
    ledger = tmp_path / "ledger.sqlite"
    model = YOLO(cfg)
    DifferentialPrivacy(epsilon=6.0, delta=delta, ledger=ledger).attach(model)
    model.train(data=str(data), epochs=2, imgsz=32 if task == "classify" else 64, batch=batch, workers=0,
                project=str(tmp_path), name="run", plots=True, save_period=1)
    save_dir = tmp_path / "run"
    files = sorted(p.relative_to(save_dir).as_posix() for p in save_dir.rglob("*") if p.is_file())
    assert {"args.yaml", "results.csv", "privacy.html", "weights/last.pt", "weights/best.pt",
            "weights/epoch0.pt"} <= set(files)
    assert [f for f in files if not ALLOWED_FILES.fullmatch(f)] == []

    secrets = private_secrets(train_images, ledger)
    for f in files:
        raw = (save_dir / f).read_bytes()
        assert not [s for s in secrets if s.encode() in raw or bytes.fromhex(s) in raw], f
    fresh_model = YOLO(cfg).model
    head = f"model.{len(fresh_model.model) - 1}"
    fresh = dict(to_group_norm(fresh_model).named_modules())  # from scratch: GroupNorm
    for f in (f for f in files if f.endswith(".pt")):
        ckpt = torch.load(save_dir / f, map_location="cpu", weights_only=False)
        assert set(ckpt) <= CHECKPOINT_KEYS, f
        assert set(ckpt["dp"]) == DP_ENTRY_KEYS, f
        assert set(ckpt["train_args"]) <= set(DEFAULT_CFG_DICT) | {"save_dir"}, f
        assert uuid.UUID(ckpt["dp"]["run_id"]).version == 4
        for key in ("model", "ema"):
            for mod_name, module in (ckpt[key].named_modules() if ckpt[key] is not None else ()):
                allowed = MODEL_ATTRIBUTES.get("head" if mod_name == head else mod_name, set())
                extra = set(module.__dict__) - set(fresh[mod_name].__dict__) - allowed
                assert not extra, (f, key, mod_name, extra)
    # the random id resolves to the run only through the local ledger
    run_id = torch.load(save_dir / "weights" / "last.pt", weights_only=False)["dp"]["run_id"]
    assert Ledger(ledger).run(run_id)["fingerprint"] == secrets[0]
    header, *rows = (save_dir / "results.csv").read_text().splitlines()
    columns = header.split(",")
    assert all(re.fullmatch(r"epoch|time|train/\w+|metrics/.+|val/\w+|lr/pg\d|dp/epsilon", c) for c in columns)
    for row in rows:  # training losses are private statistics: zeros
        assert all(float(v) == 0 for c, v in zip(columns, row.split(",")) if c.startswith("train/"))


@pytest.mark.slow
def test_best_pt_states_the_whole_runs_epsilon(tiny_det, tmp_path):
    """best.pt is chosen by comparing every epoch, so it states every step, not those before it was saved."""
    seen = []

    def first_epoch_best(trainer):
        validate = trainer.validate

        def decreasing():  # the first epoch's fitness stays the best
            metrics, _ = validate()
            seen.append(1.0 / (len(seen) + 1))
            trainer.best_fitness = max(seen)
            return metrics, seen[-1]

        trainer.validate = decreasing

    dp = DifferentialPrivacy(epsilon=6.0, delta=1e-3, ledger=False)
    _, spy, save_dir = train_tiny(tiny_det, tmp_path, dp, epochs=3, save_period=1,
                                  callbacks={"on_pretrain_routine_end": first_epoch_best})
    best = torch.load(save_dir / "weights" / "best.pt", weights_only=False)
    first = torch.load(save_dir / "weights" / "epoch0.pt", weights_only=False)
    # the weights are those of the first epoch ...
    assert all(torch.equal(v, first["ema"].state_dict()[k]) for k, v in best["model"].state_dict().items())
    assert first["dp"]["steps"] == 4  # (epochN.pt may state the epsilon at its writing)
    assert best["dp"]["steps"] == dp.steps == spy.optimizer_steps == 12  # ... the guarantee is the run's
    assert best["dp"]["epsilon"] == pytest.approx(dp.epsilon)


@pytest.mark.slow
def test_out_of_memory_outside_the_private_step_stops_the_run(tiny_det, tmp_path):
    """Ultralytics' recovery would halve batch, rebuild a shuffled loader and raise accumulate."""
    calls = []

    def oom_on_second_batch(trainer):
        preprocess = trainer.preprocess_batch

        def flaky(batch):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
            return preprocess(batch)

        trainer.preprocess_batch = flaky

    ledger = tmp_path / "ledger.sqlite"
    dp = DifferentialPrivacy(epsilon=6.0, delta=1e-3, ledger=ledger)
    with pytest.raises(MemoryError, match="physical_batch") as err:
        train_tiny(tiny_det, tmp_path, dp, callbacks={"on_pretrain_routine_end": oom_on_second_batch})
    assert len(str(err.value).splitlines()) == 1
    assert dp.steps == dp.noise_draws == 1 and len(calls) == 2
    assert ledger_steps(ledger) >= dp.steps  # the step taken was reserved first


@pytest.mark.slow
@pytest.mark.parametrize("epochs,expected_steps", [(3, 12), (2, 8)])  # (2, 8): the redone epoch has no step left
def test_nan_recovery_keeps_every_step_private_and_counted(tiny_det, tmp_path, epochs, expected_steps):
    """A non-finite fitness at epoch 1 makes Ultralytics reload last.pt, deep-copy the model into a
    new EMA and redo the epoch: the copy must not carry the private step, the discarded epoch's
    steps stay spent, and every optimizer step is one counted, reserved private step."""
    fired = []

    def nan_fitness_once(trainer):
        validate = trainer.validate

        def nan_once():
            metrics, fitness = validate()
            if trainer.epoch == 1 and not fired:
                fired.append(1)
                return metrics, float("nan")
            return metrics, fitness

        trainer.validate = nan_once

    ledger = tmp_path / "ledger.sqlite"
    dp = DifferentialPrivacy(epsilon=6.0, delta=1e-3, noise_multiplier=1.0, ledger=ledger)
    _, spy, save_dir = train_tiny(tiny_det, tmp_path, dp, epochs=epochs,
                                  callbacks={"on_pretrain_routine_end": nan_fitness_once})
    assert fired
    assert dp.steps == dp.noise_draws == spy.optimizer_steps == ledger_steps(ledger) == expected_steps
    assert dp.epsilon <= 6.0
    assert torch.load(save_dir / "weights" / "last.pt", weights_only=False)["dp"]["steps"] == expected_steps


@pytest.mark.slow
def test_console_and_checkpoints_show_no_statistic_of_the_private_data(tiny_det, tmp_path, capfd):
    """The progress bar's Instances column (boxes in the Poisson batch), the training-set scan line
    (backgrounds, corrupt), the largest object count of a training image (which Ultralytics also
    writes into max_det), the training images' mean file size and a count of non-finite per-image
    gradients are private statistics."""
    data = copy_dataset(tiny_det, tmp_path)
    crowded = "".join(f"1 {0.02 + 0.003 * i:.4f} 0.5 0.01 0.01\n" for i in range(301))
    (data.parent / "labels" / "train" / "00005.txt").write_text(crowded)
    boxes = []

    def count_and_poison(trainer):
        preprocess = trainer.preprocess_batch

        def spied(batch):
            batch = preprocess(batch)
            boxes.append(int(batch["cls"].shape[0]))
            if batch["img"].shape[0]:
                batch["img"][0] = float("nan")  # an image whose gradient is not finite
            return batch

        trainer.preprocess_batch = spied

    dp = DifferentialPrivacy(epsilon=6.0, delta=1e-3, ledger=False)
    _, _, save_dir = train_tiny(data, tmp_path, dp, callbacks={"on_pretrain_routine_end": count_and_poison})
    console = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "\n", "".join(capfd.readouterr()))
    assert any(boxes) and dp.steps == 8
    assert "301 objects" not in console and "train=301" not in console and "train: Fast image access" not in console
    ckpt = torch.load(save_dir / "weights" / "last.pt", weights_only=False)
    assert ckpt["train_args"]["max_det"] == 300 and ckpt["model"].model[-1].max_det == 300
    progress = re.findall(r"^\s*\d+/2\s+\S+G\s+(?:\S+\s+){3}(\d+)\s+64:", console, flags=re.M)
    assert progress and set(progress) == {"0"}, progress
    assert "backgrounds" not in console.split("val:")[0]  # the validation scan (public) may say it
    assert "non-finite" not in console


@pytest.mark.slow
def test_resume_must_use_the_runs_data_and_ledger(tiny_det, tmp_path):
    ledger = tmp_path / "ledger.sqlite"

    def crash_in_epoch_2(trainer):
        if trainer.epoch == 1:
            raise KeyboardInterrupt

    dp = DifferentialPrivacy(epsilon=6.0, delta=1e-3, noise_multiplier=1.0, ledger=ledger)
    with pytest.raises(KeyboardInterrupt):
        train_tiny(tiny_det, tmp_path, dp, callbacks={"on_train_epoch_start": crash_in_epoch_2})
    last = tmp_path / "run" / "weights" / "last.pt"
    spent, checkpoint = ledger_steps(ledger), last.read_bytes()

    other = tmp_path / "other"  # the same number of images, one of them different
    shutil.copytree(tiny_det.parent, other)
    yaml = other / "data.yaml"
    yaml.write_text(yaml.read_text().replace(str(tiny_det.parent), str(other)))
    image = sorted((other / "images" / "train").iterdir())[0]
    with Image.open(image) as opened:  # other pixels (other bytes alone are the same image)
        pixels = opened.convert("RGB")
    pixels.putpixel((0, 0), tuple(255 - v for v in pixels.getpixel((0, 0))))
    pixels.save(image)
    attempts = [
        (dict(ledger=ledger), dict(data=str(yaml)), "training data of the run"),
        (dict(ledger=False), {}, "resume with the ledger"),
        (dict(ledger=tmp_path / "elsewhere.sqlite"), {}, "not in the ledger"),
    ]
    for dp_kwargs, train_kwargs, match in attempts:
        resumed = DifferentialPrivacy(epsilon=6.0, delta=1e-3, noise_multiplier=1.0, **dp_kwargs)
        model = YOLO(last)
        resumed.attach(model)
        with pytest.raises(ValueError, match=match) as err:
            model.train(resume=True, **train_kwargs)
        assert len(str(err.value).splitlines()) == 1
        assert ledger_steps(ledger) == spent and last.read_bytes() == checkpoint  # no step, nothing written


def test_every_rank_of_a_multi_process_run_checks_its_own_arguments():
    """Ultralytics prepares rank 0 only: every rank must refuse a run not prepared in the launching
    process, a rank the plugin did not prepare, and arguments that would mix images in its data."""
    from types import SimpleNamespace

    from ultralytics_dp.integration.guard import check_rank

    def trainer(**args):
        base = dict(device="0,1", task="detect", mosaic=0.0, mixup=0.0, cutmix=0.0, copy_paste=0.0)
        return SimpleNamespace(args=SimpleNamespace(**{**base, **args}))

    with pytest.raises(ValueError, match="registered by hand"):
        check_rank(trainer(), None, rank=1, prepared=True)
    with pytest.raises(RuntimeError, match="process 1 was not prepared"):
        check_rank(trainer(), {}, rank=1, prepared=False)
    with pytest.raises(RuntimeError, match="mosaic still on in process 1"):
        check_rank(trainer(mosaic=1.0), {}, rank=1, prepared=True)
    with pytest.raises(ValueError, match="depth"):
        check_rank(trainer(task="depth"), {}, rank=1, prepared=True)
    check_rank(trainer(), {}, rank=1, prepared=True)


def test_readme_lists_every_training_argument_as_the_guard_handles_it():
    """The table of training arguments in docs/guarantee.md (linked from the README) is the guard's."""
    page = (Path(__file__).parents[1] / "docs" / "guarantee.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| (refused|neutralised|guarded|safe) \|", page, flags=re.M))
    assert rows == {key: handling for key, (handling, _) in TRAINING_ARGS.items()}


@pytest.mark.slow
@pytest.mark.parametrize(
    "train_kwargs,match",
    [
        (dict(mosaic=1.0), "mosaic"), (dict(mixup=0.2), "mixup"), (dict(cutmix=0.5), "cutmix"),
        (dict(copy_paste=0.1), "copy_paste"), (dict(rect=True), "rect"), (dict(batch=-1), "auto-batch"),
        (dict(batch=0.7), "auto-batch"), (dict(batch=64), "exceeds the dataset size"),
        (dict(cls_pw=0.5), "cls_pw"), (dict(time=0.01), "time"), (dict(quantize=8), "quantize"),
        (dict(distill_model="yolo26n.yaml"), "distill_model"), (dict(split="train"), "split=train"),
        (dict(cache="disk"), "cache=disk"),
    ],
)
def test_bad_training_keys_are_refused(tiny_det, tmp_path, train_kwargs, match):
    assert_refused(tmp_path, tiny_det, match, **train_kwargs)


@pytest.mark.slow
def test_a_list_of_datasets_is_refused(tiny_det, tmp_path):
    assert_refused(tmp_path, [tiny_det, tiny_det], "data as a list")


@pytest.mark.slow
def test_unsupported_task_is_refused(tiny_det, tmp_path):
    assert_refused(tmp_path, tiny_det, "semantic.*not supported", cfg="yolo26n-sem.yaml")
