"""Keep Ultralytics off the network: no online check, analytics, pip auto-install or font download.

``patch_ultralytics()`` runs when DP is used (``attach``, a private run's first callback, ``yolo-dp``),
not at import: ``ultralytics_dp.pth`` imports this package in every Python process of its
environment, where a plain ``yolo`` command must keep Ultralytics' online behaviour. It sets the
switches, flips the flags Ultralytics computed at import time (``ONLINE``, ``AUTOINSTALL``) and
puts a local font where Ultralytics' font check looks first, since that check ignores
``YOLO_OFFLINE`` and would otherwise try to download Arial.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

ENV = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0"}


def set_env() -> None:
    """Set Ultralytics' offline switches in this process's environment."""
    os.environ.update(ENV)


def _place_font(config_dir: Path) -> None:
    """Copy matplotlib's bundled DejaVuSans to the names Ultralytics' ``check_font`` looks for."""
    import matplotlib

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        target = config_dir / name
        if not target.exists() and source.exists():
            config_dir.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".{os.getpid()}.tmp")
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)


def patch_ultralytics() -> None:
    """Make an already-imported Ultralytics behave as if it had started offline."""
    set_env()
    import ultralytics.utils as uu

    for name in ("ultralytics.utils", "ultralytics.utils.checks", "ultralytics.utils.events"):
        module = sys.modules.get(name)
        if module is not None:
            if hasattr(module, "ONLINE"):
                module.ONLINE = False
            if hasattr(module, "AUTOINSTALL"):
                module.AUTOINSTALL = False
    events = sys.modules.get("ultralytics.utils.events")
    if events is not None and hasattr(events, "events"):
        events.events.enabled = False
    _place_font(Path(uu.USER_CONFIG_DIR))
