"""The stock ``yolo`` command and ``YOLO.train`` with DP keys: ``yolo train ... epsilon=8``.

How it is switched on: ``pip install`` puts ``ultralytics_dp.pth`` in site-packages; Python runs
its one line at start-up, which imports ``ultralytics_dp`` (stdlib only, no environment change)
and so registers import hooks (``hooks``). Nothing else happens until Ultralytics is imported:

* ``ultralytics.engine.trainer``, ``.validator`` and ``.exporter``: their dataset checks accept the
  embedded dataset names (``datasets.embedded``), for private and plain runs alike.
* ``ultralytics.cfg``: the DP keys (``config.SETTINGS``) join Ultralytics' configuration, unset
  (None), so ``yolo`` and ``get_cfg`` accept them; only for the Ultralytics version this package
  supports.
* ``ultralytics.engine.trainer``: ``BaseTrainer.__init__`` is wrapped. A trainer whose arguments
  set a DP key, or that resumes a checkpoint with a ``dp`` entry, gets a ``DifferentialPrivacy``
  built from them *before* it creates its save dir and writes args.yaml: refusals happen first,
  and args.yaml records the DP keys and what was used (``mosaic: 0.0``, the DP defaults). The
  trainer's ``get_cfg`` leaves unset DP keys out, so a non-private run's arguments are exactly
  Ultralytics' own.
* In the worker processes of a multi-device run, the wrapper runs ``on_pretrain_routine_start`` of
  the attached ``DifferentialPrivacy`` on ranks other than 0 (Ultralytics runs it on rank 0 only),
  before they build their data, loaders and optimizer; without the plugin those ranks refuse.
* Two checks that do not depend on that wrapper are registered with the keys, at index 0 of the
  default ``on_pretrain_routine_start`` and ``on_train_start`` callbacks (index 0 survives
  ``Model.reset_callbacks``): a trainer with a DP key set and no private step is refused (say a
  trainer module that another import hook loaded past ours).

Fail closed: with ``ULTRALYTICS_DP_PLUGIN=0`` nothing is registered and Ultralytics rejects the DP
keys as unknown. With another Ultralytics version, or if patching the trainer fails, the keys are
withdrawn (so rejected the same way) and a warning says why.

Privacy assumptions relied on here: a trainer that sees any DP key, or resumes a private
checkpoint, trains privately or not at all. A trainer the wrapper has not seen (a trainer module
loaded past our hook) is refused by the index-0 checks, which go in before the keys; a failed
patch withdraws the keys. The ledger path is a local secret: the wrapper sets it to None in the
trainer's arguments, whatever a cfg file says.
"""

from __future__ import annotations

import functools
import os
import sys
from collections import defaultdict
from pathlib import Path
from types import ModuleType
from typing import Any

from ..config import SETTINGS
from . import keys
from .explicit import cfg_values, user_set
from .hooks import when_imported

ENV = "ULTRALYTICS_DP_PLUGIN"
# every Ultralytics module that checks a ``data=`` argument by name (8.4.190)
DATA_CHECKERS = ("ultralytics.engine.trainer", "ultralytics.engine.validator", "ultralytics.engine.exporter")


def install() -> None:
    """Register the hooks, unless ``ULTRALYTICS_DP_PLUGIN=0`` (then nothing of the package is active)."""
    if os.environ.get(ENV, "1").strip() == "0":
        return
    for name in DATA_CHECKERS:
        when_imported(name, _resolve_embedded_names)
    when_imported("ultralytics.cfg", _add_keys)
    when_imported("ultralytics.engine.trainer", _patch_trainer)


def _resolve_embedded_names(module: ModuleType) -> None:
    from ..datasets import embedded

    embedded.resolve_in(module)


def _add_keys(cfg: ModuleType) -> None:
    if not keys.supported_version():
        return
    from ultralytics.utils.callbacks import base

    # the checks that do not depend on the trainer patch go in before the keys: a trainer module
    # loaded past our hook (another import hook first) is then refused, not trained without DP
    base.default_callbacks["on_pretrain_routine_start"].insert(0, require_private_step_attached)
    base.default_callbacks["on_train_start"].insert(0, require_private_step_installed)
    keys.add(cfg)


def _patch_trainer(module: ModuleType) -> None:
    import ultralytics.cfg as cfg

    if keys.off_reasons or getattr(module.BaseTrainer.__init__, "_ultralytics_dp", False):  # off, or patched already
        return
    try:
        trainer_class = module.BaseTrainer
        trainer_class.__init__ = _private_init(trainer_class.__init__, cfg)
        module.get_cfg = _without_unset_keys(module.get_cfg)
    except Exception as err:  # fail closed: no trainer may see a DP key it cannot honour
        keys.withdraw(cfg, f"patching Ultralytics' trainer failed: {err}")


def _without_unset_keys(get_cfg: Any) -> Any:
    @functools.wraps(get_cfg)
    def get_cfg_without_unset_dp_keys(*args: Any, **kwargs: Any) -> Any:
        out = get_cfg(*args, **kwargs)
        for key in SETTINGS:
            if key in vars(out) and getattr(out, key) is None:
                delattr(out, key)
        return out

    return get_cfg_without_unset_dp_keys


