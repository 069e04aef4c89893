"""A private YOLO26n run on device="0,1" through Ultralytics' DDP launcher (run with
ULTRALYTICS_DP_TEST_CPU_DDP=1 and this directory on PYTHONPATH, see sitecustomize.py).

    python train.py DATA OUT LEDGER {attach|keys|crash|resume}
    python -m torch.distributed.run --nproc_per_node 2 train.py DATA OUT LEDGER torchrun

Every worker writes OUT/rank{R}.json: what it trained on (each step's image files), its
arguments, its dataset's transforms and a hash of its final weights. The launching process
writes OUT/launcher.json with its DifferentialPrivacy object's epsilon and steps (attach)."""

import json
import sys
from pathlib import Path

from ultralytics import YOLO

from ultralytics_dp import DifferentialPrivacy

DATA, OUT, LEDGER, MODE = sys.argv[1:5]
DP = dict(epsilon=4.0, delta=1e-3, physical_batch=4)


def transforms(compose):
    """[name, probability] of every transform in a (nested) Compose."""
    out = []
    for t in compose.transforms:
        out += transforms(t) if hasattr(t, "transforms") else [[type(t).__name__, getattr(t, "p", None)]]
    return out


def record_steps(trainer):
    """on_train_start, every rank: count the images of this rank's share of each Poisson batch."""
    import torch.distributed as dist

    dp = next(fn.__self__ for fn in trainer.callbacks["on_pretrain_routine_end"] if hasattr(fn, "__self__")
              and type(fn.__self__).__name__ == "DifferentialPrivacy")
    trainer.seen = {"rank": dist.get_rank(), "world": dist.get_world_size(), "files": [],
                    "mosaic": trainer.args.mosaic, "all_files": list(trainer.train_loader.dataset.im_files),
                    "transforms": transforms(trainer.train_loader.dataset.transforms),
                    "val_batch": trainer.test_loader.batch_size}
    step = dp.guard.step

    def counted(batch):
        trainer.seen["files"].append(list(batch["im_file"]))
        return step(batch)

    dp.guard.step = counted


def write_seen(trainer):
    """teardown, every worker: what this rank trained on and a hash of its final weights."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for p in trainer.model.parameters():
        digest.update(p.detach().to(torch.float64).cpu().numpy().tobytes())
    trainer.seen["weights"] = digest.hexdigest()
    Path(OUT, f"rank{trainer.seen['rank']}.json").write_text(json.dumps(trainer.seen))


def crash_in_second_epoch(trainer):
    """on_train_epoch_start, every rank (mode crash): the run dies after its first epoch's checkpoint."""
    if trainer.epoch == 1:
        raise RuntimeError("crash for the resume test")


model = YOLO(str(Path(OUT, "run", "weights", "last.pt")) if MODE == "resume" else "yolo26n.yaml")
model.add_callback("on_train_start", record_steps)
model.add_callback("teardown", write_seen)
train = dict(data=DATA, epochs=2, imgsz=64, batch=8, workers=0, device="0,1", amp=False, project=OUT, name="run",
             weight_decay=5e-4, nbs=4,  # Ultralytics scales weight decay with the batch it builds its loaders with
             exist_ok=True, plots=False)
if MODE in ("attach", "torchrun"):  # torchrun: this script runs in every process, as a multi-node launch would
    dp = DifferentialPrivacy(**DP, ledger=LEDGER).attach(model)
    model.train(**train)
    if MODE == "attach":
        Path(OUT, "launcher.json").write_text(json.dumps({"epsilon": dp.epsilon, "steps": dp.steps}))
elif MODE == "resume":  # as `yolo train resume model=.../last.pt ledger=...`: the checkpoint has the rest
    model.train(resume=True, ledger=LEDGER)
else:  # keys, or crash
    if MODE == "crash":
        model.add_callback("on_train_epoch_start", crash_in_second_epoch)
    model.train(**train, **DP, ledger=LEDGER)
