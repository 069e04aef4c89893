"""Private vs non-private training steps, side by side in one process, and Opacus as the peer.

For each case the same model, data and logical batch run alternating non-private steps (Ultralytics'
own loss, backward, optimizer step) and private steps (``private_gradient``: per-image clipping,
one noise draw, optimizer step) after a warm-up; the median of the step times and the peak memory
of each kind of step (on CPU the peak RSS of a fresh process running only that kind of step;
``torch.cuda.max_memory_allocated`` on GPU) are reported as ratios. On the classification case Opacus 1.6 (``bench`` extra) runs the same
clipping and noise in hooks mode, functorch mode and ghost clipping.

    .venv/bin/python benchmarks/bench_train.py [--device cuda] [--repeats 5] [--cases det26,cls,det8,seg26,obb26,pose26]

Writes benchmarks/RESULTS.md and benchmarks/ratios.png.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from PIL import Image

import ultralytics_dp  # noqa: F401  (import hooks)
from ultralytics import YOLO
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import PoseModel

from results_md import draw_ratios, replace_section
from ultralytics_dp.datasets import embedded as datasets
from ultralytics_dp.integration.private_step import private_gradient, resolve_grad_method
from ultralytics_dp.integration.guard import freeze_batchnorm

HERE = Path(__file__).resolve().parent
SIGMA, C = 1.0, 1.0
CASES = {
    "det26": dict(cfg="yolo26n.yaml", imgsz=320, batch=32, physical=16),
    "cls": dict(cfg="yolo26n-cls.yaml", imgsz=64, batch=64, physical=64),
    "det8": dict(cfg="yolov8n.yaml", imgsz=320, batch=32, physical=16),
    "seg26": dict(cfg="yolo26n-seg.yaml", imgsz=320, batch=32, physical=16),
    "obb26": dict(cfg="yolo26n-obb.yaml", imgsz=320, batch=32, physical=16),
    "pose26": dict(cfg="yolo26n-pose.yaml", imgsz=320, batch=32, physical=16),
}
TASK_DATA = {"seg": ("digits-seg", "segment"), "obb": ("digits-obb", "obb"), "pose": ("digits-pose", "pose")}


class PeakMemory:
    """Peak memory while the block runs: RSS sampled by a thread (CPU) or CUDA's own counter."""

    def __init__(self, device: str) -> None:
        self.device, self.peak = device, 0

    def __enter__(self) -> "PeakMemory":
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            return self
        self._stop = False
        proc = psutil.Process()
        self.peak = proc.memory_info().rss

        def sample() -> None:
            while not self._stop:
                self.peak = max(self.peak, proc.memory_info().rss)
                time.sleep(0.005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop = True
            self._thread.join()


def load_batch(kind: str, imgsz: int, batch: int, device: str) -> dict:
    """A real batch from the embedded datasets, preprocessed as the trainer would."""
    if kind == "cls":
        root = datasets.build("digits-cls", imgsz=imgsz)
        files = sorted((root / "train").rglob("*.png"))[::7][:batch]
        imgs = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
        cls = torch.tensor([int(f.parent.name) for f in files])
        return {"img": torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(255).to(device), "cls": cls.to(device)}
    if kind in TASK_DATA:  # through Ultralytics' own dataset and collate (masks, rotated boxes)
        from ultralytics.data import YOLODataset
        from ultralytics.data.utils import check_det_dataset

        name, task = TASK_DATA[kind]
        data = check_det_dataset(str(datasets.build(name, imgsz=imgsz, n_train=batch, n_val=4)))
        ds = YOLODataset(img_path=data["train"], imgsz=imgsz, augment=False, data=data, task=task,
                         hyp=get_cfg(overrides={"imgsz": imgsz}))
        out = ds.collate_fn([ds[i] for i in range(batch)])
        out = {k: v.to(device) for k, v in out.items() if isinstance(v, torch.Tensor)}
        out["img"] = out["img"].float().div(255)
        return out
    yaml = datasets.build("digits-det", imgsz=imgsz, n_train=batch, n_val=4)
    root = yaml.parent
    imgs, idx, cls, boxes = [], [], [], []
    for i, f in enumerate(sorted((root / "images" / "train").glob("*.png"))[:batch]):
        imgs.append(np.asarray(Image.open(f).convert("RGB")))
        for line in (root / "labels" / "train" / f"{f.stem}.txt").read_text().splitlines():
            c, *xywh = map(float, line.split())
            idx.append(i), cls.append(c), boxes.append(xywh)
    return {
        "img": torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().div(255).to(device),
        "batch_idx": torch.tensor(idx).to(device), "cls": torch.tensor(cls).view(-1, 1).to(device),
        "bboxes": torch.tensor(boxes).view(-1, 4).to(device),
    }


def make_model(cfg: str, device: str, freeze_bn_affine: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    # digits-pose has 10 classes and 5 keypoints, not the yaml's 1 and 17
    model = PoseModel(cfg, nc=10, data_kpt_shape=(5, 3), verbose=False) if "-pose" in cfg else YOLO(cfg).model
    model = model.to(device)
    model.args = get_cfg()
    model.train()
    if freeze_bn_affine:
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.requires_grad_(False), m.bias.requires_grad_(False)
    return model


def timed(step, repeats: int, device: str) -> tuple[float, int]:
    times, peak = [], 0
    for _ in range(repeats):
        with PeakMemory(device) as mem:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak = max(peak, mem.peak)
    return statistics.median(times), peak


def build_steps(spec: dict, device: str, freeze_bn_affine: bool = False, amp: bool = False) -> tuple:
    """(plain_step, private_step, method) for one case, on the same model weights and batch; with
    ``amp``, both run their forward and backward under bf16 autocast."""
    kind = next((k for k in ("cls", *TASK_DATA) if f"-{k}" in spec["cfg"]), "det")
    batch = load_batch(kind, spec["imgsz"], spec["batch"], device)
    plain_model = make_model(spec["cfg"], device, freeze_bn_affine)
    dp_model = copy.deepcopy(plain_model)
    freeze_batchnorm(dp_model)
    method = resolve_grad_method(dp_model, "auto")
    plain_opt = torch.optim.SGD([p for p in plain_model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    dp_opt = torch.optim.SGD([p for p in dp_model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    autocast = lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=amp)  # noqa: E731

    def plain_step() -> None:  # what `yolo train` does per step, minus data loading
        with autocast():
            loss, _ = plain_model.loss(batch)
            loss.sum().backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    def private_step() -> None:
        with autocast():
            grad = private_gradient(dp_model, batch, method=method, max_grad_norm=C, noise_multiplier=SIGMA,
                                    expected_batch_size=spec["batch"], physical_batch=spec["physical"])
        for k, p in dp_model.named_parameters():
            if p.requires_grad:
                p.grad = grad[k]
        dp_opt.step()
        dp_opt.zero_grad(set_to_none=True)

    return plain_step, private_step, method


def peak_rss() -> int:
    """This process's peak RSS in bytes (VmHWM). Unlike ru_maxrss it is not inherited from the
    parent across fork + exec, so a small probe launched by a big benchmark reports its own."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_probe(name: str, kind: str, device: str, freeze_bn_affine: bool) -> int:
    """Peak memory of a fresh process that builds the case and runs only ``kind`` steps (2)."""
    if device == "cpu":
        code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import bench_train as b; "
                f"steps = b.build_steps(b.CASES[{name!r}], 'cpu', {freeze_bn_affine}); "
                f"step = steps[{0 if kind == 'plain' else 1}]; step(); step(); print(b.peak_rss())")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        return int(out.strip().splitlines()[-1])
    steps = build_steps(CASES[name], device, freeze_bn_affine)
    steps[0 if kind == "plain" else 1]()
    return timed(steps[0 if kind == "plain" else 1], 1, device)[1]


def run_case(name: str, spec: dict, device: str, repeats: int, freeze_bn_affine: bool = False,
             amp: bool = False) -> dict:
    plain_step, private_step, method = build_steps(spec, device, freeze_bn_affine, amp)
    plain_step(), private_step()  # warm-up
    plain_t, private_t = [], []
    for _ in range(repeats):  # alternate, so both see the same machine state
        plain_t.append(timed(plain_step, 1, device)[0])
        private_t.append(timed(private_step, 1, device)[0])
    key = name.split()[0]
    return {"case": name, "method": method, "plain_s": statistics.median(plain_t),
            "private_s": statistics.median(private_t),
            "plain_mem": memory_probe(key, "plain", device, freeze_bn_affine),
            "private_mem": memory_probe(key, "private", device, freeze_bn_affine)}


def run_opacus(spec: dict, device: str, repeats: int) -> list[dict]:
    """Opacus 1.6 on the classification case with BN affine frozen (Opacus has no BatchNorm
    per-sample gradients), same C, sigma and logical batch."""
    rows = []
    batch = load_batch("cls", spec["imgsz"], spec["batch"], device)
    try:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer
    except ImportError as err:
        return [{"case": "cls (BN affine frozen)", "method": f"opacus: not installed ({err})"}]
    for mode in ("hooks", "functorch", "ghost"):
        try:
            model = make_model(spec["cfg"], device, freeze_bn_affine=True)
            freeze_batchnorm(model)
            params = [p for p in model.parameters() if p.requires_grad]
            if mode == "ghost":
                from opacus.grad_sample import GradSampleModuleFastGradientClipping
                from opacus.optimizers import DPOptimizerFastGradientClipping
                from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

                gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=C, use_ghost_clipping=True,
                                                           loss_reduction="sum")
                opt = DPOptimizerFastGradientClipping(torch.optim.SGD(params, lr=1e-3, momentum=0.9),
                                                      noise_multiplier=SIGMA, max_grad_norm=C,
                                                      expected_batch_size=spec["batch"], loss_reduction="sum")
                criterion = DPLossFastGradientClipping(gsm, opt, torch.nn.CrossEntropyLoss(reduction="sum"),
                                                       loss_reduction="sum")

                def step() -> None:
                    loss = criterion(gsm(batch["img"]), batch["cls"])
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
            else:
                gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum",
                                       force_functorch=(mode == "functorch"))
                opt = DPOptimizer(torch.optim.SGD(params, lr=1e-3, momentum=0.9), noise_multiplier=SIGMA,
                                  max_grad_norm=C, expected_batch_size=spec["batch"], loss_reduction="sum")

                def step() -> None:
                    F.cross_entropy(gsm(batch["img"]), batch["cls"], reduction="sum").backward()
                    opt.step()
                    opt.zero_grad()

            step()
            t, m = timed(step, repeats, device)
            rows.append({"case": "cls (BN affine frozen)", "method": f"opacus {mode}", "private_s": t,
                         "private_mem": m})
        except Exception as err:  # a peer that cannot run a case is a result
            rows.append({"case": "cls (BN affine frozen)", "method": f"opacus {mode}: failed ({type(err).__name__}: "
                                                                       f"{str(err).splitlines()[0][:80]})"})
    return rows


def write_results(rows: list[dict], args: argparse.Namespace, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device = args.device if args.device == "cpu" else torch.cuda.get_device_name()
    heading = "# Benchmark: private vs non-private training steps"
    if args.device != "cpu" or args.imgsz or args.amp != "fp32":  # one section per device and setting
        heading += f" ({device}, detection at {args.imgsz or 320} px, {args.amp})"
    lines = [
        heading,
        "",
        f"- date: {datetime.date.today()}; machine: {platform.processor() or platform.machine()}, "
        f"{psutil.cpu_count()} cores, device {device}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        f"- command: `{command}`",
        f"- sigma={SIGMA}, C={C}; times are medians of {args.repeats} steps after a warm-up, alternating",
        "",
        "| case | method | non-private s/step | private s/step | time ratio | non-private peak MiB | "
        "private peak MiB | memory ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "plain_s" in r:
            lines.append(f"| {r['case']} | ours ({r['method']}) | {r['plain_s']:.3f} | {r['private_s']:.3f} | "
                         f"{r['private_s'] / r['plain_s']:.2f} | {r['plain_mem'] / 2**20:.0f} | "
                         f"{r['private_mem'] / 2**20:.0f} | {r['private_mem'] / r['plain_mem']:.2f} |")
        elif "private_s" in r:
            lines.append(f"| {r['case']} | {r['method']} | | {r['private_s']:.3f} | | | "
                         f"{r['private_mem'] / 2**20:.0f} | |")
        else:
            lines.append(f"| {r['case']} | {r['method']} | | | | | | |")
    lines += ["", "Peak memory: on CPU, the peak RSS (VmHWM) of a fresh process that builds the case and runs "
              "only that kind of step (model, data and interpreter included); on GPU, "
              "torch.cuda.max_memory_allocated. Opacus rows: peak RSS sampled during its steps in the main process.",
              ""]
    replace_section(lines)
    if heading == "# Benchmark: private vs non-private training steps":  # the CPU table is the chart's
        draw_ratios()
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--imgsz", type=int, default=None, help="image size of the detection cases (default 320)")
    parser.add_argument("--amp", choices=("fp32", "bf16"), default="fp32", help="bf16: both steps under autocast")
    args = parser.parse_args()
    if args.imgsz:
        for case in ("det26", "det8"):
            CASES[case]["imgsz"] = args.imgsz
    amp = args.amp == "bf16"
    rows = []
    for name in args.cases.split(","):
        rows.append(run_case(name, CASES[name], args.device, args.repeats, amp=amp))
        print(rows[-1], flush=True)
        if name == "cls":
            rows.append(run_case("cls (BN affine frozen)", CASES["cls"], args.device, args.repeats, True, amp))
            rows += run_opacus(CASES["cls"], args.device, args.repeats)
            print(rows[-4:], flush=True)
    write_results(rows, args, "python benchmarks/bench_train.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
