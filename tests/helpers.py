"""Helpers shared by the tests: small models and a naive per-sample reference (engine tests),
Ultralytics models and batches (loss tests), a spy and a tiny private run (trainer tests), and a
check that a refused run spends, records and writes nothing."""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ultralytics_dp  # noqa: F401  (import hooks before Ultralytics)
from ultralytics import YOLO
from ultralytics.cfg import get_cfg

from ultralytics_dp import DifferentialPrivacy, per_sample_losses
from ultralytics_dp.accounting.ledger import Ledger


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


# ---------------------------------------------------------------- small models (engine tests)
class Attention(nn.Module):
    """Single-head self-attention over spatial positions (matmul + softmax)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(c, 3 * c)
        self.norm = nn.LayerNorm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.norm(x.flatten(2).transpose(1, 2))
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1)
        return x + (a @ v).transpose(1, 2).reshape(b, c, h, w)


class SmallCNN(nn.Module):
    """Every layer type the engine promises to support."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU())
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.gn = nn.GroupNorm(2, 8)
        self.pool = nn.MaxPool2d(2)
        self.attn = Attention(8)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = nn.Linear(16 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.stem(x)
        b = self.pool(torch.nn.functional.silu(self.gn(self.dw(a))))
        b = self.up(self.attn(b))
        return self.head(torch.cat([a, b], dim=1).flatten(1))


def ce_loss(model_call, sample):
    return nn.functional.cross_entropy(model_call(sample["x"]), sample["y"])


def make(dtype=torch.float64, b=6, seed=0):
    torch.manual_seed(seed)
    model = SmallCNN().to(dtype)
    # non-trivial running stats, then BN frozen as the engine requires
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 8, 8, dtype=dtype))
    model.eval()
    batch = {"x": torch.randn(b, 3, 8, 8, dtype=dtype), "y": torch.randint(0, 5, (b,))}
    return model, batch


def naive_grads(model, batch, loss_fn=ce_loss):
    """Independent reference: autograd on each sample alone."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = {n: [] for n in params}
    n = next(iter(batch.values())).shape[0]
    for i in range(n):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        loss = loss_fn(model, one)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for name, g, p in zip(params, grads, params.values()):
            out[name].append(torch.zeros_like(p) if g is None else g)
    return {k: torch.stack(v) for k, v in out.items()}


def max_rel_err(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)).item() for k in b)


def weighted_loss(model_call, sample):
    return ce_loss(model_call, sample) * sample["w"].sum()



# ---------------------------------------------------------------- Ultralytics models and batches
def trainer_model(cfg: str) -> torch.nn.Module:
    """The model as the DP trainer holds it: args set, train mode, BatchNorm frozen."""
    torch.manual_seed(0)
    model = YOLO(cfg).model
    model.args = get_cfg()
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    return model


def det_batch(counts: list[int], size: int = 64, seed: int = 0, rotated: bool = False,
              dtype: torch.dtype = torch.float) -> dict:
    """Random images (of ``dtype``) and float32 labels, as Ultralytics collates them; ``counts[i]``
    boxes on image i (xywh, or xywhr with ``rotated``)."""
    g = torch.Generator().manual_seed(seed)
    idx, cls, boxes = [], [], []
    for i, c in enumerate(counts):
        for _ in range(c):
            idx.append(i)
            cls.append(int(torch.randint(0, 80, (1,), generator=g)))
            box = [torch.rand(2, generator=g) * 0.5 + 0.25, torch.rand(2, generator=g) * 0.3 + 0.1]
            boxes.append(torch.cat(box + ([torch.rand(1, generator=g) * 1.5] if rotated else [])))
    return {
        "img": torch.rand(len(counts), 3, size, size, generator=g).to(dtype),
        "batch_idx": torch.tensor(idx, dtype=torch.float),
        "cls": torch.tensor(cls, dtype=torch.float).view(-1, 1),
        "bboxes": torch.stack(boxes) if boxes else torch.zeros(0, 5 if rotated else 4),
    }


def seg_batch(counts: list[int], size: int = 64, seed: int = 0, dtype: torch.dtype = torch.float) -> dict:
    """``det_batch`` with instance masks as Ultralytics collates them with ``overlap_mask=True``
    (``masks`` [B, size/4, size/4]: 0 background, j + 1 the image's j-th instance, its box filled)
    and YOLO26's per-pixel class map ``sem_masks``."""
    batch = det_batch(counts, size, seed, dtype=dtype)
    m = size // 4
    masks = torch.zeros(len(counts), m, m)
    sem = torch.zeros(len(counts), m, m)
    for i in range(len(counts)):
        own = (batch["batch_idx"] == i).nonzero().view(-1)
        for j, row in enumerate(own.tolist()):
            cx, cy, w, h = (batch["bboxes"][row] * m).tolist()
            ys, xs = slice(int(cy - h / 2), int(cy + h / 2) + 1), slice(int(cx - w / 2), int(cx + w / 2) + 1)
            masks[i, ys, xs] = j + 1
            sem[i, ys, xs] = batch["cls"][row, 0]
    return {**batch, "masks": masks, "sem_masks": sem}


def pose_batch(counts: list[int], size: int = 64, seed: int = 0, dtype: torch.dtype = torch.float,
               kpts: int = 17) -> dict:
    """``det_batch`` of one class with ``kpts`` keypoints per box (x, y inside it, visibility 0 or 2),
    as Ultralytics collates pose labels."""
    batch = det_batch(counts, size, seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 100)
    k = torch.rand(len(batch["cls"]), kpts, 3, generator=g)
    xy = batch["bboxes"][:, None, :2] + (k[..., :2] - 0.5) * batch["bboxes"][:, None, 2:]
    visible = (k[..., 2:] > 0.3).float() * 2
    return {**batch, "cls": torch.zeros_like(batch["cls"]), "keypoints": torch.cat((xy, visible), -1)}


def per_instance_masks(batch: dict) -> dict:
    """``seg_batch`` with ``overlap_mask=False``: one binary mask per instance, in label order."""
    owner = batch["batch_idx"].long()
    within = torch.cat([torch.arange(int((owner == i).sum())) for i in range(len(batch["img"]))])
    return {**batch, "masks": (batch["masks"][owner] == (within + 1).view(-1, 1, 1)).float()}


def image(batch: dict, i: int) -> dict:
    """Image i alone, as a batch of one."""
    if "batch_idx" not in batch:
        return {"img": batch["img"][i : i + 1], "cls": batch["cls"][i : i + 1]}
    m = batch["batch_idx"] == i
    one = {"img": batch["img"][i : i + 1], "batch_idx": torch.zeros(int(m.sum())),
           "cls": batch["cls"][m], "bboxes": batch["bboxes"][m]}
    if "masks" in batch and len(batch["masks"]) != len(batch["img"]):  # one mask per instance
        one["masks"] = batch["masks"][m]
    elif "masks" in batch:
        one["masks"] = batch["masks"][i : i + 1]
    if "keypoints" in batch:  # one set per instance
        one["keypoints"] = batch["keypoints"][m]
    return {**one, **{k: batch[k][i : i + 1] for k in ("sem_masks",) if k in batch}}


def ultralytics_loss_alone(model, one: dict) -> torch.Tensor:
    """Ultralytics' own criterion on a batch of one, with its BCE switched to the formula we use
    (softplus(x) - x*y) so that only the normalisation and assignment logic are compared."""
    crit = copy.deepcopy(model.init_criterion())
    for branch in (getattr(crit, "one2many", None), getattr(crit, "one2one", None), crit):
        if branch is not None and hasattr(branch, "bce"):
            branch.bce = lambda x, y: F.softplus(x) - x * y
    return crit(model(one["img"]), one)[0].sum()


def naive_image_grads(model, batch, n):
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(n):
        loss = per_sample_losses(model, image(batch, i))[0]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)])
    return out



