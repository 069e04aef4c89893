"""ultralytics-dp: differentially private (DP-SGD) training for Ultralytics YOLO.

Importing this package (``ultralytics_dp.pth`` does it at interpreter start-up) imports nothing
but the standard library and changes nothing in the environment: it registers import hooks that,
once Ultralytics is imported, make its dataset checks accept the embedded dataset names and give
the stock ``yolo`` command and ``YOLO.train`` the DP keys (``integration.plugin``; off with
``ULTRALYTICS_DP_PLUGIN=0``). Every public name below is loaded on first use.

Layers (each may import only those listed before it; ``docs/architecture.md``):
``config`` / ``checks`` (stdlib) -> ``accounting`` (numpy, scipy) and ``mechanism`` (torch) ->
``losses`` (Ultralytics' loss code) -> ``integration`` (Ultralytics' trainer) -> ``cli``;
``auditing`` (the one-run audit) stands above the trainer, ``datasets`` and ``tools`` beside the
engine.
"""

from __future__ import annotations

from importlib import import_module

from .integration import plugin as _plugin
from .version import __version__

_plugin.install()

_LAZY = {  # name -> module
    "DifferentialPrivacy": ".integration.adapter",
    "DPConfig": ".config",
    "audit": ".auditing.run",
    "PoissonBatchSampler": ".mechanism.sampling",
    "Groups": ".mechanism.grouping",
    "per_sample_losses": ".losses.per_image",
    "per_sample_grad_norms": ".losses.per_image",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'ultralytics_dp' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
