"""The training arguments a user set: a ``cfg=`` file's (or dict's) values under the keyword
arguments, merged in this one place for the plugin, ``DifferentialPrivacy.attach`` and
``yolo-dp train``. Which arguments the user set matters: an explicit mixing augmentation is
refused, a default one is switched off, and unset arguments take the DP defaults.

Ultralytics is imported only inside the functions (the plugin loads this module at start-up).
"""

from __future__ import annotations

from typing import Any


def cfg_values(cfg: Any) -> dict[str, Any]:
    """What a ``cfg=`` argument holds: a YAML file's or a dict's values; nothing for None or
    Ultralytics' default configuration."""
    import ultralytics.cfg as ucfg

    if cfg is None or cfg is ucfg.DEFAULT_CFG:
        return {}
    return dict(ucfg.cfg2dict(cfg))


def user_set(cfg: Any, overrides: dict[str, Any] | None, *, defaults_count: bool) -> dict[str, Any]:
    """``cfg``'s values under ``overrides`` (which win). ``defaults_count=False``: a cfg value equal
    to Ultralytics' default is not one the user set (a copy of Ultralytics' default.yaml passed to a
    trainer sets nothing); ``True``: every value a cfg file names was set (``model.train(cfg=...)``)."""
    from ultralytics.cfg import DEFAULT_CFG_DICT

    base = cfg_values(cfg)
    if not defaults_count:
        base = {k: v for k, v in base.items() if v != DEFAULT_CFG_DICT.get(k)}
    return {**base, **(overrides or {})}
