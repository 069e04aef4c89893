"""Input-noise robustness: how a model holds up when Gaussian noise is added to its inputs.

This is NOT differential privacy. Adding noise to images at inference protects no training record
and gives no (epsilon, delta) guarantee; DP comes only from noise in *training* (DP-SGD). What this
module answers is a different question: how much accuracy a model (private or not) loses when its
input images are perturbed with N(0, s^2) noise, as when one tests robustness or blurs what a
sensor reveals. The noise generator is the caller's (seeded, reproducible), as befits an evaluation.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor


class InputNoise:
    """Adds N(0, std^2) to image tensors in [0, 1] and clamps back to [0, 1].

    Use it directly (``noise(img)``) or on Ultralytics' validator and predictor through
    ``attach(model)``, which wraps their ``preprocess`` at ``on_val_start`` / ``on_predict_start``.
    ``std=0`` leaves images exactly as they were.
    """

    def __init__(self, std: float, generator: torch.Generator | None = None) -> None:
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not math.isfinite(std) or std < 0:
            raise ValueError(f"noise std must be a finite number >= 0, got {std!r}")
        self.std = float(std)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.callbacks: dict[str, Callable[[Any], None]] = {
            "on_val_start": self._wrap_preprocess,
            "on_predict_start": self._wrap_preprocess,
        }

    def __call__(self, img: Tensor) -> Tensor:
        """A new tensor: ``clamp(img + std * N(0, 1), 0, 1)``; ``img`` is not modified."""
        if self.std == 0:
            return img
        noise = torch.randn(img.shape, generator=self.generator, dtype=torch.float32).to(img.device)
        return (img.float() + self.std * noise).clamp(0, 1).to(img.dtype)

    def attach(self, model: Any) -> "InputNoise":
        """Register on a ``YOLO`` model: its ``val()`` and ``predict()`` see noisy images."""
        for event, fn in self.callbacks.items():
            model.add_callback(event, fn)
        return self

    def _wrap_preprocess(self, runner: Any) -> None:
        original = runner.preprocess
        if getattr(original, "_input_noise", None) is self:
            return

        def noisy_preprocess(batch: Any) -> Any:
            out = original(batch)
            if isinstance(out, dict):  # validator: a batch dict
                return {**out, "img": self(out["img"])}
            return self(out)  # predictor: the image tensor

        noisy_preprocess._input_noise = self
        runner.preprocess = noisy_preprocess


def _metric(metrics: Any) -> tuple[str, float]:
    if hasattr(metrics, "top1"):
        return "top1", float(metrics.top1)
    return "mAP50-95", float(metrics.box.map)


def evaluate(
    models: Sequence[str], data: str, levels: Sequence[float], *, seed: int = 0, **val_kwargs: Any
) -> list[dict[str, Any]]:
    """Validate every model at every noise level: rows of model, noise, metric, value."""
    from ultralytics import YOLO

    from ..datasets import embedded as datasets

    data = datasets.resolve(data)
    rows = []
    for name in models:
        for std in levels:
            model = YOLO(name)
            InputNoise(std, torch.Generator().manual_seed(seed)).attach(model)
            metric, value = _metric(model.val(data=data, plots=False, **val_kwargs))
            rows.append({"model": name, "noise": std, "metric": metric, "value": value})
    return rows


def write_report(rows: list[dict[str, Any]], out_dir: str | Path) -> tuple[Path, Path]:
    """``robustness.csv`` and ``robustness.png`` (metric against noise, one line per model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out_dir / "robustness.csv", out_dir / "robustness.png"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["model", "noise", "metric", "value"])
        writer.writeheader()
        writer.writerows(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["model"] for r in rows):
        pts = [(r["noise"], r["value"]) for r in rows if r["model"] == name]
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xlabel("input noise std (images in [0, 1])")
    ax.set_ylabel(rows[0]["metric"] if rows else "metric")
    ax.set_title("Input-noise robustness (not differential privacy)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return csv_path, png_path
