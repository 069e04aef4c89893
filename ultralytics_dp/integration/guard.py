"""What the Ultralytics trainer may do in a private run, in one place.

Ultralytics 8.4.190's trainer has side paths that mix images, compute statistics of the whole
training set, print statistics of a Poisson batch, or take a step the accountant never sees (a
rebuilt loader after an out-of-memory error, a model copy that carries the private step into the
validator). This module decides each of them: ``TRAINING_ARGS`` says what DP mode does with every
training argument that touches the training data, ``refuse_unsafe_args`` / ``neutralise_args``
apply it before the trainer builds anything, and ``TrainerGuard`` holds the trainer to one
private step per optimizer step from ``on_pretrain_routine_end`` to the end of training.

Privacy assumptions relied on here:

* One image with all its labels is one record; every optimizer step is one Poisson batch at the
  planned rate q, through the private step, with ``accumulate == 1``. Anything else (a rebuilt or
  swapped loader, gradient accumulation, an enabled loss scaler, an optimizer step with no fresh
  private gradient) fails closed where it happens instead of running.
* What the trainer computes from the whole training set (class weights, QAT calibration, label
  plots) or from one Poisson batch (the progress bar's instance count, accelerator memory) is
  private: the argument is refused, or the value is not shown.
* Public: N and q, the validation set, the architecture and every training argument (args.yaml).
* A training argument not in ``TRAINING_ARGS`` is assumed per-image or unrelated to the training
  data; the table describes Ultralytics 8.4.190 and must be re-read when that pin changes.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from ..console import log, quiet_console
from ..losses import TASKS

MIXING_AUGMENTATIONS = ("mosaic", "mixup", "cutmix", "copy_paste")

# Every Ultralytics training argument that touches the training data, what DP mode does with it
# ("refused", "neutralised", "guarded" or "safe") and why. docs/guarantee.md's table is checked against it.
TRAINING_ARGS: dict[str, tuple[str, str]] = {
    "mosaic": ("neutralised", "pastes 4 images into one sample: set to 0; refused if set explicitly"),
    "mixup": ("neutralised", "blends two images: set to 0; refused if set explicitly"),
    "cutmix": ("neutralised", "pastes a patch of another image: set to 0; refused if set explicitly"),
    "copy_paste": ("neutralised", "pastes objects of other images: set to 0; refused if set explicitly"),
    "close_mosaic": ("neutralised", "only switches mosaic off, which is off already: set to 0"),
    "nbs": ("neutralised", "gradient accumulation over round(nbs/batch) batches: accumulate is 1 for the whole run"),
    "plots": ("guarded", "validation plots and results.png are drawn (the validation set is public), with "
                         "privacy.png; train_batch*.jpg and labels.jpg (private images and label statistics) never"),
    "batch": ("guarded", "the expected Poisson batch size (q = batch/N); auto-batch (-1 or a fraction) probes "
                         "memory with private data and is refused; halving it after out-of-memory is refused; "
                         "Ultralytics' own loaders (validation: 2 x) are built with physical_batch"),
    "rect": ("refused", "fixed batches sorted by aspect ratio break Poisson sampling"),
    "cls_pw": ("refused", "class weights from every training label multiply each image's loss "
                          "(sensitivity > C) and are stored in checkpoints"),
    "time": ("refused", "a wall-clock stop depends on Poisson batch sizes; use epochs"),
    "quantize": ("refused", "8/int8 calibrates quantisation observers on training batches (other values "
                            "only affect validation)"),
    "distill_model": ("refused", "the distillation loss has no per-image form here"),
    "compile": ("refused", "not supported with per-image gradients"),
    "device": ("guarded", "several devices (DDP): each process samples a disjoint shard of the training set at "
                          "rate q, and the processes' clipped sums are added before one noise draw"),
    "split": ("refused", "other than val or test: the validation set is public (metrics, plots, best.pt), so it "
                         "must not be the training set; a validation set sharing images with it is refused too"),
    "data": ("guarded", "a list of datasets trains several runs with one DP object: refused"),
    "resume": ("guarded", "the DP settings, the ledger and the training data (by the ledger's identity) "
                          "must be those of the run"),
    "amp": ("safe", "the grad scaler is disabled, so clipping sees true gradients; off by default on GPU"),
    "cache": ("guarded", "RAM caches each image's own pixels: safe; disk writes .npy files beside the images that "
                         "Ultralytics then trains on instead of the files the ledger names: refused, as are .npy files "
                         "already there"),
    "fraction": ("safe", "a fixed subset of the training files; N is its size and the ledger identifies it"),
    "multi_scale": ("safe", "one random size per batch, drawn independently of the images"),
    "patience": ("safe", "early stopping on validation metrics (public set) of private iterates"),
    "freeze": ("safe", "frozen layers get no gradient; a public choice"),
    "single_cls": ("safe", "a fixed relabelling applied to each image's own labels"),
    "seed": ("safe", "drives augmentations only; noise and sampling are seeded from the OS"),
    "dropout": ("safe", "per-image random masks"),
    "augmentations": ("safe", "custom Albumentations transforms must be per-image (one image in, one out)"),
}


def mixing_on(values: Mapping[str, Any]) -> list[str]:
    """The augmentations that mix images which ``values`` switch on (> 0)."""
    return [k for k in MIXING_AUGMENTATIONS if float(values.get(k) or 0) > 0]


def _on(value: Any) -> bool:
    """True for a set, non-zero, non-empty value."""
    return value not in (None, False, 0, 0.0, "", [], ())


def refuse_unsafe_args(args: Mapping[str, Any], explicit: Mapping[str, Any]) -> None:
    """One-line ValueError, naming the setting, for any training argument DP mode refuses.

    ``args`` are the values the trainer will use; ``explicit`` the ones the user set (a mixing
    augmentation left at Ultralytics' default is neutralised, one set explicitly is refused)."""
    mixing = mixing_on(explicit)
    if mixing:
        key = mixing[0]
        raise ValueError(f"{key}={explicit[key]} mixes several images into one training sample, which breaks "
                         f"per-image differential privacy; remove it or set {key}=0")
    if args.get("rect"):
        raise ValueError("rect=True builds fixed-order batches, which break Poisson sampling; remove rect")
    batch = args.get("batch")
    if batch is not None and (isinstance(batch, bool) or not float(batch).is_integer() or float(batch) < 1):
        raise ValueError(f"batch={batch}: auto-batch (batch=-1 or a fraction) probes memory with private data and "
                         "changes the sampling rate; give the expected batch size as an integer >= 1")
    if args.get("compile"):
        raise ValueError("compile=True is not supported in DP mode; remove it")
    if float(args.get("cls_pw") or 0) > 0:
        raise ValueError(f"cls_pw={args['cls_pw']} weights each image's loss by class frequencies of the whole "
                         "training set, so one image changes every other image's gradient; set cls_pw=0")
    if _on(args.get("time")):
        raise ValueError(f"time={args['time']} stops training by wall-clock time, which depends on the private "
                         "Poisson batch sizes; remove time and set epochs")
    if str(args.get("quantize")).lower() in {"8", "int8"}:
        raise ValueError(f"quantize={args['quantize']} calibrates quantisation-aware training on training batches "
                         "without noise; remove quantize (quantise the private model at export)")
    if str(args.get("cache")).lower() == "disk":
        raise ValueError("cache=disk trains on .npy copies of the images instead of the files the ledger names; use "
                         "cache=ram or cache=False")
    if _on(args.get("distill_model")):
        raise ValueError("distill_model is not supported in DP mode (no per-image distillation loss); remove it")
    if args.get("split") not in (None, "val", "test"):
        raise ValueError(f"split={args['split']} validates on data that is not held out, and validation metrics, "
                         "plots and best.pt are released without noise; use split=val or split=test")
    if isinstance(args.get("data"), (list, tuple)):
        raise ValueError("data as a list trains one run per dataset with one DifferentialPrivacy object; train them "
                         "one by one, each with its own DifferentialPrivacy (the ledger composes them)")


def refuse_unsafe_task_or_args(args: Any, explicit: Mapping[str, Any]) -> None:
    """``refuse_unsafe_args`` on a trainer's arguments, and a task DP mode does not support."""
    refuse_unsafe_args(vars(args), explicit)
    if args.task not in TASKS:
        raise ValueError(f"task={args.task!r} is not supported in DP mode; supported: {', '.join(TASKS)}")


def check_rank(trainer: Any, explicit: Mapping[str, Any] | None, rank: int, prepared: bool) -> None:
    """``on_pretrain_routine_end`` on every process of a multi-process (DDP) run. The launching
    process prepares the arguments (``DifferentialPrivacy.prepare``) and Ultralytics runs
    ``on_pretrain_routine_start`` on rank 0 only; the plugin runs it on the others (``prepared``).
    Refuse a run that was not prepared so (callbacks registered by hand, or the plugin off), and
    any rank whose arguments do not hold what DP mode needs."""
    if explicit is None:
        raise ValueError(f"device={trainer.args.device}: a multi-device private run must be prepared before its "
                         "processes start: use DifferentialPrivacy(...).attach(model) or the DP keys of model.train "
                         "/ yolo train, not callbacks registered by hand")
    if not prepared:
        raise RuntimeError(f"DP: process {rank} was not prepared for private training (Ultralytics prepares rank 0 "
                           "only; the ultralytics-dp plugin prepares the others): keep the plugin on "
                           "(ULTRALYTICS_DP_PLUGIN unset) with the supported Ultralytics version")
    args = trainer.args
    refuse_unsafe_task_or_args(args, explicit)
    mixing = mixing_on(vars(args))
    if mixing:
        raise RuntimeError(f"DP: {', '.join(mixing)} still on in process {rank}; refusing to train")


def prepare_trainer(trainer: Any, explicit: Mapping[str, Any]) -> None:
    """``on_pretrain_routine_start``, before the dataset is built: refuse or neutralise every
    argument in ``TRAINING_ARGS`` that needs it, and silence what would print training-set
    statistics. ``explicit``: the arguments the user set."""
    args = trainer.args
    refuse_unsafe_task_or_args(args, explicit)
    neutralise_args(args)
    if not explicit.get("amp") and args.amp and trainer.device.type != "cpu":
        args.amp = False
        log("amp=False: Ultralytics' AMP check downloads yolo26n.pt; pass amp=True explicitly to use AMP "
            "(gradients are clipped unscaled either way)")
    no_training_plots(trainer)
    quiet_training_set_scan(trainer)
    build_loaders_once(trainer)


def neutralised(args: Mapping[str, Any], log_changes: bool = False) -> dict[str, Any]:
    """The values DP mode gives the arguments that mix images by default (0: off); with
    ``log_changes``, one line names those that were on."""
    was_on = mixing_on(args)
    if log_changes and was_on and args.get("task") != "classify":  # classification never uses them
        log(f"turned off {', '.join(was_on)}: augmentations that mix images break per-image DP (per-image "
            "augmentations are allowed)")
    return {**dict.fromkeys(MIXING_AUGMENTATIONS, 0.0), "close_mosaic": 0}


def neutralise_args(args: Any) -> None:
    """Switch off, on the trainer's args, what mixes images by default."""
    vars(args).update(neutralised(vars(args), log_changes=True))


def build_loaders_once(trainer: Any) -> None:
    """Ultralytics 8.4.190 builds the loaders with ``_build_train_pipeline`` (a private name: there is
    no public hook) once at set-up, and again only in its out-of-memory recovery, which would swap in
    a shuffled loader with half the batch (q changes) and raise accumulate: that is refused. Its
    detection version also scans every training label for the largest object count, prints it and
    raises ``max_det`` to it (written into checkpoints): the base version is used, which does not."""
    from ultralytics.engine.trainer import BaseTrainer

    built = []

    def build_once() -> None:
        if built:
            raise MemoryError("DP: out of memory in a private run; Ultralytics' recovery would rebuild a shuffled "
                              "loader with half the batch, which breaks Poisson sampling: lower physical_batch (or "
                              "imgsz) and start again")
        built.append(True)
        BaseTrainer._build_train_pipeline(trainer)

    trainer._build_train_pipeline = build_once


def no_training_plots(trainer: Any) -> None:
    """Never draw training images or training-label statistics (train_batch*.jpg, labels.jpg), even
    with plots=True: only validation plots (a public set) are drawn."""
    trainer.plot_training_samples = lambda batch, ni: None
    trainer.plot_training_labels = lambda: None


def quiet_training_set_scan(trainer: Any) -> None:
    """Build the training set without Ultralytics' scan output: "N images, K backgrounds, C corrupt"
    and per-file label warnings are statistics of the private set without noise. (A training set
    Ultralytics would drop images from is refused later, with a message naming the file.)"""
    build = trainer.build_dataset

    def build_dataset(img_path: Any, mode: str = "train", batch: Any = None) -> Any:
        if mode != "train":
            return build(img_path, mode, batch)
        with quiet_console():
            return build(img_path, mode, batch)

    trainer.build_dataset = build_dataset


def loss_names(model: nn.Module) -> tuple[str, ...]:
    """The names of the loss items the trainer expects from ``model.loss``."""
    crit = getattr(model, "criterion", None)
    names = getattr(getattr(crit, "one2one", crit), "loss_names", None)
    return tuple(names) if names else ("loss",)


class _PrivateLoss:
    """``model.loss`` for the length of one training batch; refuses to be copied."""

    def __init__(self, guard: "TrainerGuard") -> None:
        self.guard = guard

    def __call__(self, batch: dict, preds: Any = None) -> tuple[Tensor, dict[str, Tensor]]:
        return self.guard.private_loss(batch)

    def __deepcopy__(self, memo: dict) -> None:
        raise RuntimeError("DP: the model was copied while it carried the private step; a copy (EMA, validator) "
                           "must never take private steps")


class TrainerGuard:
    """Holds one trainer to DP-SGD from ``on_pretrain_routine_end`` on: the Poisson loader, the private
    step, one optimizer step per private gradient.

    ``step(batch)`` computes the private gradient of one Poisson batch into the parameters' ``.grad``
    and counts it; the guard calls it for the trainer, once per optimizer step, and only from the
    trainer's own training batch. The private step sits on the model as ``loss`` only between
    ``on_train_batch_start`` and ``on_train_batch_end``, so no copy of the model made elsewhere
    (NaN recovery's EMA rebuild, checkpoints, the validator) can carry it.
    """

    def __init__(self, step: Callable[[dict], None], loader: Any, progress: Callable[[], dict[str, float]]) -> None:
        self.step = step
        self.loader = loader
        self.progress = progress  # what the progress bar shows in place of the (private) training losses
        self.trainer: Any = None
        self._fresh = False  # a private gradient waits for its optimizer step

    def install(self, trainer: Any) -> None:
        """Wire the trainer: Poisson loader, accumulate 1, no loss scaling, guarded optimizer step, no
        memory figure in the progress bar."""
        self.trainer = trainer
        trainer.train_loader = self.loader
        trainer.accumulate = 1  # one noise draw per logical batch; the warm-up ramps 1 -> 1
        trainer.scaler = torch.amp.GradScaler(enabled=False)  # clip true gradients, never loss-scaled ones

        def guarded_optimizer_step() -> None:
            """Ultralytics' optimizer step (8.4.190) without its clip of the batch gradient to norm 10,
            which after the noise only rescales the learning rate; the scaler is disabled."""
            if not self._fresh:
                raise RuntimeError("DP: the trainer tried an optimizer step without a fresh private gradient; "
                                   "refusing (every step must be one counted private step)")
            self._fresh = False
            trainer.optimizer.step()
            trainer.optimizer.zero_grad()
            if trainer.ema:
                trainer.ema.update(trainer.model)

        trainer.optimizer_step = guarded_optimizer_step
        # The progress bar prints accelerator memory reserved, which grows with the largest Poisson
        # batch so far. _get_memory (private in 8.4.190) also feeds cache clearing: keep fractions.
        get_memory = trainer._get_memory
        trainer._get_memory = lambda fraction=False: get_memory(fraction=True) if fraction else 0.0

    def on_train_batch_start(self, trainer: Any) -> None:
        """BatchNorm frozen (the trainer puts the model in train mode every epoch); private step on;
        the progress bar shows this step's values, not a running mean."""
        freeze_batchnorm(trainer.model)
        trainer.model.loss = _PrivateLoss(self)
        trainer.tloss = None

    def on_train_batch_end(self, trainer: Any) -> None:
        """Private step off: between batches the model is the plain Ultralytics model."""
        trainer.model.__dict__.pop("loss", None)

    def on_train_epoch_end(self, trainer: Any) -> None:
        """Before validation: loss items named as the criterion names them (the validator sums its
        losses into them). An epoch with no step left (the budget ran out, e.g. when NaN recovery
        redoes the last epoch) leaves the trainer without ``tloss``, which it reads."""
        if trainer.tloss is None:
            trainer.tloss = self.progress()
        # the validator takes its loss names from the last training step's items: the criterion's
        trainer.loss_items = {name: torch.zeros((), device=trainer.device) for name in trainer.loss_names}

    def private_loss(self, batch: dict) -> tuple[Tensor, dict[str, float]]:
        """What the trainer's forward returns in DP mode: the private gradient is already in ``.grad``;
        the loss is a constant whose backward touches no parameter, and the "loss items" the
        progress bar prints are ``progress()`` (training losses are statistics of private data
        without noise)."""
        trainer = self.trainer
        changed = [name for name, ok in (("train_loader", trainer.train_loader is self.loader),
                                         ("accumulate", trainer.accumulate == 1),
                                         ("scaler", not trainer.scaler.is_enabled())) if not ok]
        if changed:
            raise RuntimeError(f"DP: the trainer changed {', '.join(changed)} during a private run; refusing the step")
        if self._fresh:
            raise RuntimeError("DP: a second private gradient before the optimizer step; refusing the step")
        self.step(batch)
        self._fresh = True
        hide_batch_statistics(batch)
        dummy = torch.zeros((), device=batch["img"].device, requires_grad=True)
        return dummy, self.progress()


def show_privacy_not_losses(trainer: Any, columns: tuple[str, ...]) -> None:
    """The per-step columns of the progress bar show ``columns`` (epsilon spent, steps) in place of
    the training losses; training losses are never logged or written to results.csv (nor plotted
    in results.png), validation losses are. Accelerator memory and the instance count of a Poisson
    batch stay hidden (printed as 0)."""
    if getattr(trainer.model, "criterion", None) is None:  # built on the first loss call otherwise
        trainer.model.criterion = trainer.model.init_criterion()
    trainer.loss_names = loss_names(trainer.model)  # the criterion's: they name the validation losses
    if trainer.metrics is not None:  # None on ranks other than 0 of a multi-process run
        trainer.metrics.update(dict.fromkeys(trainer.label_loss_items(prefix="val"), 0.0))
    label = trainer.label_loss_items

    def label_loss_items(loss_items: Any = None, prefix: str = "train") -> Any:
        if prefix == "train":
            return [] if loss_items is None else {}
        return label(loss_items, prefix)

    trainer.label_loss_items = label_loss_items
    header = ("Epoch", "hidden", *columns, "hidden", "Size")
    trainer.progress_string = lambda: ("\n" + "%11s" * len(header)) % header


def hide_batch_statistics(batch: dict) -> None:
    """Empty a used batch's labels: after the step the trainer prints ``batch["cls"].shape[0]`` (boxes in
    the Poisson batch, or its size), a private statistic, in the progress bar."""
    for key in ("cls", "bboxes", "batch_idx"):
        if key in batch:
            batch[key] = batch[key][:0]


def freeze_batchnorm(model: nn.Module) -> None:
    """BatchNorm in eval mode: no batch statistics (no mixing), running stats never updated."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()

