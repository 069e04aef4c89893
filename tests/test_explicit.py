"""What the user set: a cfg file's values under the keyword arguments, with or without the values
that equal Ultralytics' defaults."""

from __future__ import annotations

import ultralytics_dp  # noqa: F401  (import hooks before Ultralytics)
from ultralytics.cfg import DEFAULT_CFG, DEFAULT_CFG_DICT
from ultralytics.utils import YAML

from ultralytics_dp.integration.explicit import cfg_values, user_set


def test_a_cfg_file_under_the_keywords(tmp_path):
    cfg = tmp_path / "run.yaml"
    default_mosaic = DEFAULT_CFG_DICT["mosaic"]
    YAML.save(cfg, {"mosaic": default_mosaic, "epochs": 7, "imgsz": 64})
    assert cfg_values(str(cfg)) == {"mosaic": default_mosaic, "epochs": 7, "imgsz": 64}
    assert cfg_values(DEFAULT_CFG) == {} and cfg_values(None) == {}
    # a trainer given a copy of default.yaml sets nothing; model.train(cfg=...) names every value
    assert user_set(str(cfg), {"imgsz": 32}, defaults_count=False) == {"epochs": 7, "imgsz": 32}
    assert user_set(str(cfg), {"imgsz": 32}, defaults_count=True) == {"mosaic": default_mosaic, "epochs": 7,
                                                                      "imgsz": 32}
    assert user_set({"epochs": 3}, None, defaults_count=False) == {"epochs": 3}
