"""ultralytics-dp: differentially private (DP-SGD) training for Ultralytics YOLO.

Importing this package sets Ultralytics' offline switches before Ultralytics is imported, makes
Ultralytics' dataset checks accept the embedded dataset names once they are imported, and imports
nothing else: every public name below is loaded on first use (``yolo-dp --help`` stays fast).
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

from .hooks import when_imported as _when_imported
from .offline import set_env as _set_offline_env

_set_offline_env()


def _resolve_embedded_names(module: ModuleType) -> None:
    import_module(".datasets", __name__).resolve_in(module)


# every Ultralytics module that checks a ``data=`` argument by name (8.4.190)
for _name in ("ultralytics.engine.trainer", "ultralytics.engine.validator", "ultralytics.engine.exporter"):
    _when_imported(_name, _resolve_embedded_names)

__version__ = "0.1.0"

_LAZY = {  # name -> module
    "DifferentialPrivacy": ".adapter",
    "DPConfig": ".config",
    "PoissonBatchSampler": ".sampling",
    "split_physical": ".sampling",
    "per_sample_losses": ".losses",
    "per_sample_grad_norms": ".losses",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'ultralytics_dp' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
