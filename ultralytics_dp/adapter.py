"""DP-SGD inside the Ultralytics trainer, through callbacks (a dict of event -> function).

``DifferentialPrivacy(...).attach(model)`` registers the callbacks with ``model.add_callback``.
What the trainer may and may not do in a private run is decided in ``guard`` (refused and
neutralised training arguments, the guarded loader, recoveries and copies of the model); this
module plans the run and owns its accountant and ledger record:

* on_pretrain_routine_start: ``guard`` refuses or neutralises what mixes images or computes
  statistics of the training set, resolves ``digits-det``/``digits-cls``, reads the ``dp`` entry
  of a checkpoint being resumed.
* on_pretrain_routine_end: check the training set, freeze BatchNorm, restore a resumed
  accountant, calibrate sigma, compute the step budget (run and dataset lifetime budget, from
  the ledger), record the run in the ledger, and let ``guard.TrainerGuard`` install the Poisson
  loader (one logical batch per optimizer step, q = batch / N, each epoch's steps reserved in the
  ledger before the first of them) and the private step: per-image clipped gradients in
  physical chunks, one Gaussian draw, division by the expected batch size q*N, into ``.grad``.
  Ultralytics' own ``optimizer_step`` (its batch-level clip, EMA) is post-processing.
* on_train_batch_start / on_train_batch_end: the private step is on the model only in between.
* on_train_epoch_end / on_model_save / on_train_end: report epsilon, write the ``dp`` entry
  (every checkpoint states every step taken before it was written; at the end, best.pt and
  last.pt state the whole run).

Privacy assumptions: one image with all its labels is one record; the training set seen by the
trainer is the private set of size N; delta < 1/N; N, q, the validation set (used for metrics
and best.pt selection), the architecture and the training arguments are public. A checkpoint
links to its ledger record by a random run id only, never by a hash of the data. Training losses
and per-batch counts are not logged: they are computed on private data without noise.
"""

from __future__ import annotations

import math
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import __version__, datasets, ghost, guard, offline
from .accounting import ACCOUNTANT_NAME, PrivacyAccountant, Segment, get_noise_multiplier, max_steps, plan
from .ledger import Ledger
from .grad_sample import check_no_train_batchnorm, trainable_params
from .guard import MIXING_AUGMENTATIONS, TrainerGuard, freeze_batchnorm
from .losses import batch_losses, check_supported, per_image_loss_fn, sample_batch
from .mechanism import clipped_grad_sum, private_mean
from .sampling import PoissonBatchSampler, split_physical

# "ghost": norms without per-sample gradients + book-keeping (Conv2d/Linear/BN models);
# "vmap": torch.func per-sample gradients (any layer); "auto": ghost where supported
GRAD_METHODS = ("auto", "ghost", "vmap")
PRIVACY_UNIT = "image"


def _log(message: str) -> None:
    from ultralytics.utils import LOGGER

    LOGGER.info(f"DP: {message}")


def _warn(message: str) -> None:
    from ultralytics.utils import LOGGER

    LOGGER.warning(f"DP: {message}")


def _select(batch: dict, idx: list[int]) -> dict:
    """The images ``idx`` of a collated Ultralytics batch, labels re-indexed (detection)."""
    index = torch.tensor(idx, dtype=torch.long, device=batch["img"].device)
    out = {"img": batch["img"][index]}
    if "batch_idx" in batch:
        owner = batch["batch_idx"].long()
        remap = torch.full((batch["img"].shape[0],), -1, dtype=torch.long, device=owner.device)
        remap[index.to(owner.device)] = torch.arange(len(idx), device=owner.device)
        keep = remap[owner] >= 0
        out.update(batch_idx=remap[owner][keep].to(batch["batch_idx"].dtype),
                   cls=batch["cls"][keep], bboxes=batch["bboxes"][keep])
    else:
        out["cls"] = batch["cls"][index]
    return out


