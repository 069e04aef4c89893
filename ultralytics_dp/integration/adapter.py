"""``DifferentialPrivacy``: DP-SGD in the Ultralytics trainer, as a dict of event -> small function.

``DifferentialPrivacy(epsilon=8).attach(model)`` registers ``callbacks`` with ``model.add_callback``.
Each callback hands its job to the module that owns it:

* before the trainer exists (``attach``'s ``train``, or the plugin): ``prepare`` refuses what mixes
  images (``guard``) and fills the DP defaults (``run_args.Defaults``).
* on_pretrain_routine_start: ``guard.prepare_trainer`` refuses or neutralises the training
  arguments that mix images or compute training-set statistics; a resumed run's ``dp`` entry is
  read (``checkpoint.resumed_entry``).
* on_pretrain_routine_end: the training set is checked (``training_set``) and named in the ledger
  (``run_ledger``), the run is planned (``accounting.planning.plan_run``: q, sigma, step budget)
  and ``guard.TrainerGuard`` installs the Poisson loader and the private step
  (``private_step.PrivateStep``: budget, clipping, noise, ``.grad``, accounting, in one place);
  before any of it, ``self_check`` verifies this Ultralytics' losses and the clipping on a few
  training images.
* on_train_batch_start / on_train_batch_end: the private step is on the model only in between.
* on_train_epoch_end / on_model_save / on_train_end: epsilon as a metric, and the ``dp`` entry
  (``checkpoint``) in every checkpoint: each states every step taken before it was written; at the
  end best.pt and last.pt state the whole run (which epoch best.pt holds depends on all of them).

Several devices (``distributed``): Ultralytics' launcher runs the trainer in one process per
device; the arguments are prepared in the launching process (``attach`` or the plugin), every rank
checks its own at ``on_pretrain_routine_end``, rank 0 alone plans, accounts, records and writes,
and every rank takes its plan and samples its own shard.

Privacy assumptions: one record is one image with all its labels, or with
``privacy_unit="person"`` one person with all of their images (``persons``: the file names every
image's person; a person is sampled, clipped and budgeted as one record); the training set the
trainer samples from is the private set of N records; delta < 1/N; N, q, the validation set
(metrics, best.pt selection), the architecture and the training arguments are public. A checkpoint links
to its ledger record by a random run id only, never by a hash of the data.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from ..accounting.ledger import Ledger
from ..accounting import accountant, prv
from ..accounting.accountant import PrivacyAccountant, Released
from ..accounting.pld import epsilon_curve
from ..accounting.planning import Plan, plan_run
from ..config import DPConfig
from ..console import log, one_line, quiet_console
from ..datasets import embedded as datasets
from ..losses.per_image import check_supported
from ..mechanism import distributed
from ..mechanism.sampling import PoissonLoader
from ..version import __version__
from ..accounting import group
from . import guard, keys, norms, offline, persons, run_args, run_ledger, self_check
from .checkpoint import read_dp_entry, resumed_entry, summary_line, write_dp_entry
from .explicit import user_set
from .guard import TrainerGuard, freeze_batchnorm
from .privacy_plot import plot_privacy
from .report_page import write_run_page
from .private_step import CLIPPED_SUM, PrivateStep, resolve_grad_method
from .training_set import check_distinct_images, check_training_set, identify_all, image_files

EPSILON_METRIC = "dp/epsilon"
CURVE_POINTS = 25  # step counts at which the planned epsilon is computed for the progress bar and privacy.png


class DifferentialPrivacy:
    """(epsilon, delta)-DP training of an Ultralytics YOLO model, per training image or per person.

    Takes the settings of ``config.DPConfig`` (``epsilon`` required; see ``DPConfig`` or the README
    for each one), or a ``DPConfig``. Ultralytics' ``batch`` is the *expected* logical batch size:
    q = batch / N. Training stops before the step that would exceed ``epsilon``. Every run is
    recorded in the write-ahead ledger unless ``ledger=False``.
    """

    def __init__(self, config: DPConfig | None = None, /, **settings: Any) -> None:
        if config is not None and settings:
            raise ValueError("give a DPConfig or settings, not both")
        self.config = config if config is not None else DPConfig(**settings)
        self._pid = os.getpid()  # another process's object: unpickled in a worker of Ultralytics' launcher
        ledger = self.config.ledger
        self.ledger = None if ledger is False else Ledger(None if ledger in (None, True) else ledger)
        self.accountant = PrivacyAccountant()
        self.plan: Plan | None = None
        self.max_steps = 0  # the plan's, lowered if the ledger grants fewer (another run on the same images)
        self.run_id: str | None = None  # random; only the local ledger links it to the training data
        self.noise_draws = 0
        self.stopped_by_budget = False
        self.guard: TrainerGuard | None = None
        self.save_dir: Path | None = None
        self._prepared: Any = None  # the trainer on_pretrain_routine_start prepared (on every rank)
        self._launched = False  # this object launched a multi-device run (its workers trained)
        self._resume: dict[str, Any] | None = None  # the dp entry of a checkpoint being resumed
        self._explicit: dict[str, Any] | None = None  # the training arguments the user set
        self.defaults = run_args.Defaults(self.config.augmult)
        self._args_ready = False  # defaults and neutralised arguments already in the trainer's arguments
        self._rewrite_args = False  # the trainer's arguments changed after Ultralytics wrote args.yaml
        self._released: tuple[int, Released] | None = None  # (steps, what they release)
        self.persons: persons.Persons | None = None  # whose images these are (rank 0 keeps the ids)
        self._person_released: tuple[int, Released] | None = None  # an image-level run, per person
        self._curve: list[tuple[int, float]] = []  # (steps, epsilon upper bound) of the plan, for display
        self.canaries: Any = None  # an audit's gradient canaries (``auditing.run``); never a user setting
        self.callbacks: dict[str, Callable[[Any], None]] = {
            "on_pretrain_routine_start": self.on_pretrain_routine_start,
            "on_pretrain_routine_end": self.on_pretrain_routine_end,
            "on_train_batch_start": lambda trainer: self.guard.on_train_batch_start(trainer),
            "on_train_batch_end": lambda trainer: self.guard.on_train_batch_end(trainer),
            "on_train_epoch_end": self.on_train_epoch_end,
            "on_model_save": self.on_model_save,
            "on_train_end": self.on_train_end,
        }

    # ----------------------------------------------------------------- what a user reads
    @property
    def steps(self) -> int:
        """Optimizer steps taken (each one noise draw, each one accounted)."""
        return self.accountant.steps

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta``: the larger of two independent upper bounds
        (``accounting.accountant``)."""
        return self.released.epsilon

    @property
    def released(self) -> Released:
        """The released epsilon so far and each accountant's upper bound."""
        if self._released is None or self._released[0] != self.steps:
            self._released = (self.steps, self.accountant.epsilon(self.delta))
        return self._released[1]

    @property
    def delta(self) -> float:
        return self.config.delta

    @property
    def noise_multiplier(self) -> float | None:
        """Sigma: the configured one, or the calibrated one once the run is planned."""
        return self.plan.noise_multiplier if self.plan else self.config.noise_multiplier

    def info(self) -> dict[str, Any]:
        """The ``dp`` entry written into checkpoints (``checkpoint``): settings and guarantee."""
        plan = self.plan
        return {
            "settings": self.config.released(),
            "epsilon": self.epsilon,
            "epsilon_by_accountant": dict(self.released.by_accountant),
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": plan and plan.sample_rate,
            "num_samples": plan and plan.num_samples,
            "steps": self.steps,
            "stopped_by_budget": self.stopped_by_budget,
            "accountant": accountant.NAME,
            "accountant_state": self.accountant.state_dict(),
            "prv_accountant_version": prv.VERSION,
            "run_id": self.run_id,
            "privacy_unit": self.config.privacy_unit,
            "person_epsilon": self.person_epsilon(),
            "version": __version__,
        }

    def person_epsilon(self) -> dict[str, Any] | None:
        """For an image-level run whose persons are known: the epsilon of the person with the most
        images in it (``accounting.group``: the mixture of their images; never the image-level figure).
        None for a person-level run (its epsilon is per person) or without a persons file."""
        if self.persons is None or self.config.privacy_unit == "person":
            return None
        k = self.persons.largest
        if self._person_released is None or self._person_released[0] != self.steps:
            self._person_released = (self.steps, accountant.release(group.person_segments(self.accountant.history, k),
                                                                    self.delta))
        return {"epsilon": self._person_released[1].epsilon, "images_per_person": k, "bound": group.BOUND}

    @property
    def launched_elsewhere(self) -> bool:
        """Whether this object was attached in another process (Ultralytics' multi-device launcher
        pickles it into its workers)."""
        return self._pid != os.getpid()

    @staticmethod
    def report(path: str | Path) -> dict[str, Any]:
        """Print and return the ``dp`` entry of a checkpoint written by a private run."""
        entry = read_dp_entry(path)
        print(summary_line(entry))
        return entry

    def attach(self, model: Any) -> "DifferentialPrivacy":
        """Register the callbacks on an Ultralytics ``YOLO`` model; its next ``train()`` is private.

        ``model.train`` is wrapped (on this instance only) to record which keys the user set
        explicitly (an explicit ``mosaic=1.0`` is refused, not silently overridden) and to refuse,
        in the launching process, what a multi-device run would do before any callback runs.
        """
        offline.patch_ultralytics()
        for event, fn in self.callbacks.items():
            model.add_callback(event, fn)
        train = model.train

        def private_train(*args: Any, **kwargs: Any) -> Any:
            cfg = kwargs.get("cfg")  # a missing file is refused by prepare, in one line
            explicit = user_set(cfg if isinstance(cfg, (str, Path)) and Path(cfg).is_file() else None, kwargs,
                                defaults_count=True)
            kwargs = self.prepare(run_args.planned_args(model, explicit), explicit, kwargs)
            before = getattr(model, "trainer", None)
            with self.unstarted_run_cleanup():
                try:
                    return train(*args, **kwargs)
                finally:
                    if getattr(model, "trainer", None) is not before:  # not an earlier run's trainer
                        self.collect_from_workers(model.trainer)

        def refuse_tune(*args: Any, **kwargs: Any) -> None:
            raise ValueError("model.tune() trains many runs without the DP callbacks; tune hyper-parameters on "
                             "public data, or run private trainings one by one (each spends privacy)")

        model.train, model.tune = private_train, refuse_tune
        return self

    def prepare(self, planned: dict[str, Any], explicit: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
        """Before the trainer exists (so before it writes args.yaml): refuse what DP mode refuses, and
        return ``overrides`` with the DP defaults and the neutralised arguments added.

        ``planned``: the arguments the run will use; ``explicit``: those the user set (an explicit
        ``mosaic=1.0`` is refused, a default one is set to 0); ``overrides``: what goes to the trainer."""
        self._check_unused()
        self._explicit = dict(explicit)
        for key in ("cfg", "resume"):  # Ultralytics would pick the latest run for a missing resume file
            value = explicit.get(key)
            if isinstance(value, (str, Path)) and not Path(value).is_file():
                raise ValueError(f"{key}={value} does not exist")
        guard.refuse_unsafe_args(planned, explicit)
        if not explicit.get("resume"):  # a resumed run keeps its own arguments (also via cfg=)
            overrides = {**self.defaults.apply(overrides, explicit), **guard.neutralised(planned, log_changes=True)}
            self._args_ready = True
        if "data" in overrides:
            overrides["data"] = datasets.resolve(overrides["data"])
        return overrides

    def recorded_settings(self) -> dict[str, Any]:
        """The DP settings as training arguments (args.yaml, the checkpoint's ``train_args``): the
        released ones (no ledger path), once Ultralytics' configuration knows the keys (``plugin``)."""
        return {k: v for k, v in self.config.released().items() if v is not None} if keys.active() else {}

    @contextlib.contextmanager
    def unstarted_run_cleanup(self) -> Iterator[None]:
        """A run that fails before its first step leaves no save dir behind; Ultralytics' multi-line
        "Error loading data" becomes one line."""
        try:
            yield
        except FileNotFoundError as err:
            self._discard_unstarted_run()
            raise ValueError(f"cannot load the training set: {one_line(err)}") from None
        except Exception:
            self._discard_unstarted_run()
            raise

    def collect_from_workers(self, trainer: Any) -> None:
        """After a multi-device run, which trains in worker processes: this object (the launching
        process's) takes the run's steps, accountant and run id from its last checkpoint, so that
        ``epsilon``, ``steps`` and a second ``train()`` behave as after a single-process run."""
        if not getattr(trainer, "ddp", False):
            return
        self._launched = True  # its workers may have taken steps, whether or not they wrote a checkpoint
        self.save_dir = Path(trainer.save_dir)  # removed (by unstarted_run_cleanup) if no worker took a step
        if not Path(trainer.last).exists():
            return
        entry = read_dp_entry(trainer.last)
        self.accountant.load_state_dict(entry["accountant_state"])
        self.noise_draws, self.run_id = self.accountant.steps, entry["run_id"]
        self.stopped_by_budget = entry["stopped_by_budget"]

    def _check_unused(self) -> None:
        """One object, one run: its accountant, sigma and ledger record belong to that run."""
        if self.guard is not None or self._launched:
            raise ValueError("this DifferentialPrivacy object has already trained a run; create a new one for each "
                             "run (the ledger composes them)")

    def _discard_unstarted_run(self) -> None:
        """A run refused before its first step leaves nothing behind: remove the save dir that
        Ultralytics created for it if it holds only its args.yaml (and an empty weights dir)."""
        if self.noise_draws or self.save_dir is None or not self.save_dir.is_dir() or not distributed.is_main():
            return
        if all(p.name == "args.yaml" for p in self.save_dir.rglob("*") if p.is_file()):
            shutil.rmtree(self.save_dir, ignore_errors=True)

    # ----------------------------------------------------------------- callbacks
    def on_pretrain_routine_start(self, trainer: Any) -> None:
        """Before the dataset is built: the training arguments (``guard``), a resumed run's entry."""
        from ultralytics.cfg import DEFAULT_CFG_DICT

        offline.patch_ultralytics()
        self._check_unused()
        self.save_dir = Path(trainer.save_dir)  # created by Ultralytics; removed if the run is refused
        explicit = self._explicit
        if explicit is None:  # callbacks registered by hand: treat non-default values as explicit
            explicit = {k: v for k, v in vars(trainer.args).items() if v != DEFAULT_CFG_DICT.get(k)}
        if not self._args_ready and not trainer.args.resume:
            vars(trainer.args).update(self.defaults.apply(vars(trainer.args), explicit))
            trainer.epochs = trainer.args.epochs  # the trainer copied it before this callback
        guard.prepare_trainer(trainer, explicit)
        trainer.get_model = norms.build_with(trainer.get_model, self.config.norm)  # before any model is built
        self._prepared = trainer
        recorded = self.recorded_settings()
        if any(getattr(trainer.args, k, None) != v for k, v in recorded.items()):
            vars(trainer.args).update(recorded)  # attached by hand: Ultralytics wrote args.yaml without them
            self._rewrite_args = True
        # Ultralytics builds its loaders with batch_size: the training one is replaced by the Poisson
        # loader, and the validation one (2 x batch_size) must fit in memory as a physical chunk does.
        trainer.batch_size = min(trainer.args.batch, self.config.physical_batch)
        trainer.args.data = datasets.resolve(trainer.args.data)
        if trainer.args.resume:
            self._resume = resumed_entry(trainer.args.resume, self.config, with_ledger=self.ledger is not None)

    def on_pretrain_routine_end(self, trainer: Any) -> None:
        """Model, loader and optimizer exist: check, plan, record in the ledger, install. In a
        multi-process run every rank gets here: rank 0 checks the data, plans and records, and every
        rank installs the same plan on its shard (``distributed``)."""
        rank, world = distributed.rank_and_world()
        try:  # a refusal in a worker process leaves no save dir behind either
            if world > 1:
                self._agree_with_every_rank(trainer, rank)
            trainer.model = distributed.unwrap(trainer.model)  # the private step all-reduces, not DDP
            check_supported(trainer.model)
            if norms.untrained_batch_norm(trainer.model):
                log("WARNING: frozen BatchNorm at its initial statistics (training from scratch with norm='batch'): "
                    "the model learns little; use norm='auto' or pretrained weights")
            freeze_batchnorm(trainer.model)
            method = resolve_grad_method(trainer.model, self.config.grad_method)
            self_check.check(trainer, CLIPPED_SUM[method], self.config.max_grad_norm)  # before anything is recorded
            dataset = trainer.train_loader.dataset
            self.persons = self._read_persons(trainer)
            units = self.persons.images if self.config.privacy_unit == "person" else None
            records = len(units) if units is not None else len(dataset)
            if records < world:
                raise ValueError(f"{records} training {self.config.privacy_unit}s for {world} processes; train on fewer "
                                 "devices")
            self.defaults.fit_batch(trainer, records, self.config.privacy_unit)
            shared = self._plan_and_record(trainer, dataset) if rank == 0 else None
            self._share(distributed.from_main(shared))
            plan = self.plan
            self.defaults.fit_learning_rate(trainer, plan)
            if rank == 0 and (self.defaults.applied or self._rewrite_args):  # changed after Ultralytics wrote args.yaml
                run_args.save_args(trainer)
            loader = PoissonLoader(dataset, plan.sample_rate, plan.steps_per_epoch, lambda: self.max_steps - self.steps,
                                   self._reserve, workers=trainer.train_loader.num_workers,
                                   secure=self.config.secure_mode, views=self.config.augmult,
                                   shard=distributed.shard(records), units=units,
                                   max_images=self.config.max_images_per_person if units is not None else None)
            self.guard = TrainerGuard(self._take_step(trainer, method, across_ranks=world > 1), loader,
                                      self.progress)
        except Exception:
            self._discard_unstarted_run()
            raise
        self.max_steps = plan.max_steps
        self.guard.install(trainer)
        guard.show_privacy_not_losses(trainer, tuple(self.progress()))
        validate = trainer.validate

        def validate_with_epsilon() -> tuple[dict | None, Any]:
            metrics, fitness = validate()  # metrics on rank 0 only
            return (metrics if metrics is None else {**metrics, EPSILON_METRIC: round(self.epsilon, 6)}), fitness

        trainer.validate = validate_with_epsilon  # loggers read trainer.metrics, which validate replaces

    def _agree_with_every_rank(self, trainer: Any, rank: int) -> None:
        """Every rank checks itself (``guard.check_rank``) and hashes what must be identical on all
        (``_replica_digest``); all learn every answer, so a refusal anywhere is a refusal everywhere,
        before anything is recorded."""
        try:
            guard.check_rank(trainer, self._explicit, rank, prepared=self._prepared is trainer)
            mine: str | Exception = _replica_digest(trainer)
        except (ValueError, RuntimeError) as err:
            mine = err
        answers = distributed.gather(mine)
        refusal = mine if isinstance(mine, Exception) else next((a for a in answers if isinstance(a, Exception)), None)
        if refusal is not None:
            raise refusal
        if any(a != mine for a in answers):
            raise RuntimeError("DP: the processes differ in their model, optimizer, arguments or training set; "
                               "refusing (every process must step identically)")

    def _read_persons(self, trainer: Any) -> persons.Persons | None:
        """The training set's persons from the ``persons`` file (None without one), after its checks
        against the training and validation images (every process reads it: the same answer)."""
        if self.config.persons is None:
            return None
        root = persons.dataset_root(trainer.data)
        owner = persons.read(persons.locate(self.config.persons, root), root)
        return persons.group(owner, image_files(trainer.train_loader.dataset),
                             image_files(trainer.test_loader.dataset), self.config.persons)

    def _plan_and_record(self, trainer: Any, dataset: Any) -> dict[str, Any]:
        """Rank 0 (or the only process): check the training set, plan the run, record it in the ledger
        (the last step that can refuse it: nothing is recorded before). Returns what every rank needs."""
        with quiet_console():  # Ultralytics' file listing prints the images' mean size
            check_training_set(dataset)
        files, val_files = image_files(dataset), image_files(trainer.test_loader.dataset)
        records = identify_all(files)
        check_distinct_images(files, records, val_files, identify_all(val_files))
        resume = self._resume
        fingerprint = (run_ledger.fingerprint_of(self.ledger, dataset, records, resume, self.persons)
                       if self.ledger is not None else None)
        by_person = self.config.privacy_unit == "person"
        plan = plan_run(
            self.config, num_samples=self.persons.count if by_person else len(dataset), batch=trainer.args.batch,
            epochs=trainer.epochs, resumed=resume,
            records=self.ledger.budgets(records, self.config.dataset_budget, self.delta,
                                        run_ledger.ledger_persons(self.persons), self.config.privacy_unit)
            if fingerprint else None,
        )
        self.plan = plan
        if resume is not None:
            self.accountant.load_state_dict(resume["accountant_state"])
            self.run_id = resume["run_id"]
            log(f"resumed at step {self.steps} (epsilon={self.epsilon:.4f}) with noise_multiplier={plan.noise_multiplier:g}")
        elif plan.calibrated:
            log(f"calibrated noise_multiplier={plan.noise_multiplier:.4f} to spend epsilon={self.config.epsilon:g} "
                f"over {plan.planned_steps} steps")
        unit = f"persons ({len(dataset)} images)" if by_person else "images"
        log(f"N={plan.num_samples} {unit}, q={plan.sample_rate:.5g} (expected batch {trainer.args.batch}), "
            f"{plan.steps_per_epoch} steps/epoch, {plan.planned_steps} planned, {plan.max_steps - self.steps} allowed "
            f"from step {self.steps}, C={self.config.max_grad_norm:g}, delta={self.delta:g}"
            + (", secure mode" if self.config.secure_mode else ""))
        if fingerprint is not None and self.run_id is None:  # a resumed run keeps its record
            self.run_id = run_ledger.record_run(self.ledger, records, fingerprint, config=self.config, plan=plan,
                                                name=str(trainer.save_dir), description=str(trainer.args.data),
                                                persons=self.persons)
        return {"plan": plan, "curve": self._planned_curve(plan), "run_id": self.run_id,
                "accountant_state": self.accountant.state_dict()}

    def _share(self, shared: dict[str, Any]) -> None:
        """Every rank takes rank 0's plan, display curve, run id and accountant state."""
        self.plan, self._curve, self.run_id = shared["plan"], shared["curve"], shared["run_id"]
        self.accountant.load_state_dict(shared["accountant_state"])
        self.noise_draws = self.accountant.steps

    def progress(self) -> dict[str, float]:
        """What the progress bar shows after each step: epsilon spent (an upper bound read off the
        planned curve, exact at epoch ends), the step, and the step budget."""
        at = bisect.bisect_left(self._curve, (self.steps, -math.inf))
        if at < len(self._curve):
            spent = self._curve[at][1]
        else:  # not on the curve: exact (rank 0 only; other ranks never show it)
            spent = self.epsilon if distributed.is_main() else math.nan
        return {"epsilon": spent, "step": self.steps, "of": self.max_steps}

    def _planned_curve(self, plan: Plan) -> list[tuple[int, float]]:
        """Epsilon upper bounds at up to ``CURVE_POINTS`` step counts of the plan, from one ``pld``
        discretisation scaled by the accountants' ratio at the curve's end (so it never shows less
        than the released figure there); empty if the run composes different (sigma, q) (the
        display is then the released epsilon of the last epoch)."""
        history = self.accountant.history
        if any((s.noise_multiplier, s.sample_rate) != (plan.noise_multiplier, plan.sample_rate) for s in history):
            return []
        top = max(plan.planned_steps, plan.max_steps)
        grid = sorted({round(top * i / (CURVE_POINTS - 1)) for i in range(CURVE_POINTS)} | {plan.max_steps})
        eps = epsilon_curve(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=grid,
                            delta=self.delta)
        scale = accountant.curve_scale(plan.noise_multiplier, plan.sample_rate, top, self.delta) if top else 1.0
        return [(t, e * scale) for t, e in zip(grid, eps)]

    def on_train_epoch_end(self, trainer: Any) -> None:
        self.guard.on_train_epoch_end(trainer)
        if not distributed.is_main():  # Ultralytics keeps metrics on rank 0
            return
        trainer.metrics[EPSILON_METRIC] = round(self.epsilon, 6)  # also when this epoch is not validated
        log(f"epoch {trainer.epoch + 1}: epsilon={self.epsilon:.4f} (target {self.config.epsilon:g}), "
            f"delta={self.delta:g}, steps={self.steps}")

    def on_model_save(self, trainer: Any) -> None:
        """Every checkpoint on disk states every step taken so far: best.pt too."""
        period = trainer.save_period > 0 and trainer.epoch % trainer.save_period == 0
        files = (trainer.last, trainer.best, trainer.wdir / f"epoch{trainer.epoch}.pt" if period else None)
        write_dp_entry([f for f in files if f is not None and Path(f).exists()], self.info())

    def on_train_end(self, trainer: Any) -> None:
        """The checkpoints the run releases state the whole run (after Ultralytics' final rewrite);
        ``privacy.html`` (``report_page``) says what that guarantee means."""
        write_dp_entry([f for f in (trainer.last, trainer.best) if Path(f).exists()], self.info())
        if trainer.args.plots:
            plot_privacy(Path(trainer.save_dir) / "privacy.png", self._curve, self.steps, self.epsilon,
                         self.config.epsilon, self.delta)
        try:  # the weights and their guarantee are written: a page that cannot be must not fail the run
            write_run_page(trainer.save_dir, self._curve or None)
        except (OSError, ValueError) as err:
            log(f"WARNING: privacy.html not written ({one_line(err)}); write it with: yolo-dp report {trainer.save_dir}")
        log(summary_line(self.info()))

    # ----------------------------------------------------------------- the ledger's grant and the private step
    def _reserve(self, steps: int) -> int:
        """Write-ahead: record the epoch's steps in the ledger before the first of them is taken. The
        ledger grants fewer when another run has spent on the same images since this one was planned
        and more would take one past its lifetime budget: the run then stops after those. Rank 0
        decides, every rank takes its answer (called by every rank's loader at the same point)."""
        granted = steps
        if self.ledger is not None and distributed.is_main():
            granted = self.ledger.reserve(self.run_id, steps=steps, noise_multiplier=self.plan.noise_multiplier,
                                          sample_rate=self.plan.sample_rate)
        granted = distributed.from_main(granted)
        if granted < steps:  # the loader yields the granted steps; the last one stops the trainer
            self.max_steps = self.steps + granted
            self.stopped_by_budget = True
            self.guard.trainer.stop = granted == 0  # no step will: stop at this epoch's end
            log(f"an image's lifetime budget (dataset_budget) allows {granted} more step(s), not {steps}: another run "
                "spent on the same images; stopping after them")
        return granted

    def _take_step(self, trainer: Any, method: str, across_ranks: bool) -> Callable[[dict], None]:
        """The guard's step: one ``PrivateStep``; after the last one the budget allows, the trainer stops."""
        log(f"per-sample clipping with the {method} path")
        plan = self.plan
        step = PrivateStep(lambda: trainer.model, self.config, noise_multiplier=plan.noise_multiplier,
                           sample_rate=plan.sample_rate, expected_batch_size=plan.expected_batch_size,
                           accountant=self.accountant, limit=lambda: self.max_steps, method=method,
                           across_ranks=across_ranks, canaries=self.canaries)

        def take_step(batch: dict) -> None:
            last = step(batch)
            self.noise_draws += 1
            if last:
                trainer.stop = True
                self.stopped_by_budget = self.steps < plan.planned_steps

        return take_step


def _replica_digest(trainer: Any) -> str:
    """What must be identical on every process of a multi-process run, hashed: model, optimizer,
    arguments and training records (their order decides the shards)."""
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": len(g["params"])}
              for g in trainer.optimizer.param_groups]
    state = distributed.unwrap(trainer.model).state_dict()
    trainable = [n for n, p in distributed.unwrap(trainer.model).named_parameters() if p.requires_grad]
    args = sorted((k, v) for k, v in vars(trainer.args).items() if k not in ("save_dir", "name"))  # rank 0's own
    return distributed.digest(state, repr((type(trainer.optimizer).__name__, groups, args, trainable,
                                           image_files(trainer.train_loader.dataset))))
