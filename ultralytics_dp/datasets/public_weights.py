"""Public pretrained weights for the embedded demo: a model trained *non-privately* on public data
only (``digits-public-det`` / ``digits-public-cls``), cached, to be fine-tuned privately.

Why: DP training from a random init learns little; starting from public weights is the main path
(De et al. 2022). Users with internet start from Ultralytics' COCO/ImageNet ``*.pt`` instead; this
module gives the offline demo, tests and benchmarks the same shape of workflow.

Privacy assumptions relied on here: the pretraining set is public (digits typeset in fonts or
written with a simulated pen, which never read the private handwritten set:
:mod:`ultralytics_dp.font_digits`, :mod:`ultralytics_dp.pen_digits`), so training on it without
noise, with every Ultralytics default (mosaic, BatchNorm in train mode), releases nothing private.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .embedded import cache_dir

# dataset -> (architecture, training arguments); part of the cache key. Detection names its optimizer:
# Ultralytics' optimizer=auto fits AdamW's lr to 0.002 * 5 / (4 + nc) = 0.000714 for runs under
# 10,000 steps, too small for these 320 (20 epochs of 1,000 images at nominal batch 64): what each
# reaches is in pretrained()'s docstring
RECIPES: dict[str, tuple[str, dict]] = {
    "digits-public-det": ("yolo26n.yaml", {"imgsz": 128, "epochs": 20, "batch": 32, "optimizer": "AdamW", "lr0": 0.002}),
    "digits-public-cls": ("yolo26n-cls.yaml", {"imgsz": 32, "epochs": 20, "batch": 64}),
}
# make demo's public detector: the recipe at 8 epochs, stepping every 16 images: 504 optimizer steps
# instead of the recipe's 320 in 20 epochs, in less than half its time (benchmarks/UTILITY.md)
DEMO_DETECTOR: dict[str, int] = {"epochs": 8, "batch": 16}
# bump when the public data or how it is trained changes (epochs, imgsz and a given batch are in the key);
# never back to 3: an unpublished experiment's key
_VERSION = 6


def pretrained(dataset: str = "digits-public-det", *, root: Path | None = None, epochs: int | None = None,
               batch: int | None = None) -> Path:
    """Path of weights pretrained on the public ``dataset``: trained on first use, then reused.

    ``epochs`` replaces the recipe's; ``batch`` sets the images per optimizer step (Ultralytics'
    ``batch`` and ``nbs`` both, so gradients are not accumulated; the recipe's batch 32 steps every
    64 images). The detection recipe is the benchmarks'; ``make demo`` pretrains ``DEMO_DETECTOR``
    to fit its time on 2 CPU cores. A better-trained public model is a better start (detection,
    zero-shot mAP50 on digits-det's validation set: 20 epochs at Ultralytics' automatic learning
    rate 0.48, at the recipe's 0.68-0.72 (the machine's rounding), ``DEMO_DETECTOR`` 0.75; 60 epochs
    at the automatic one 0.78, at the recipe's 0.88; classification: 20 epochs instead of 10 raised
    top-1 on held-out handwritten training images after an epsilon=1 fine-tune from 92.1% to 95.2%;
    ``benchmarks/UTILITY.md``).
    The training runs in a temporary folder and only its final ``last.pt`` is moved into the cache,
    so an interrupted run leaves nothing that would be reused.
    """
    if dataset not in RECIPES:
        raise ValueError(f"no public pretraining recipe for {dataset!r}; choose one of {', '.join(RECIPES)}")
    architecture, args = RECIPES[dataset]
    if epochs is not None:
        args = {**args, "epochs": epochs}
    key = f"{Path(architecture).stem}-{dataset}-v{_VERSION}-e{args['epochs']}-i{args['imgsz']}"
    if batch is not None:
        args = {**args, "batch": batch, "nbs": batch}
        key += f"-b{batch}"
    key += ".pt"
    folder = Path(root) if root else cache_dir() / "pretrained"
    final = folder / key
    if final.exists():
        return final
    import torch
    from ultralytics import YOLO

    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".pretrain-", dir=folder))
    threads = torch.get_num_threads()
    try:
        print(f"pretraining {architecture} on the public {dataset} (non-private, cached in {final})")
        model = YOLO(architecture)
        model.add_callback("on_pretrain_routine_start", all_cores)
        # val=False: only the last epoch is validated (a minute saved in make demo); the validation
        # pass draws from the random stream, so this choice is part of what _VERSION names
        model.train(data=dataset, **args, fliplr=0.0, workers=0, seed=0, plots=False, val=False,
                    project=str(work), name="run", exist_ok=True, verbose=False)
        tmp = final.with_suffix(f".{os.getpid()}.tmp")
        shutil.copyfile(work / "run" / "weights" / "last.pt", tmp)
        os.replace(tmp, final)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(work, ignore_errors=True)
    return final


def all_cores(trainer) -> None:
    """Trainer callback (``on_pretrain_routine_start``): compute on up to 8 cores. On a CPU,
    Ultralytics loads data in the main process (``workers=0``) and computes on ``cpu_count - 1``
    threads, so on 2 cores one idles (``benchmarks/UTILITY.md`` has the timings). The thread count
    changes the rounding, so the weights depend on the machine's cores."""
    import torch

    torch.set_num_threads(min(os.cpu_count() or 1, 8))