# ---------------------------------------------------------------- refused runs
def copy_dataset(tiny_det: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(tiny_det.parent, root)
    yaml = root / "data.yaml"
    yaml.write_text(yaml.read_text().replace(str(tiny_det.parent), str(root)))
    return yaml


def assert_refused(tmp_path, data, match, dp_kwargs=None, cfg="yolo26n.yaml", **train_kwargs):
    ledger = tmp_path / "ledger.sqlite"
    dp = DifferentialPrivacy(**{"epsilon": 4.0, "delta": 1e-3, "ledger": ledger, **(dp_kwargs or {})})
    model = YOLO(cfg)
    dp.attach(model)
    data = [str(d) for d in data] if isinstance(data, list) else str(data)
    kwargs = dict(data=data, epochs=1, imgsz=64, batch=8, workers=0, project=str(tmp_path), name="r")
    with pytest.raises(Exception, match=match) as err:
        model.train(**{**kwargs, **train_kwargs})
    assert len(str(err.value).splitlines()) == 1
    assert dp.steps == 0 and dp.noise_draws == 0
    book = Ledger(ledger)
    assert ledger_steps(ledger) == 0 and book.summary()["datasets"] == []  # nothing spent or recorded
    assert book.epsilons()["histogram"] == []  # not even the training images' hashes
    assert not (tmp_path / "r").exists()  # nothing written


def ledger_steps(path: Path) -> int:
    """Every step the ledger at ``path`` has reserved, over all runs."""
    summary = Ledger(path).summary()
    return sum(r["steps"] for ds in summary["datasets"] for r in ds["runs"]) + sum(
        r["steps"] for r in summary["legacy_runs"])



def released_epsilon(*, noise_multiplier, sample_rate, steps, delta):
    """What a run of ``steps`` steps releases: the larger of the two accountants' upper bounds."""
    from ultralytics_dp.accounting.accountant import epsilon

    return epsilon(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta).epsilon
