"""ultralytics-dp: differentially private (DP-SGD) training for Ultralytics YOLO.

Importing this package (``ultralytics_dp.pth`` does it at interpreter start-up) imports nothing
but the standard library and changes nothing in the environment: it registers import hooks that,
once Ultralytics is imported, make its dataset checks accept the embedded dataset names and give
the stock ``yolo`` command and ``YOLO.train`` the DP keys (``plugin``; off with
``ULTRALYTICS_DP_PLUGIN=0``). Every public name below is loaded on first use.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

from . import plugin as _plugin
from .hooks import when_imported as _when_imported


def _resolve_embedded_names(module: ModuleType) -> None:
    import_module(".datasets", __name__).resolve_in(module)


# every Ultralytics module that checks a ``data=`` argument by name (8.4.190)
for _name in ("ultralytics.engine.trainer", "ultralytics.engine.validator", "ultralytics.engine.exporter"):
    _when_imported(_name, _resolve_embedded_names)
_plugin.install()

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
