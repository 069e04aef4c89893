"""Helpers shared by the trainer tests: a spy on optimizer steps and BatchNorm, a tiny private run."""

from __future__ import annotations

import torch

import ultralytics_dp  # noqa: F401  (offline switches before Ultralytics)
from ultralytics import YOLO


def _bn_state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


class Spy:
    """Counts optimizer steps and records BatchNorm statistics around a run."""

    def __init__(self):
        self.optimizer_steps = 0
        self.bn_before = self.bn_after = None

    def attach(self, model):
        model.add_callback("on_pretrain_routine_end", self.start)  # runs after DP's own
        model.add_callback("on_train_end", self.end)

    def start(self, trainer):
        self.bn_before = _bn_state(trainer.model)
        step = trainer.optimizer.step

        def counted(*a, **k):
            self.optimizer_steps += 1
            return step(*a, **k)

        trainer.optimizer.step = counted

    def end(self, trainer):
        self.bn_after = _bn_state(trainer.model)


def train_tiny(data, tmp_path, dp, epochs=2, callbacks=None, **kw):
    """A private yolo26n run on ``data`` (imgsz 64, expected batch 8); ``callbacks`` (event -> fn)
    are registered after DP's and the spy's."""
    model = YOLO("yolo26n.yaml")
    spy = Spy()
    dp.attach(model)
    spy.attach(model)
    for event, fn in (callbacks or {}).items():
        model.add_callback(event, fn)
    model.train(data=str(data), epochs=epochs, imgsz=64, batch=8, workers=0, project=str(tmp_path),
                name="run", exist_ok=True, **kw)
    return model, spy, tmp_path / "run"
