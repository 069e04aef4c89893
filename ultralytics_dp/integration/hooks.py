"""Run a function right after a named module is imported, whoever imports it (stdlib only).

Why: the plugin must adjust Ultralytics (offline switches, dataset names) even when the user
imports Ultralytics after this package, without importing Ultralytics itself (``yolo-dp --help``
stays fast). A finder at the front of ``sys.meta_path`` wraps the real loader of the watched
modules; everything else is left to the normal import machinery.
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Callable
from types import ModuleType

_PENDING: dict[str, list[Callable[[ModuleType], None]]] = {}


class _Loader(importlib.abc.Loader):
    """The module's own loader, plus the pending callbacks once the module has executed."""

    def __init__(self, loader: importlib.abc.Loader, name: str) -> None:
        self._loader, self._name = loader, name

    def create_module(self, spec):  # noqa: ANN001, ANN201 (importlib's signature)
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        for callback in _PENDING.pop(self._name, []):
            callback(module)

    def __getattr__(self, attr: str) -> object:  # get_source, get_data, ... of the real loader
        return getattr(self._loader, attr)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201 (importlib's signature)
        if name not in _PENDING:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader, name)
                return spec
        return None


_FINDER = _Finder()


def when_imported(name: str, callback: Callable[[ModuleType], None]) -> None:
    """Call ``callback(module)`` once ``name`` is imported; at once if it already is."""
    module = sys.modules.get(name)
    if module is not None:
        callback(module)
        return
    _PENDING.setdefault(name, []).append(callback)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
