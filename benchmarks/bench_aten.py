"""Host work per training batch, measurable without a GPU: ATen operator calls and host syncs.

Counted with ``torch.profiler`` on every thread (work moved to the ghost path's thread pool counts
too): ``aten::*`` events, and the host syncs ``aten::item`` / ``aten::_local_scalar_dense`` /
``aten::nonzero``. Two measurements, private against plain, each one optimizer step per batch:

* trainer batch: what Ultralytics' trainer does between ``on_train_batch_start`` and
  ``on_train_batch_end`` (forward, backward, optimizer step, EMA update; the plain trainer also
  unscales and clips the batch gradient, which DP mode skips), YOLO26n from the yaml on digits-det
  at 64 px, expected batch 16 (the private batch is Poisson: its size is printed), SGD for both,
  ``nbs=16`` for the plain run so that it steps every batch; the median of ``--repeats`` batches
  after three;
* bare step: the same model with frozen BatchNorm on one fixed batch of 16 images with 0-3 boxes,
  plain = Ultralytics' batch loss, backward, SGD step; private = ``private_gradient`` (ghost
  clipping, one chunk) and the SGD step; the median of ``--repeats`` steps after one warm-up;
  "as on a GPU": the ghost path as it runs on an accelerator, without its host-side finiteness check.

Usage: python benchmarks/bench_aten.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections import Counter

import torch

import ultralytics_dp  # noqa: F401  (import hooks before Ultralytics)
from ultralytics import YOLO
from ultralytics.cfg import get_cfg

from ultralytics_dp import DifferentialPrivacy
from ultralytics_dp.integration.private_step import private_gradient
from ultralytics_dp.mechanism import ghost
from ultralytics_dp.mechanism.grad_sample import trainable_params

host_checks = ghost._host_checks_finiteness
SYNCS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero")
IMAGES, SIZE = 16, 64


def model_and_batch() -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = YOLO("yolo26n.yaml").model
    model.args = get_cfg()
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 4, (IMAGES,), generator=g).tolist()
    idx = [i for i, c in enumerate(counts) for _ in range(c)]
    boxes = torch.cat([torch.rand(len(idx), 2, generator=g) * 0.5 + 0.25, torch.rand(len(idx), 2, generator=g) * 0.3 + 0.1], 1)
    batch = {"img": torch.rand(IMAGES, 3, SIZE, SIZE, generator=g), "batch_idx": torch.tensor(idx, dtype=torch.float),
             "cls": torch.randint(0, 80, (len(idx), 1), generator=g).float(), "bboxes": boxes}
    return model, batch


def plain_step(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer) -> None:
    loss, _ = model.loss(batch)
    loss.sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def private_step(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer) -> None:
    grad = private_gradient(model, batch, method="ghost", max_grad_norm=1.0, noise_multiplier=1.0,
                            expected_batch_size=float(IMAGES), physical_batch=64)
    for name, p in trainable_params(model).items():
        p.grad = grad[name]
    optimizer.step()
    optimizer.zero_grad()


def _profiler() -> torch.profiler.profile:
    config = None
    experimental = getattr(torch._C._profiler, "_ExperimentalConfig", None)
    if experimental is not None:
        try:
            config = experimental(profile_all_threads=True)
        except TypeError:
            config = None
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], experimental_config=config)


def _tally(prof: torch.profiler.profile) -> Counter:
    names = Counter(e.name for e in prof.events())
    return Counter({"aten": sum(n for k, n in names.items() if k.startswith("aten::")),
                    **{k: names.get(k, 0) for k in SYNCS}})


def count(step, model: torch.nn.Module, batch: dict) -> Counter:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    step(model, batch, optimizer)  # warm-up
    with _profiler() as prof:
        step(model, batch, optimizer)
    return _tally(prof)


def trainer_batches(private: bool, batches: int) -> list[Counter]:
    """Counts of trainer batches 4 .. 3 + ``batches`` of a one-epoch run, each with its image count."""
    model = YOLO("yolo26n.yaml")
    seen: list[Counter] = []
    state: dict = {"batch": 0, "prof": None, "images": 0}

    def images(module: torch.nn.Module, args: tuple) -> None:  # the batch's size, from the forward
        x = args[0]["img"] if isinstance(args[0], dict) else args[0]
        state["images"] = max(state["images"], x.shape[0])

    def start(trainer) -> None:
        state["batch"] += 1
        if 3 < state["batch"] <= 3 + batches:
            state["images"] = 0
            state["hook"] = trainer.model.register_forward_pre_hook(images)
            state["prof"] = _profiler().__enter__()

    def end(trainer) -> None:
        if state["prof"] is not None:
            state["prof"].__exit__(None, None, None)
            state["hook"].remove()
            seen.append(_tally(state["prof"]) + Counter(images=state["images"]))
            state["prof"] = None

    model.add_callback("on_train_batch_start", start)
    model.add_callback("on_train_batch_end", end)
    args = dict(data="digits-det", imgsz=SIZE, batch=IMAGES, epochs=1, workers=0, plots=False, val=False,
                verbose=False, optimizer="SGD")
    if private:
        DifferentialPrivacy(epsilon=8.0, delta=1e-5, ledger=False).attach(model)
    else:
        args["nbs"] = IMAGES  # accumulate 1: an optimizer step every batch, as in DP mode
    with tempfile.TemporaryDirectory() as project:
        model.train(**args, project=project, name="run")
    return seen


def _table(rows: dict[str, dict]) -> None:
    print(f"| step | aten calls | {' | '.join(SYNCS)} |")
    print("|---|---|" + "---|" * len(SYNCS))
    for label, row in rows.items():
        print(f"| {label} | {row['aten']:.0f} | " + " | ".join(f"{row[k]:.0f}" for k in SYNCS) + " |")
    print(f"private / plain aten calls: {rows['private']['aten'] / rows['plain']['aten']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = {}
    for label, private in (("plain", False), ("private", True)):
        runs = trainer_batches(private, args.repeats)
        rows[label] = {k: statistics.median(r[k] for r in runs) for k in ("aten", *SYNCS)}
        print(f"{label} trainer batches: images {[r['images'] for r in runs]}, aten calls {[r['aten'] for r in runs]}")
    print("\ntrainer batch (the issue's measure)")
    _table(rows)
    rows = {}
    for label, step in (("plain", plain_step), ("private", private_step), ("private, as on a GPU", private_step)):
        # on an accelerator the ghost path zeroes non-finite values without asking the host
        ghost._host_checks_finiteness = (lambda device: False) if "GPU" in label else host_checks
        runs = [count(step, *model_and_batch()) for _ in range(args.repeats)]
        rows[label] = {k: statistics.median(r[k] for r in runs) for k in ("aten", *SYNCS)}
    ghost._host_checks_finiteness = host_checks
    print("\nbare step")
    _table(rows)


if __name__ == "__main__":
    main()
