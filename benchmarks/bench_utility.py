"""Privacy-utility benchmark: what a private model is worth on the embedded digits.

digits-cls top-1 and digits-det mAP50 on their validation sets for
  * public only: the model pretrained non-privately on the font-rendered public digits (zero-shot),
  * private from scratch (yolo26n yaml, the DP defaults: GroupNorm in place of BatchNorm),
  * public -> private fine-tune with the DP defaults (only model, data, epochs, epsilon set),
  * the same with augmentation multiplicity (``--augmult``),
  * public -> non-private fine-tune (the ceiling of this recipe; Ultralytics' defaults, no mirroring),
  * ``--public user``: the same rows from a public model trained the way a user would (Ultralytics'
    defaults, 8 epochs, at the private data's image size) instead of the package's recipe
    (``--user-seed S``: another draw of it, Ultralytics' ``seed=S``),
  * ``--task persons``: digits-persons-cls (the digits dealt to simulated writers, 5 each), per
    image (with the persons file, so the person's epsilon of the run is recorded too) and per
    person (``privacy_unit=person``, every image of a sampled writer; ``--caps`` adds rows with
    ``max_images_per_person`` below 5 at the middle epsilon),
at each ``--epsilons`` value, ``--reps`` times (noise and sampling are OS-seeded, so repetitions
differ; the public model is the cached one). Rows are appended to ``benchmarks/utility.json`` as
they finish; ``--report`` turns that file into ``UTILITY.md``'s table and ``utility.png``.

    python benchmarks/bench_utility.py --task cls --reps 3
    python benchmarks/bench_utility.py --report
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import ultralytics_dp  # noqa: F401  (import hooks before Ultralytics)
from ultralytics import YOLO

from ultralytics_dp import DifferentialPrivacy
from ultralytics_dp.datasets.embedded import cache_dir
from ultralytics_dp.datasets.public_weights import _VERSION, RECIPES, pretrained
from ultralytics_dp.integration.recipe import DEFAULTS

HERE = Path(__file__).parent
RESULTS = HERE / "utility.json"
TASKS = {  # task -> (private data, public data, architecture, imgsz, metric)
    "cls": ("digits-cls", "digits-public-cls", "yolo26n-cls.yaml", 32, "top-1"),
    "det": ("digits-det", "digits-public-det", "yolo26n.yaml", 128, "mAP50"),
    "persons": ("digits-persons-cls", "digits-public-cls", "yolo26n-cls.yaml", 32, "top-1"),
}
PER_PERSON = "public -> private per person"
# public pretraining epochs where they differ from the recipe's (make demo pretrains DEMO_DETECTOR instead)
PUBLIC_EPOCHS = {"det": 60}
USER_EPOCHS = 8  # --public user: "a few epochs" with every other Ultralytics default


def user_pretrained(task: str, seed: int = 0) -> Path:
    """A public model trained as a user would: ``YOLO(yaml).train(data=public, epochs=8,
    imgsz=the private data's)`` with every other Ultralytics default (augmentation, mirroring,
    optimizer 'auto', warm-up, batch 16, seed 0 unless ``seed``); cached beside the package's
    public models."""
    _, public, architecture, imgsz, _ = TASKS[task]
    drawn = f"-s{seed}" if seed else ""
    final = cache_dir() / "pretrained" / f"user-{Path(architecture).stem}-{public}-e{USER_EPOCHS}-i{imgsz}{drawn}.pt"
    if not final.exists():
        with tempfile.TemporaryDirectory() as project:
            YOLO(architecture).train(data=public, epochs=USER_EPOCHS, imgsz=imgsz, seed=seed, plots=False,
                                     project=project, name="run")
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(project) / "run" / "weights" / "last.pt", final)
    return final


def _metric(task: str, metrics: object) -> float:
    return float(metrics.box.map50 if task == "det" else metrics.top1)


def run(task: str, recipe: str, epsilon: float | None, epochs: int, augmult: int = 1, *,
        data: str | None = None, ledger: str | bool = False, public_epochs: int | None = None, cap: int | None = None,
        user_public: bool = False, user_seed: int = 0, **train_args) -> dict:
    """One training (or evaluation) as a user would write it; returns a result row. ``data``
    replaces the task's dataset (a tuning split), ``ledger`` records the private runs,
    ``public_epochs`` replaces the benchmark's public pretraining epochs, ``cap`` is a per-person
    run's ``max_images_per_person``, ``user_public`` starts from ``user_pretrained`` instead (trained
    with Ultralytics' seed ``user_seed``),
    ``train_args`` go to ``model.train`` over the DP defaults."""
    default_data, public, architecture, imgsz, _ = TASKS[task]
    start = time.perf_counter()
    common = dict(data=data or default_data, imgsz=imgsz, workers=0, verbose=False, plots=False)
    scratch = recipe.startswith("private from scratch")
    public_epochs = public_epochs or PUBLIC_EPOCHS.get(task, RECIPES[public][1]["epochs"])
    row = {"task": task, "recipe": recipe + (f", max {cap} images" if cap else ""), "epsilon": epsilon,
           "augmult": augmult, "epochs": epochs,
           "public": None if scratch else f"user e{USER_EPOCHS}" + (f" s{user_seed}" if user_seed else "")
           if user_public else f"v{_VERSION} e{public_epochs}"}
    persons = {"persons": "persons.csv"} if task == "persons" else {}
    if recipe == PER_PERSON:
        persons.update(privacy_unit="person", **({"max_images_per_person": cap} if cap else {}))
    weights = architecture if scratch else user_pretrained(task, user_seed) if user_public else pretrained(public, epochs=public_epochs)
    if recipe == "public only":
        metrics = YOLO(weights).val(**common, **train_args)
    else:
        model = YOLO(weights)
        dp = None
        if epsilon is not None:
            dp = DifferentialPrivacy(epsilon=epsilon, delta=1e-5, augmult=augmult, ledger=ledger, **persons).attach(model)
        with tempfile.TemporaryDirectory() as project:
            extra = {} if dp else {"fliplr": 0.0}  # non-private: Ultralytics' defaults, digits not mirrored
            metrics = model.train(**common, **extra, **train_args, epochs=epochs, project=project, name="run")
        if dp:
            row.update(spent=round(dp.epsilon, 4), steps=dp.steps, sigma=round(dp.noise_multiplier, 4),
                       lr0=model.trainer.args.lr0, batch=model.trainer.args.batch)
            if dp.person_epsilon():
                row.update(person_epsilon=round(dp.person_epsilon()["epsilon"], 2))
    row.update(metric=round(_metric(task, metrics), 4), seconds=round(time.perf_counter() - start, 1))
    return row


def plan(task: str, epsilons: list[float], augmults: list[int], reps: int, epochs: int, caps: list[int]
         ) -> list[tuple]:
    runs = [("public only", None, epochs, 1, None)]
    if task == "persons":
        middle = sorted(epsilons)[len(epsilons) // 2]
        for _ in range(reps):
            runs += [(recipe, e, epochs, 1, None) for e in epsilons for recipe in ("public -> private", PER_PERSON)]
            runs += [(PER_PERSON, middle, epochs, 1, cap) for cap in caps]
        return runs
    for _ in range(reps):
        runs += [("public -> private", e, epochs, k, None) for e in epsilons for k in augmults]
        runs += [("public -> non-private", None, epochs, 1, None)]
        runs += [("private from scratch", e, epochs, 1, None) for e in epsilons]
    return runs


def report() -> None:
    """UTILITY.md's table (mean +- std over repetitions) and utility.png from utility.json."""
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        epochs = "—" if r["recipe"] == "public only" else r["epochs"]
        # rows from before the field was recorded used public model version 1 (or none, from scratch)
        public = r.get("public", None if r["recipe"].startswith("private from scratch") else "v1") or "—"
        groups.setdefault((r["task"], public, r["recipe"], r["augmult"], epochs, r["epsilon"]), []).append(r)
    lines = ["| task | public model | recipe | augmult | epochs | epsilon | metric | mean | std | runs | seconds/run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (task, public, recipe, k, epochs, eps), rs in sorted(groups.items(), key=lambda kv: (
            *kv[0][:5], kv[0][5] or float("inf"))):
        values = [r["metric"] for r in rs]
        std = f"{statistics.stdev(values):.4f}" if len(values) > 1 else "—"
        label = "∞" if eps is None and recipe != "public only" else ("—" if eps is None else f"{eps:g}")
        lines.append(f"| {task} | {public} | {recipe} | {k} | {epochs} | {label} | {TASKS[task][4]} | "
                     f"{statistics.mean(values):.4f} | {std} | {len(values)} | "
                     f"{statistics.mean(r['seconds'] for r in rs):.0f} |")
    print("\n".join(lines))

    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        # the chart shows the newest public model's rows (and from scratch); the table keeps the older ones
        latest = max((key[1] for key in groups if key[0] == task and key[1].startswith("v")), default="—",
                     key=lambda v: (int(v[1:].split()[0]), v))  # "v4 e60" after "v4", "v10" after "v4"
        shown = {key: rs for key, rs in groups.items() if key[0] == task and key[1] in (latest, "—")}
        for (t, public, recipe, k, _, eps), rs in shown.items():
            mean = statistics.mean(r["metric"] for r in rs)
            if eps is None:
                ax.axhline(mean, ls="--" if recipe == "public -> non-private" else ":",
                           color="k" if recipe == "public -> non-private" else "grey",
                           label=recipe + (" (ε=∞)" if recipe != "public only" else ""))
        curves: dict[tuple, list] = {}
        for (t, public, recipe, k, epochs, eps), rs in shown.items():
            if eps is not None:
                values = [r["metric"] for r in rs]
                curves.setdefault((recipe, k, epochs), []).append(
                    (eps, statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0))
        for (recipe, k, epochs), points in sorted(curves.items()):
            points.sort()
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                        capsize=3, label=recipe + (f", augmult={k}" if k > 1 else "") + f", {epochs} epochs")
        ax.set_xscale("log")
        ticks = sorted({key[5] for key in shown if key[5] is not None})
        ax.set_xticks(ticks, [f"{e:g}" for e in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("ε (δ = 1e-5)")
        ax.set_ylabel(f"{TASKS[task][0]} {TASKS[task][4]} (public model {latest})")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(HERE / "utility.png", dpi=120)
    print(f"wrote {HERE / 'utility.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", nargs="+", choices=sorted(TASKS), default=["cls"])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 3.0, 8.0])
    parser.add_argument("--augmult", nargs="+", type=int, default=[1], help="augmult values of the private rows")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"][0], help="private epochs (the DP default)")
    parser.add_argument("--only", nargs="+", default=None, help="recipes to run (default: all)")
    parser.add_argument("--caps", nargs="*", type=int, default=[], help="--task persons: max_images_per_person rows")
    parser.add_argument("--public", choices=["package", "user"], default="package",
                        help="the package's public pretraining recipe, or Ultralytics' defaults for 8 epochs")
    parser.add_argument("--user-seed", type=int, default=0, help="--public user: Ultralytics' seed of its training")
    parser.add_argument("--report", action="store_true", help="only write the table and the chart")
    args = parser.parse_args()
    if args.report:
        report()
        return
    print(f"# {date.today()} on {platform.machine()}, {platform.processor() or 'cpu'}; "
          f"public recipes: {json.dumps(RECIPES)}")
    for task in args.task:
        for recipe, eps, epochs, k, cap in plan(task, args.epsilons, args.augmult, args.reps, args.epochs, args.caps):
            if args.only and recipe not in args.only:
                continue
            row = run(task, recipe, eps, epochs, k, cap=cap, user_public=args.public == "user",
                      user_seed=args.user_seed)
            print(json.dumps(row), flush=True)
            with RESULTS.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