class PoissonLoader:
    """Drop-in for the trainer's train loader: each item is one Poisson logical batch.

    ``len()`` is the steps per epoch; an epoch yields fewer when the privacy budget runs out.
    Empty batches are yielded (as a zero-length batch): they are steps too.
    """

    def __init__(self, dataset: Any, sample_rate: float, steps_per_epoch: int, budget: Callable[[], int],
                 reserve: Callable[[int], None], workers: int = 0, secure: bool = False) -> None:
        self.dataset = dataset
        self.sample_rate = sample_rate
        self.steps_per_epoch = steps_per_epoch
        self.budget = budget  # steps still allowed
        self.reserve = reserve  # write-ahead: called with the epoch's step count before its first step
        self.num_workers = workers
        self.secure = secure
        self._collate = getattr(dataset, "collate_fn", None) or torch.utils.data.default_collate
        self._empty = None

    def __len__(self) -> int:
        return self.steps_per_epoch

    def reset(self) -> None:
        """Ultralytics calls this after closing mosaic; our batches are drawn fresh every epoch."""

    def _collate_or_empty(self, items: list) -> dict:
        if items:
            return self._collate(items)
        if self._empty is None:  # a zero-length batch with the dataset's structure
            one = self._collate([self.dataset[0]])
            self._empty = {k: v[:0] for k, v in one.items()}
        return {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in self._empty.items()}

    def __iter__(self):
        # a generator: nothing runs (and nothing is reserved) until the first batch is asked for;
        # the trainer creates, and drops, one extra iterator per epoch
        steps = min(self.steps_per_epoch, self.budget())
        self.reserve(steps)
        sampler = PoissonBatchSampler(len(self.dataset), self.sample_rate, steps, secure=self.secure)
        yield from torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, collate_fn=self._collate_or_empty, num_workers=self.num_workers
        )