def _private_init(init: Any, ucfg: ModuleType) -> Any:
    """``BaseTrainer.__init__`` that makes a trainer private when its arguments ask for it. Its
    signature is Ultralytics' own (``cfg``, ``overrides``, ``_callbacks``), so subclasses and
    Ultralytics' multi-device launcher may pass any of them by keyword."""

    @functools.wraps(init)
    def __init__(trainer: Any, cfg: Any = ucfg.DEFAULT_CFG, overrides: dict | None = None,
                 _callbacks: dict | None = None) -> None:
        explicit = user_set(cfg, overrides, defaults_count=False)  # Model.train passes the user's keywords as overrides
        attached = _attached_in(_callbacks or {})
        if attached is not None:  # DifferentialPrivacy(...).attach(model), or a worker of a multi-device run
            # a worker of Ultralytics' launcher gets the launching process's object and its recorded keys
            if not attached.launched_elsewhere and any(explicit.get(k) is not None for k in SETTINGS):
                raise ValueError("DP settings were given both to DifferentialPrivacy(...).attach(model) and as "
                                 "training arguments; give them once")
            init(trainer, cfg, overrides, _callbacks)
            _prepare_other_rank(attached, trainer)
            return
        settings, planned = _private(explicit)
        if not settings:
            return init(trainer, cfg, overrides, _callbacks)
        callbacks = defaultdict(list, {k: list(v) for k, v in (_callbacks or _default_callbacks()).items()})
        from .adapter import DifferentialPrivacy

        dp = DifferentialPrivacy(**settings)
        overrides = dp.prepare(planned, explicit, dict(overrides or {}))
        # the trainer's arguments carry the released DP settings, never the local ledger path (set
        # to None here, so that a cfg file or dict given to the trainer cannot bring it back); only
        # keys the base configuration has (Ultralytics refuses others in a cfg file's overrides)
        known = set(SETTINGS) if cfg is ucfg.DEFAULT_CFG else set(cfg_values(cfg)) & set(SETTINGS)
        recorded = {**dict.fromkeys(SETTINGS), **dp.recorded_settings()}
        overrides = {**{k: v for k, v in overrides.items() if k not in SETTINGS},
                     **{k: v for k, v in recorded.items() if k in known}}
        for event, fn in dp.callbacks.items():
            callbacks[event].append(fn)
        with dp.unstarted_run_cleanup():
            init(trainer, cfg, overrides, callbacks)
            _prepare_other_rank(dp, trainer)
        train = trainer.train

        def train_privately() -> Any:
            with dp.unstarted_run_cleanup():
                try:
                    return train()
                finally:
                    dp.collect_from_workers(trainer)

        trainer.train = train_privately

    __init__._ultralytics_dp = True
    return __init__


def _prepare_other_rank(dp: Any, trainer: Any) -> None:
    """Ultralytics runs ``on_pretrain_routine_start`` on rank 0 only: run DP's on the other ranks of a
    multi-device run too, before they build their loaders and optimizer."""
    from ultralytics.utils import RANK

    if RANK > 0:
        dp.on_pretrain_routine_start(trainer)


def _default_callbacks() -> dict:
    from ultralytics.utils.callbacks.base import get_default_callbacks

    return get_default_callbacks()


def _private(explicit: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(DP settings, the arguments the run will use) if the run is private, else ({}, {}).

    A run is private if it sets a DP key, or resumes a checkpoint with a ``dp`` entry (its
    settings, updated by the DP keys given now). ``epsilon`` is required; the values are checked
    by ``DPConfig`` (one-line errors)."""
    settings = {k: explicit[k] for k in SETTINGS if explicit.get(k) is not None}
    resume = explicit.get("resume")
    if resume:
        from ultralytics.utils.files import get_latest_run

        from .checkpoint import read_entries

        path = resume if isinstance(resume, (str, Path)) and Path(resume).is_file() else get_latest_run()
        ckpt = read_entries(path) if path and Path(path).is_file() else {}
        entry = ckpt.get("dp")
        if entry:
            settings = {**entry["settings"], **settings}
        planned = {**(ckpt.get("train_args") or {}), **explicit}
    if not settings:
        return {}, {}
    if "epsilon" not in settings:
        raise ValueError(f"{', '.join(f'{k}={v}' for k, v in settings.items())} without epsilon: set epsilon= (the "
                         "privacy budget) to train privately, or remove the DP keys")
    if not resume:
        from ultralytics.cfg import get_cfg

        planned = vars(get_cfg(overrides=explicit))
    return settings, planned


def _attached_in(callbacks: dict) -> Any:
    """The ``DifferentialPrivacy`` whose callbacks are registered in ``callbacks``, if any. A process
    that never imported the adapter has none, so a plain run does not import it (nor scipy)."""
    adapter = sys.modules.get(f"{__package__}.adapter")
    if adapter is None:
        return None
    for fn in callbacks.get("on_pretrain_routine_end", []):
        if isinstance(getattr(fn, "__self__", None), adapter.DifferentialPrivacy):
            return fn.__self__
    return None


def _dp_keys_set(trainer: Any) -> str:
    """'key=value, ...' for the DP keys set in the trainer's arguments ('' if none)."""
    return ", ".join(f"{k}={getattr(trainer.args, k)}" for k in SETTINGS if getattr(trainer.args, k, None) is not None)


def require_private_step_attached(trainer: Any) -> None:
    """Index 0 of ``on_pretrain_routine_start``: a DP key set but no DP attached -> refuse."""
    keys = _dp_keys_set(trainer)
    if keys and _attached_in(trainer.callbacks) is None:
        raise RuntimeError(f"DP: {keys} set but no private step is attached to this trainer; refusing to train "
                           "(was Ultralytics' trainer imported past the ultralytics-dp plugin?)")


def require_private_step_installed(trainer: Any) -> None:
    """Index 0 of ``on_train_start``: a DP key set but the private step not installed -> refuse."""
    keys = _dp_keys_set(trainer)
    if not keys:
        return
    dp = _attached_in(trainer.callbacks)
    if dp is None or dp.guard is None or dp.guard.trainer is not trainer or trainer.train_loader is not dp.guard.loader:
        raise RuntimeError(f"DP: {keys} set but the private step is not installed; refusing to train")
