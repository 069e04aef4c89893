"""The DP settings: declared once in DPConfig, validated once, and the same everywhere they appear
(the Python API, the command line, checkpoints, resume, the README's table)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from ultralytics_dp import DifferentialPrivacy
from ultralytics_dp.config import SETTINGS, DPConfig

BAD = [
    (dict(epsilon=0), "epsilon"), (dict(epsilon=-1), "epsilon"), (dict(epsilon=float("nan")), "epsilon"),
    (dict(epsilon=float("inf")), "epsilon"), (dict(epsilon=True), "epsilon"), (dict(epsilon=1, delta=0), "delta"),
    (dict(epsilon=1, delta=1), "delta"), (dict(epsilon=1, delta=1.5), "delta"), (dict(epsilon=1, max_grad_norm=0), "max_grad_norm"),
    (dict(epsilon=1, max_grad_norm=-1), "max_grad_norm"), (dict(epsilon=1, noise_multiplier=0), "noise_multiplier"),
    (dict(epsilon=1, noise_multiplier=-1), "noise_multiplier"), (dict(epsilon=1, physical_batch=0), "physical_batch"),
    (dict(epsilon=1, physical_batch=2.5), "physical_batch"), (dict(epsilon=1, dataset_budget=0), "dataset_budget"),
    (dict(epsilon=1, grad_method="fast"), "grad_method"), (dict(epsilon=1, secure_mode="yes"), "secure_mode"),
    (dict(epsilon=1, ledger=3), "ledger"), (dict(epsilon=1, dataset_budget=2, ledger=False), "dataset_budget needs the ledger"),
]


@pytest.mark.parametrize("kwargs,match", BAD)
def test_bad_settings_are_one_line_errors_naming_the_setting(kwargs, match):
    for make in (DPConfig, DifferentialPrivacy):
        with pytest.raises(ValueError, match=match) as err:
            make(**kwargs)
        assert len(str(err.value).splitlines()) == 1


def test_settings_are_frozen_and_local_paths_are_never_released(tmp_path):
    config = DPConfig(epsilon=2, ledger=tmp_path / "l.sqlite", persons=tmp_path / "persons.csv")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epsilon = 100
    assert "ledger" not in config.released() and "persons" not in config.released()
    assert set(config.released()) == set(SETTINGS) - {"ledger", "persons"}


def test_command_line_strings_parse_per_setting():
    config = DPConfig.from_strings({"epsilon": "8", "physical_batch": "16", "secure_mode": "True", "ledger": "false",
                                    "grad_method": "vmap"})
    assert (config.epsilon, config.physical_batch, config.secure_mode, config.ledger, config.grad_method) == (
        8.0, 16, True, False, "vmap")
    with pytest.raises(ValueError, match="physical_batch"):
        DPConfig.from_strings({"epsilon": "8", "physical_batch": "many"})


def test_resume_may_change_memory_and_speed_settings_only():
    recorded = DPConfig(epsilon=4, noise_multiplier=1.0).released()
    assert DPConfig(epsilon=4, noise_multiplier=1.0, physical_batch=8, grad_method="vmap", secure_mode=True,
                    ledger=False).changed_on_resume(recorded) == []
    changed = DPConfig(epsilon=5, delta=1e-6, max_grad_norm=2.0, norm="group").changed_on_resume(recorded)
    assert [c.split(":")[0] for c in changed] == ["epsilon", "delta", "max_grad_norm", "noise_multiplier", "norm"]


def test_a_checkpoint_from_before_a_setting_resumes_with_what_it_meant():
    """Checkpoints written before ``norm`` existed trained frozen BatchNorm."""
    recorded = {k: v for k, v in DPConfig(epsilon=4, noise_multiplier=1.0).released().items() if k != "norm"}
    assert DPConfig(epsilon=4, noise_multiplier=1.0, norm="batch").changed_on_resume(recorded) == []
    assert DPConfig(epsilon=4, noise_multiplier=1.0).changed_on_resume(recorded) == ["norm: batch -> auto"]


def test_readme_key_table_is_the_settings_help():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| (.+?) \|$", readme.split("| key | meaning |")[1].split("\n\n")[0], re.M))
    rows.pop("batch", None)
    assert rows == {k: f.metadata["help"] for k, f in SETTINGS.items()}
