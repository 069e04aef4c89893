"""One audited private run: ``audit(...)`` and ``yolo-dp audit``.

The run is a user's run: ``YOLO(model)``, ``DifferentialPrivacy(settings).attach(model)``,
``model.train(...)``, through the same callbacks, Poisson loader, clipping back-end, noise and
accountant. The audit adds m canaries, each in the run with probability 1/2, scores them after the
run, guesses which were in (``bound.best_guess``) and turns the correct guesses into a lower bound
on epsilon at the run's delta. A bound above the run's claimed epsilon means the mechanism or its
accounting is broken.

* ``kind="gradient"`` (white-box): Dirac gradient canaries (``canaries.GradientCanaries``) added to
  every private step's clipped sum, scored by the private gradients at their coordinates.
* ``kind="input"`` (black-box, classification data): m images of uniform noise, each with a random
  class, written into a copy of the training set when included; scored by the final model's loss.

What is private: the data the user passes is trained on like in any run, so auditing on private data
is itself a private run, recorded in the ledger like any other (``ledger=`` as for training). An
embedded (public) dataset is audited with ``ledger=False``: the canaries spend nothing from the
user's ledger.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import SETTINGS, DPConfig
from ..datasets import embedded
from .bound import best_guess, ceiling
from .canaries import GradientCanaries

KINDS = ("gradient", "input")
CANARY_NORM = 10.0  # a gradient canary's norm before clipping, in units of C: clipping must act on it


@dataclass(frozen=True)
class AuditResult:
    """What an audit found. ``ceiling``: the most these canaries could show. ``passed``:
    ``epsilon_lb <= claimed_epsilon``; ``verdict`` is "failed" (the bound exceeds the claim),
    "inconclusive" (the claim is at or above the ceiling: no outcome could have failed it) or "passed"."""

    kind: str
    claimed_epsilon: float
    delta: float
    epsilon_lb: float
    confidence: float
    canaries: int
    included: int
    guesses: int
    correct: int
    steps: int
    noise_multiplier: float
    sample_rate: float
    ceiling: float

    @property
    def passed(self) -> bool:
        return self.epsilon_lb <= self.claimed_epsilon

    @property
    def verdict(self) -> str:
        return "failed" if not self.passed else "inconclusive" if self.claimed_epsilon >= self.ceiling else "passed"

    def as_json(self) -> str:
        """Every field, with ``passed`` and ``verdict`` (``audit.json``; the report page reads it)."""
        return json.dumps({**asdict(self), "passed": self.passed, "verdict": self.verdict}, indent=2)

    def line(self) -> str:
        verdict = {"passed": "passed", "failed": "FAILED: the lower bound exceeds the claim",
                   "inconclusive": f"INCONCLUSIVE: {self.canaries} canaries can show at most epsilon={self.ceiling:.3f}; "
                                   "use more canaries or audit a smaller epsilon"}[self.verdict]
        return (f"audit ({self.kind} canaries): claimed epsilon={self.claimed_epsilon:.4f}, empirical lower bound "
                f"epsilon_lb={self.epsilon_lb:.4f} at {self.confidence:.0%} confidence (delta={self.delta:g}; "
                f"{self.correct} of {self.guesses} guesses correct, {self.canaries} canaries, {self.included} in, "
                f"{self.steps} steps): {verdict}")


def audit(model: str = "yolo26n-cls.yaml", data: str = "digits-cls", *, canaries: int = 1000,
          kind: str = "gradient", confidence: float = 0.95, **settings: Any) -> AuditResult:
    """Audit one private run; ``settings`` are DP settings (``epsilon`` required) and Ultralytics
    training arguments. Writes ``audit.json`` into the run's folder and its ``privacy.html``."""
    from ultralytics import YOLO

    from ..integration.adapter import DifferentialPrivacy
    from ..integration.report_page import write_run_page

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if isinstance(canaries, bool) or not isinstance(canaries, int) or canaries < 2:
        raise ValueError(f"canaries must be an integer >= 2, got {canaries!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    dp_settings = {k: v for k, v in settings.items() if k in SETTINGS}
    train_args = {k: v for k, v in settings.items() if k not in SETTINGS}
    public = isinstance(data, str) and data.removesuffix(".yaml") in embedded.DATASETS
    if public:
        dp_settings.setdefault("ledger", False)
    config = DPConfig(**dp_settings)
    if str(train_args.get("device", "")).count(",") > 0:
        raise ValueError("an audit runs on one device; set device=0 (or cpu)")
    if train_args.get("resume"):
        raise ValueError("an audit is one whole run (its canaries live in this process); remove resume=")
    yolo = YOLO(model)
    dp = DifferentialPrivacy(config)
    if kind == "gradient":
        dp.canaries = GradientCanaries(canaries, norm=CANARY_NORM * config.max_grad_norm)
        train_data = data
    else:
        if config.privacy_unit != "image":
            raise ValueError("kind=input audits per image; use kind=gradient with privacy_unit=person")
        train_data, included, labels = _with_input_canaries(data, canaries, Path(train_args.get("project") or "runs"))
    dp.attach(yolo)
    try:
        yolo.train(data=str(train_data), **train_args)
        if kind == "gradient":
            scores, included = dp.canaries.scores(), dp.canaries.included.tolist()
        else:
            scores = _input_scores(yolo, labels, int(yolo.trainer.args.imgsz))
    finally:
        if kind == "input":
            shutil.rmtree(Path(train_data).parent, ignore_errors=True)
    save_dir = Path(yolo.trainer.save_dir)
    guess = best_guess(scores, included, dp.delta, confidence)
    result = AuditResult(kind=kind, claimed_epsilon=dp.epsilon, delta=dp.delta, epsilon_lb=guess.epsilon_lb,
                         confidence=confidence, canaries=canaries, included=int(sum(included)), guesses=guess.guesses,
                         correct=guess.correct, steps=dp.steps, noise_multiplier=dp.noise_multiplier,
                         sample_rate=dp.plan.sample_rate, ceiling=ceiling(canaries, dp.delta, confidence))
    (save_dir / "audit.json").write_text(result.as_json())
    write_run_page(save_dir)
    print(result.line())
    return result


# ----------------------------------------------------------------- input-space canaries
def _noise_image(gen: np.random.Generator, size: int) -> "Any":
    from PIL import Image

    return Image.fromarray(gen.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _with_input_canaries(data: str, count: int, project: Path) -> tuple[Path, list[bool], list[tuple[Path, int]]]:
    """A copy of a classification dataset (class folders under train/ and val/) with the included
    canaries in train/; returns (its root, which canaries are in, each canary's (image, class))."""
    root = Path(str(embedded.resolve(data)))
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir()) if (root / "train").is_dir() else []
    if not classes:
        raise ValueError(f"kind=input needs classification data (class folders under train/), got data={data}; "
                         "use kind=gradient")
    gen = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
    size = max(_image_size(p) for p in (root / "train" / classes[0]).iterdir())
    work = Path(project).resolve() / f".audit-{os.urandom(4).hex()}"
    copy = work / root.name
    shutil.copytree(root, copy)
    (work / "canaries").mkdir()
    included, labels = [], []
    for i in range(count):
        label = int(gen.integers(len(classes)))
        image = _noise_image(gen, size)
        kept = work / "canaries" / f"canary{i:05d}.png"
        image.save(kept)
        inside = bool(gen.random() < 0.5)
        if inside:
            shutil.copy(kept, copy / "train" / classes[label] / kept.name)
        included.append(inside)
        labels.append((kept, label))
    return copy, included, labels


def _image_size(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as im:
        return max(im.size)


def _input_scores(yolo: Any, labels: list[tuple[Path, int]], imgsz: int) -> list[float]:
    """Each canary's score: minus the trained model's cross-entropy on it (low loss: trained on)."""
    from PIL import Image

    net = yolo.model.eval()
    device = next(net.parameters()).device
    scores = []
    with torch.no_grad():
        for path, label in labels:
            with Image.open(path) as im:
                x = torch.from_numpy(np.asarray(im.convert("RGB").resize((imgsz, imgsz)), dtype=np.float32) / 255)
            out = net(x.permute(2, 0, 1)[None].to(device))
            probs = out[0] if isinstance(out, (tuple, list)) else out
            scores.append(float(torch.log(probs[0, label].clamp_min(1e-30))))
    if not all(math.isfinite(s) for s in scores):
        raise RuntimeError("a canary's loss is not finite")
    return scores
