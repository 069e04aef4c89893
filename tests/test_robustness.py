"""Input-noise robustness evaluation (not DP): the noise, exact reproduction at 0, degradation."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

import ultralytics_dp  # noqa: F401
from ultralytics import YOLO

from ultralytics_dp.datasets import embedded as datasets
from ultralytics_dp.tools.robustness import InputNoise, evaluate



def test_noise_has_requested_std_and_leaves_input_alone():
    img = torch.full((8, 3, 64, 64), 0.5)
    before = img.clone()
    std = 0.05
    out = InputNoise(std, torch.Generator().manual_seed(1))(img)
    assert torch.equal(img, before)
    diff = (out - img).flatten().double()
    assert abs(diff.std().item() / std - 1) < 0.03
    assert abs(diff.mean().item()) < 3 * std / math.sqrt(diff.numel())
    assert out.min() >= 0 and out.max() <= 1
    clamped = InputNoise(1.0)(torch.zeros(1000))
    assert clamped.min() >= 0 and clamped.max() <= 1
    assert InputNoise(0.0)(img) is img
    with pytest.raises(ValueError, match="noise std"):
        InputNoise(-0.1)


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A quickly trained (non-private) classifier on digits-cls: well above chance."""
    tmp = tmp_path_factory.mktemp("cls")
    root = datasets.build("digits-cls", root=tmp / "data")
    model = YOLO("yolo26n-cls.yaml")
    model.train(data=str(root), epochs=2, imgsz=32, batch=64, workers=0, plots=False, project=str(tmp), name="t",
                verbose=False)
    return tmp / "t" / "weights" / "last.pt", root


@pytest.mark.slow
def test_zero_noise_reproduces_plain_validation(tiny_classifier):
    weights, root = tiny_classifier
    plain = YOLO(weights).val(data=str(root), imgsz=32, batch=64, plots=False)
    (row,) = evaluate([str(weights)], str(root), [0.0], imgsz=32, batch=64)
    assert row["metric"] == "top1" and row["value"] == float(plain.top1)


@pytest.mark.slow
def test_metric_degrades_with_noise_and_report_is_written(tiny_classifier, tmp_path):
    from ultralytics_dp.cli import main

    weights, root = tiny_classifier
    assert main(["robustness", f"model={weights}", f"data={root}", "noise=0,0.15,0.3,0.6", "imgsz=32",
                 "batch=64", f"out={tmp_path}"]) == 0
    rows = list(csv.DictReader((tmp_path / "robustness.csv").open()))
    values = [float(r["value"]) for r in rows]
    assert len(values) == 4 and values[0] > 0.2  # trained: above the 0.1 of chance
    assert all(b <= a + 0.02 for a, b in zip(values, values[1:])), values
    assert values[-1] < values[0] - 0.05
    assert (tmp_path / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_predict_sees_noisy_images(tiny_classifier):
    weights, _ = tiny_classifier
    image = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    clean = YOLO(weights).predict(image, imgsz=32, verbose=False)[0].probs.data
    noisy_model = YOLO(weights)
    InputNoise(0.5).attach(noisy_model)
    noisy = noisy_model.predict(image, imgsz=32, verbose=False)[0].probs.data
    assert not torch.allclose(clean, noisy)


def test_cli_rejects_bad_levels(capsys):
    from ultralytics_dp.cli import main

    assert main(["robustness", "model=a.pt", "data=digits-cls", "noise=0,-1"]) == 2
    assert "noise" in capsys.readouterr().err
