"""What a user waits for: the wall time of a whole ``model.train()``, private vs non-private.

Each case trains one epoch from the packaged yaml, non-private and private (epsilon=8, the DP
defaults for everything the case does not set) alternately in one process, ``--repeats`` times
each, with set-up (dataset scan, accounting, ledger) and the final validation included; the median
of each is reported. The same explicit arguments go to both runs; the private run differs only by
what DP mode changes (Poisson batches, no mixing augmentations, its defaults for unset arguments).

    .venv/bin/python benchmarks/bench_run.py [--repeats 3] [--cases det,cls] [--device 0]

Writes the "whole run" section of benchmarks/RESULTS.md and redraws benchmarks/ratios.png.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

import ultralytics_dp  # noqa: F401  (import hooks)
from results_md import draw_ratios, replace_section
from ultralytics import YOLO

from ultralytics_dp import DifferentialPrivacy

# the setting of issue 16: digits-det at 128 px, expected batch 32, a quarter of the data (q=0.128)
CASES = {
    "det": dict(model="yolo26n.yaml", data="digits-det", imgsz=128, batch=32, fraction=0.25),
    "cls": dict(model="yolo26n-cls.yaml", data="digits-cls", imgsz=32, batch=64, fraction=0.5),
}
HEADING = "# Benchmark: whole private vs non-private runs"


def one_run(case: dict, private: bool, work: Path, device: str) -> tuple[float, dict]:
    args = {k: v for k, v in case.items() if k != "model"}
    model = YOLO(case["model"])
    dp = DifferentialPrivacy(epsilon=8, ledger=work / "ledger.sqlite").attach(model) if private else None
    start = time.perf_counter()
    model.train(**args, epochs=1, workers=0, device=device, plots=False, verbose=False, project=str(work),
                name="run", exist_ok=True)
    took = time.perf_counter() - start
    return took, {"steps": dp.steps, "epsilon": dp.epsilon} if dp else {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--device", default="cpu", help="Ultralytics' device argument, e.g. 0 for the first GPU")
    args = parser.parse_args()
    device = "cpu" if args.device == "cpu" else torch.cuda.get_device_name(int(args.device))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ULTRALYTICS_DP_LEDGER"] = str(Path(tmp) / "default-ledger.sqlite")
        for name in args.cases.split(","):
            case = CASES[name]
            one_run(case, False, Path(tmp), args.device)  # warm-up: dataset cache, imports
            times: dict[bool, list[float]] = {False: [], True: []}
            for i in range(args.repeats):
                for private in (False, True):
                    took, info = one_run(case, private, Path(tmp) / f"{name}{i}{private}", args.device)
                    times[private].append(took)
                    print(f"{name} {'private' if private else 'plain'}: {took:.1f} s {info}", flush=True)
            plain, private = statistics.median(times[False]), statistics.median(times[True])
            rows.append((name, case, plain, private))
    lines = [
        HEADING if device == "cpu" else f"{HEADING} ({device})",
        "",
        f"- date: {datetime.date.today()}; machine: {platform.processor() or platform.machine()}, "
        f"{psutil.cpu_count()} cores, {device}; torch {torch.__version__}",
        f"- command: `python benchmarks/bench_run.py {' '.join(sys.argv[1:])}`",
        "- one epoch of `model.train()` from the packaged yaml, set-up and final validation included; private: "
        "epsilon=8, delta=1e-5, the DP defaults for unset arguments; medians of the repeats, alternating",
        "",
        "| case | setting | non-private s | private s | ratio |",
        "|---|---|---|---|---|",
    ]
    for name, case, plain, private in rows:
        setting = ", ".join(f"{k}={v}" for k, v in case.items())
        lines.append(f"| {name} | {setting} | {plain:.1f} | {private:.1f} | {private / plain:.2f} |")
    replace_section([*lines, ""])
    if device == "cpu":  # the chart is the CPU tables'
        draw_ratios()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
