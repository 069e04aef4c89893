"""ultralytics-dp: differentially private (DP-SGD) training for Ultralytics YOLO.

Importing this package sets Ultralytics' offline switches before Ultralytics is imported. The
engine, sampling and accounting modules never import Ultralytics; the Ultralytics-facing names
below are loaded on first use.
"""

from __future__ import annotations

from importlib import import_module

from .offline import set_env as _set_offline_env

_set_offline_env()

__version__ = "0.1.0"


from .sampling import PoissonBatchSampler, split_physical  # noqa: E402

_LAZY = {  # name -> module; these import Ultralytics
    "DifferentialPrivacy": ".adapter",
    "per_sample_losses": ".losses",
    "per_sample_grad_norms": ".losses",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'ultralytics_dp' has no attribute {name!r}")


__all__ = ["PoissonBatchSampler", "split_physical", "__version__", *_LAZY]