class DifferentialPrivacy:
    """(epsilon, delta)-DP training of an Ultralytics YOLO model, per training image.

    ``noise_multiplier=None`` calibrates sigma so the planned ``epochs`` spend exactly ``epsilon``;
    either way training stops before the step that would exceed ``epsilon``. Ultralytics' ``batch``
    is the *expected* logical batch size: q = batch / N. ``physical_batch`` caps how many images'
    gradients are computed at once (memory), without changing q.

    Every run is recorded in the write-ahead ledger (``ledger=`` path, ``$ULTRALYTICS_DP_LEDGER``
    or the user config dir; ``ledger=False`` opts out) under a fingerprint of the training set.
    ``dataset_budget`` caps the epsilon of all runs on that dataset together. ``secure_mode`` draws
    noise and batches from the OS CSPRNG. ``grad_method`` picks how clipped sums are computed:
    "ghost" (mixed ghost clipping + book-keeping, one forward and one backward), "vmap"
    (``torch.func`` per-sample gradients) or "auto" (ghost when every layer supports it); both give
    the same clipped sum.
    """

    def __init__(
        self,
        epsilon: float,
        delta: float = 1e-5,
        max_grad_norm: float = 1.0,
        noise_multiplier: float | None = None,
        physical_batch: int | None = None,
        *,
        dataset_budget: float | None = None,
        ledger: str | Path | bool | None = None,
        secure_mode: bool = False,
        grad_method: str = "auto",
    ) -> None:
        for name, value in (("epsilon", epsilon), ("delta", delta), ("max_grad_norm", max_grad_norm)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        if noise_multiplier is not None and (not math.isfinite(noise_multiplier) or noise_multiplier <= 0):
            raise ValueError(f"noise_multiplier must be > 0 (or None to calibrate it), got {noise_multiplier}")
        if physical_batch is not None and (not isinstance(physical_batch, int) or physical_batch < 1):
            raise ValueError(f"physical_batch must be an integer >= 1, got {physical_batch!r}")
        if dataset_budget is not None and (not math.isfinite(dataset_budget) or dataset_budget <= 0):
            raise ValueError(f"dataset_budget must be a finite epsilon > 0, got {dataset_budget}")
        if grad_method not in GRAD_METHODS:
            raise ValueError(f"grad_method must be one of {', '.join(GRAD_METHODS)}, got {grad_method!r}")
        if dataset_budget is not None and ledger is False:
            raise ValueError("dataset_budget needs the ledger (it sums every run on the dataset); remove "
                             "ledger=False or dataset_budget")
        self.grad_method = grad_method
        self.dataset_budget = dataset_budget
        self.secure_mode = bool(secure_mode)
        # ledger=False turns it off; None means the default path (or $ULTRALYTICS_DP_LEDGER)
        self.ledger = None if ledger is False else Ledger(None if ledger is True else ledger)
        self.run_id: str | None = None  # random; only the local ledger links it to the training data
        self._resume: dict[str, Any] | None = None
        self.target_epsilon = float(epsilon)
        self.delta = float(delta)
        self.max_grad_norm = float(max_grad_norm)
        self.noise_multiplier = noise_multiplier
        self._given_sigma = noise_multiplier is not None
        self.physical_batch = physical_batch
        self.accountant = PrivacyAccountant()
        self.sample_rate: float | None = None
        self.num_samples: int | None = None
        self.planned_steps = 0
        self.max_steps = 0
        self.noise_draws = 0
        self.stopped_by_budget = False
        self.guard: TrainerGuard | None = None
        self._epsilon_cache: tuple[int, float] = (0, 0.0)
        self._explicit: dict[str, Any] | None = None
        self.save_dir: Path | None = None
        self.callbacks: dict[str, Callable] = {
            "on_pretrain_routine_start": self.on_pretrain_routine_start,
            "on_pretrain_routine_end": self.on_pretrain_routine_end,
            "on_train_batch_start": self.on_train_batch_start,
            "on_train_batch_end": self.on_train_batch_end,
            "on_train_epoch_end": self.on_train_epoch_end,
            "on_model_save": self.on_model_save,
            "on_train_end": self.on_train_end,
        }

    # ----------------------------------------------------------------- user-facing
    @property
    def steps(self) -> int:
        """Optimizer steps taken (each one noise draw, each one accounted)."""
        return self.accountant.steps

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (PRV upper bound)."""
        if self._epsilon_cache[0] != self.steps:
            self._epsilon_cache = (self.steps, self.accountant.get_epsilon(self.delta))
        return self._epsilon_cache[1]

    def attach(self, model: Any) -> "DifferentialPrivacy":
        """Register the callbacks on an Ultralytics ``YOLO`` model; its next ``train()`` is private.

        ``model.train`` is wrapped (on this instance only) to record which keys the user set
        explicitly, so an explicit ``mosaic=1.0`` is refused rather than silently overridden.
        """
        offline.patch_ultralytics()
        for event, fn in self.callbacks.items():
            model.add_callback(event, fn)
        train = model.train

        def private_train(*args: Any, **kwargs: Any) -> Any:
            self._explicit = dict(kwargs)
            if kwargs.get("cfg"):
                from ultralytics.utils import YAML

                self._explicit = {**YAML.load(kwargs["cfg"]), **kwargs}
            # in the launching process: a multi-device run spawns workers before any callback runs here
            guard.refuse_unsafe_args(_planned_args(model, self._explicit), self._explicit)
            if "data" in kwargs:
                kwargs["data"] = datasets.resolve(kwargs["data"])
            try:
                return train(*args, **kwargs)
            except FileNotFoundError as err:  # Ultralytics' multi-line "Error loading data ..."
                self._discard_unstarted_run()
                raise ValueError(f"cannot load the training set: {_one_line(err)}") from None
            except Exception:
                self._discard_unstarted_run()
                raise

        model.train = private_train
        return self

    def _discard_unstarted_run(self) -> None:
        """A run refused before its first step leaves nothing behind: remove the save dir that
        Ultralytics created for it if it holds only its args.yaml (and an empty weights dir)."""
        save_dir = getattr(self, "save_dir", None)
        if self.noise_draws or save_dir is None or not save_dir.is_dir():
            return
        files = [p for p in save_dir.rglob("*") if p.is_file()]
        if all(p.name == "args.yaml" for p in files):
            shutil.rmtree(save_dir, ignore_errors=True)

    def info(self) -> dict[str, Any]:
        """The ``dp`` entry written into checkpoints."""
        return {
            "epsilon": self.epsilon,
            "target_epsilon": self.target_epsilon,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "max_grad_norm": self.max_grad_norm,
            "stopped_by_budget": self.stopped_by_budget,
            "num_samples": self.num_samples,
            "accountant": ACCOUNTANT_NAME,
            "accountant_state": self.accountant.state_dict(),
            "secure_mode": self.secure_mode,
            "run_id": self.run_id,
            "privacy_unit": PRIVACY_UNIT,
            "version": __version__,
        }

    @staticmethod
    def report(path: str | Path) -> dict[str, Any]:
        """Print and return the ``dp`` entry of a checkpoint written by a private run."""
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        info = ckpt.get("dp") if isinstance(ckpt, dict) else None
        if not info:
            raise ValueError(f"{path} has no 'dp' entry: it was not trained with ultralytics-dp")
        print(summary_line(info))
        return info

    # ----------------------------------------------------------------- set-up
    def on_pretrain_routine_start(self, trainer: Any) -> None:
        """Before the dataset is built: refuse or neutralise anything that mixes images or computes
        statistics of the training set (see ``guard.TRAINING_ARGS``)."""
        from ultralytics.cfg import DEFAULT_CFG_DICT

        offline.patch_ultralytics()
        self.save_dir = Path(trainer.save_dir)  # created by Ultralytics; removed if the run is refused
        args = trainer.args
        explicit = self._explicit
        if explicit is None:  # callbacks registered by hand: treat non-default values as explicit
            explicit = {k: v for k, v in vars(args).items() if v != DEFAULT_CFG_DICT.get(k)}
        guard.refuse_unsafe_args(vars(args), explicit)
        check_single_process(trainer)
        check_supported_task(args.task)
        overridden = guard.neutralise_args(args)
        if overridden:
            _log(f"turned off {', '.join(overridden)}: augmentations that mix images break per-image DP "
                 "(per-image augmentations stay on)")
        if not explicit.get("amp") and args.amp and trainer.device.type != "cpu":
            args.amp = False
            _log("amp=False: Ultralytics' AMP check downloads yolo26n.pt; pass amp=True explicitly to use AMP "
                 "(gradients are clipped unscaled either way)")
        guard.no_training_plots(trainer)
        guard.quiet_training_set_scan(trainer)
        if explicit.get("plots"):
            _log("plots=True: validation plots only; train_batch*.jpg and labels.jpg (private images and label "
                 "statistics) are not drawn in DP mode")
        else:
            args.plots = False
        args.data = datasets.resolve(args.data)
        if args.resume:
            state = torch.load(args.resume, map_location="cpu", weights_only=False).get("dp")
            if not state:
                raise ValueError(f"{args.resume} has no 'dp' entry: it was not trained privately, so it cannot "
                                 "resume a private run; start a new run instead")
            self._resume = state

    def on_pretrain_routine_end(self, trainer: Any) -> None:
        """Model, loader and optimizer exist: freeze BN, plan the budget, install the private step."""
        check_single_process(trainer)  # runs on every rank
        model = trainer.model
        check_supported(model)
        freeze_batchnorm(model)
        dataset = trainer.train_loader.dataset
        check_training_set(dataset)
        n = len(dataset)
        if self.delta >= 1 / n:
            raise ValueError(
                f"delta={self.delta:g} must be < 1/N = {1 / n:.3g} for N={n} training images "
                f"(a delta of 1/N allows leaking one whole image); use delta <= {0.1 / n:.1g}"
            )
        q, planned = plan(num_samples=n, batch_size=float(trainer.args.batch), epochs=float(trainer.epochs))
        steps_per_epoch = planned // trainer.epochs
        if self._resume is not None:
            self._restore(self._resume, n, q)
        self.num_samples, self.sample_rate, self.planned_steps = n, q, planned
        if self.noise_multiplier is None:
            self.noise_multiplier = get_noise_multiplier(
                target_epsilon=self.target_epsilon, delta=self.delta, sample_rate=q, steps=planned
            )
            _log(f"calibrated noise_multiplier={self.noise_multiplier:.4f} to spend epsilon={self.target_epsilon:g} "
                 f"over {planned} steps")
        budget = max_steps(
            target_epsilon=self.target_epsilon, delta=self.delta, noise_multiplier=self.noise_multiplier, sample_rate=q
        ) - self.steps  # a resumed accountant has spent some already
        if budget <= 0:
            raise ValueError(
                f"epsilon={self.target_epsilon:g} does not allow another step at noise_multiplier="
                f"{self.noise_multiplier:g}, q={q:.4g}; raise epsilon or the noise multiplier"
            )
        remaining = min(budget, planned - self.steps)
        if self.ledger is not None:
            remaining = self._open_ledger_run(trainer, dataset, remaining)
        self.max_steps = self.steps + remaining
        _log(f"N={n} images, q={q:.5g} (expected batch {trainer.args.batch}), {steps_per_epoch} steps/epoch, "
             f"{planned} planned, {remaining} allowed from step {self.steps}, C={self.max_grad_norm:g}, "
             f"delta={self.delta:g}" + (", secure mode" if self.secure_mode else ""))

        loader = PoissonLoader(
            dataset, q, steps_per_epoch, lambda: self.max_steps - self.steps, self._reserve,
            workers=trainer.train_loader.num_workers, secure=self.secure_mode,
        )
        self.guard = TrainerGuard(self._private_step_fn(trainer), loader)
        self.guard.install(trainer)

    def on_train_batch_start(self, trainer: Any) -> None:
        self.guard.on_train_batch_start(trainer)

    def on_train_batch_end(self, trainer: Any) -> None:
        self.guard.on_train_batch_end(trainer)

    # ----------------------------------------------------------------- ledger and resume
    def _open_ledger_run(self, trainer: Any, dataset: Any, remaining: int) -> int:
        """Fingerprint the training set, check the dataset's lifetime budget, record the run.

        Returns how many steps this run may take: fewer than ``remaining`` when a given
        noise_multiplier would push the dataset past its budget. Nothing is written when the run
        is refused. A resumed run must train on the data its ledger record names."""
        fingerprint = self.ledger.fingerprint(dataset_records(dataset))
        if self._resume is not None:
            recorded = self.ledger.run(self.run_id)
            if recorded is None:
                raise ValueError(f"the run being resumed (run_id {self.run_id}) is not in the ledger {self.ledger.path}; "
                                 "resume with ledger= set to the ledger it was recorded in")
            if recorded["fingerprint"] != fingerprint:
                raise ValueError("resume must train on the training data of the run it continues, and this data "
                                 "differs (by the ledger's identity of the data); start a new run instead")
        known = self.ledger.dataset(fingerprint) or {}
        budgets = [b for b in (self.dataset_budget, known.get("budget")) if b is not None]
        if budgets:
            budget, delta = min(budgets), known.get("delta", self.delta)
            planned = Segment(self.noise_multiplier, self.sample_rate, remaining)
            if self.ledger.epsilon(fingerprint, [planned], delta=delta) > budget:
                allowed = self._steps_within(fingerprint, delta, budget, remaining) if self._given_sigma else 0
                if allowed == 0:
                    spent = self.ledger.epsilon(fingerprint, delta=delta)
                    raise ValueError(
                        f"this run would take the dataset past its lifetime budget epsilon={budget:g}: it has "
                        f"spent {spent:.4f} (at delta={delta:g}), {max(budget - spent, 0):.4f} is left; lower "
                        "epsilon or epochs, or give noise_multiplier to train until the budget is reached"
                    )
                _log(f"dataset budget epsilon={budget:g} allows {allowed} of {remaining} steps")
                remaining = allowed
        self.ledger.register_dataset(fingerprint, delta=self.delta, num_samples=len(dataset),
                                     budget=self.dataset_budget, description=str(trainer.args.data))
        if self.run_id is None:  # a resumed run keeps appending to its own record
            self.run_id = self.ledger.start_run(fingerprint, self._settings(), name=str(trainer.save_dir))
        return remaining

    def _steps_within(self, fingerprint: str, delta: float, budget: float, upper: int) -> int:
        """Largest T <= upper whose addition keeps the dataset's epsilon within ``budget``."""
        lo, hi = 0, upper + 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            seg = Segment(self.noise_multiplier, self.sample_rate, mid)
            lo, hi = (mid, hi) if self.ledger.epsilon(fingerprint, [seg], delta=delta) <= budget else (lo, mid)
        return lo

    def _reserve(self, steps: int) -> None:
        """Write-ahead: record the epoch's steps in the ledger before the first of them is taken."""
        if self.ledger is not None and self.run_id is not None:
            self.ledger.reserve(self.run_id, steps=steps, noise_multiplier=self.noise_multiplier,
                                sample_rate=self.sample_rate)

    def _settings(self) -> dict[str, Any]:
        return {"target_epsilon": self.target_epsilon, "delta": self.delta, "max_grad_norm": self.max_grad_norm,
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "num_samples": self.num_samples}

    def _restore(self, state: dict[str, Any], n: int, q: float) -> None:
        """Continue a run from its checkpoint's ``dp`` entry; any change of DP settings, or of the
        ledger setting, is an error. With the ledger on, the training data is checked against the
        run's ledger record (``_open_ledger_run``). With ``ledger=False`` throughout, other data of the
        same size is not detected; the resumed accountant still bounds every image of either set
        (each was in at most every step, at rate q) and nothing is recorded that could be misattributed."""
        expected = {"target_epsilon": self.target_epsilon, "delta": self.delta, "max_grad_norm": self.max_grad_norm,
                    "num_samples": n, "sample_rate": q}
        if self._given_sigma:
            expected["noise_multiplier"] = self.noise_multiplier
        changed = [f"{k}: {state.get(k)} -> {v}" for k, v in expected.items()
                   if state.get(k) is None or not math.isclose(state[k], v, rel_tol=1e-9)]
        if changed:
            raise ValueError(f"resume must keep the DP settings of the run ({', '.join(changed)}); start a new run "
                             "instead (the ledger composes it with this one)")
        if (state.get("run_id") is None) != (self.ledger is None):
            raise ValueError("resume must keep the ledger setting of the run: it was trained with "
                             + ("ledger=False; resume with ledger=False" if state.get("run_id") is None
                                else "the ledger on; resume with the ledger it was recorded in"))
        self.noise_multiplier = state["noise_multiplier"]
        self.accountant.load_state_dict(state["accountant_state"])
        self.noise_draws = self.accountant.steps
        self.run_id = state.get("run_id")
        _log(f"resumed at step {self.steps} (epsilon={self.epsilon:.4f}) with noise_multiplier={self.noise_multiplier:g}")

    # ----------------------------------------------------------------- the private step
    def _private_step_fn(self, trainer: Any) -> Callable[[dict], None]:
        method = resolve_grad_method(trainer.model, self.grad_method)
        _log(f"per-sample clipping with the {method} path")

        def private_step(batch: dict) -> None:
            """One DP-SGD step's gradient into ``.grad`` of the trainer's model, counted."""
            if self.steps >= self.max_steps:  # the loader never yields past the budget: fail closed
                raise RuntimeError(f"DP: step {self.steps + 1} would exceed the budget of {self.max_steps}")
            model = trainer.model
            grad = private_gradient(
                model, batch, method=method, max_grad_norm=self.max_grad_norm,
                noise_multiplier=self.noise_multiplier, expected_batch_size=self.sample_rate * self.num_samples,
                physical_batch=self.physical_batch, secure=self.secure_mode,
            )
            for k, p in trainable_params(model).items():
                p.grad = grad[k].to(p.dtype)
            self.noise_draws += 1
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
            if self.steps >= self.max_steps:
                trainer.stop = True
                self.stopped_by_budget = self.steps < self.planned_steps

        return private_step

    # ----------------------------------------------------------------- reporting
    def on_train_epoch_end(self, trainer: Any) -> None:
        self.guard.on_train_epoch_end(trainer)
        eps = self.epsilon
        _log(f"epoch {trainer.epoch + 1}: epsilon={eps:.4f} (target {self.target_epsilon:g}), delta={self.delta:g}, "
             f"steps={self.steps}")
        trainer.lr["dp/epsilon"] = round(eps, 6)  # saved into results.csv with this epoch's row

    def on_model_save(self, trainer: Any) -> None:
        """Every checkpoint on disk states the epsilon of every step taken so far: best.pt too, since
        which epoch it holds depends on every epoch validated since (it is a function of the run)."""
        period = trainer.save_period > 0 and trainer.epoch % trainer.save_period == 0
        epoch_file = trainer.wdir / f"epoch{trainer.epoch}.pt" if period else None
        for f in (trainer.last, trainer.best, epoch_file):
            if f is not None and Path(f).exists():
                write_dp_entry(f, self.info())

    def on_train_end(self, trainer: Any) -> None:
        """The checkpoints the run releases state the whole run (after Ultralytics' final rewrite)."""
        for f in (trainer.last, trainer.best):
            if Path(f).exists():
                write_dp_entry(f, self.info())
        _log(summary_line(self.info()))


def resolve_grad_method(model: nn.Module, method: str) -> str:
    """'auto' -> 'ghost' when every trainable layer supports it, else 'vmap'."""
    if method == "auto":
        return "ghost" if ghost.supports(model) else "vmap"
    if method == "ghost" and not ghost.supports(model):
        raise ValueError("grad_method='ghost' needs a model whose trainable layers are Conv2d, Linear and "
                         "BatchNorm only; use grad_method='vmap'")
    return method


def private_gradient(
    model: nn.Module, batch: dict, *, method: str, max_grad_norm: float, noise_multiplier: float,
    expected_batch_size: float, physical_batch: int | None = None, secure: bool = False,
) -> dict[str, Tensor]:
    """The DP gradient of one logical (Poisson) batch: per-image clipped gradients summed over
    physical chunks (an image with a non-finite gradient adds nothing), one Gaussian draw, divided
    by the expected batch size. ``batch`` is a preprocessed Ultralytics training batch."""
    check_no_train_batchnorm(model)
    total = {k: torch.zeros_like(p) for k, p in trainable_params(model).items()}
    n = batch["img"].shape[0]
    loss_fn = per_image_loss_fn(model)
    try:
        for idx in split_physical(list(range(n)), physical_batch or max(n, 1)):
            chunk = _select(batch, idx)
            if method == "ghost":
                sums, _ = ghost.clipped_grad_sum_ghost(model, lambda m: batch_losses(m, chunk),
                                                           max_grad_norm=max_grad_norm)
            else:
                sums, _ = clipped_grad_sum(model, loss_fn, sample_batch(model, chunk), max_grad_norm=max_grad_norm)
            for k in total:
                total[k] += sums[k]
    except RuntimeError as err:
        if "out of memory" in str(err).lower():  # Ultralytics would halve `batch` and change q
            raise MemoryError(f"DP: per-sample gradients need less memory; lower physical_batch ({err})") from None
        raise
    return private_mean(total, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                        expected_batch_size=expected_batch_size, secure=secure)


def dataset_records(dataset: Any) -> list[tuple[str, str]]:
    """(image path, label text) for every record the trainer will sample from: the input of the
    ledger's fingerprint. Detection: the YOLO label file; classification: the class index."""
    if hasattr(dataset, "label_files"):
        return [(im, Path(lb).read_text() if Path(lb).exists() else "")
                for im, lb in zip(dataset.im_files, dataset.label_files)]
    return [(str(sample[0]), str(sample[1])) for sample in dataset.samples]


def check_training_set(dataset: Any) -> None:
    """Refuse, before any step, a training set that is too small, has corrupt or out-of-range
    labels, or lost images that Ultralytics silently dropped as corrupt (N would be wrong)."""
    n = len(dataset)
    if n < 2:
        raise ValueError(f"the training set has {n} image(s); differential privacy needs at least 2")
    if not hasattr(dataset, "label_files"):
        return
    from ultralytics.data.utils import img2label_paths

    every_image = dataset.get_img_files(dataset.img_path)
    nc = len(dataset.data["names"])
    for label_file in img2label_paths(every_image):
        path = Path(label_file)
        if not path.exists():
            continue  # an image without labels is a valid record (background)
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            try:
                values = [float(v) for v in fields]
            except ValueError:
                raise ValueError(f"corrupt label file {path} line {lineno}: {line!r} is not numbers") from None
            if len(values) < 5 or len(values) % 2 == 0:
                raise ValueError(f"corrupt label file {path} line {lineno}: expected 'class x y w h', got {line!r}")
            if not values[0].is_integer() or not 0 <= values[0] < nc:
                raise ValueError(f"label file {path} line {lineno}: class {fields[0]} outside 0..{nc - 1}")
            if not all(0 <= v <= 1 for v in values[1:]):
                raise ValueError(f"label file {path} line {lineno}: coordinates must be normalised to [0, 1]")
    if len(every_image) != n:
        raise ValueError(f"Ultralytics dropped {len(every_image) - n} of {len(every_image)} training images as "
                         "corrupt; fix or remove them so the training set is what you think it is")


def _one_line(err: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def write_dp_entry(path: str | Path, info: dict[str, Any]) -> None:
    """Add ``info`` as the ``dp`` entry of a checkpoint (atomic replace)."""
    path = Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    ckpt["dp"] = info
    tmp = path.with_suffix(f".{time.time_ns()}.tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)


def summary_line(info: dict[str, Any]) -> str:
    return (f"({info['epsilon']:.4f}, {info['delta']:g})-DP per {info['privacy_unit']}: {info['steps']} steps, "
            f"noise_multiplier={info['noise_multiplier']:.4f}, q={info['sample_rate']:.5g}, "
            f"C={info['max_grad_norm']:g}, accountant={info['accountant']}"
            + (", stopped by budget" if info.get("stopped_by_budget") else ""))


def check_supported_task(task: str) -> None:
    if task not in {"detect", "classify"}:
        raise ValueError(f"task={task!r} is not supported in DP mode; supported: detect, classify")



def check_single_process(trainer: Any) -> None:
    """Refuse a multi-device (DDP) run on whichever rank gets here: each rank would sample with the
    global q and add its own noise, and gradients written to ``.grad`` bypass DDP's all-reduce."""
    from ultralytics.utils import RANK

    if trainer.world_size > 1 or RANK != -1:
        raise ValueError(f"device={trainer.args.device}: private training on several devices is not supported "
                         "yet; train on one device (e.g. device=0)")


def _planned_args(model: Any, explicit: dict[str, Any]) -> dict[str, Any]:
    """The training arguments ``model.train(**explicit)`` will use, as far as they can be known in the
    launching process (a resumed run takes its checkpoint's, which the new ones may override)."""
    planned = dict(model.overrides)
    resume = explicit.get("resume")
    if resume:
        path = resume if isinstance(resume, (str, Path)) and Path(resume).exists() else model.ckpt_path
        if path and Path(path).exists():
            planned.update(torch.load(path, map_location="cpu", weights_only=False).get("train_args") or {})
    return {**planned, **explicit}
