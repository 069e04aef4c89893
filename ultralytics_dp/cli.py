"""``yolo-dp``: the ``yolo`` command line with differential privacy.

Usage: ``yolo-dp MODE key=value ...``. Unknown modes and keys go to Ultralytics unchanged.
Bad input gives a one-line error on stderr and exit code 2.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable

from . import __version__

HELP = f"""yolo-dp {__version__}: differentially private training for Ultralytics YOLO

Usage:
  yolo-dp train epsilon=EPS [delta=1e-5] [max_grad_norm=1.0] [noise_multiplier=SIGMA] [physical_batch=B]
          [dataset_budget=EPS] [ledger=PATH] [secure_mode=true] [grad_method=auto|ghost|vmap]
          model=yolo26n.yaml data=digits-det epochs=10 imgsz=128 batch=64 ...
      private training; every key but the DP keys goes to Ultralytics unchanged,
      batch is the expected (Poisson) batch size
  yolo-dp ledger [--json] [ledger=PATH]
      every dataset trained on privately, its runs and the epsilon they add up to
  yolo-dp report path/to/weights.pt
      print the privacy guarantee recorded in a checkpoint
  yolo-dp robustness model=a.pt[,b.pt] data=D noise=0,0.05,0.1,0.2 [seed=0] [out=runs/robustness] ...
      validation metric against Gaussian input noise (this is not differential privacy);
      writes robustness.csv and robustness.png
  yolo-dp val|predict|export ...
      passed to Ultralytics' `yolo` unchanged (data=digits-det/digits-cls resolve)
  yolo-dp privacy n=N batch=B epochs=E [delta=1e-5] (noise=SIGMA | epsilon=EPS)
      plan a run without training: epsilon for a noise multiplier, or the noise for an epsilon
  yolo-dp help | version
"""


class UsageError(ValueError):
    """Bad command-line input: reported in one line, exit code 2."""


def parse_pairs(args: list[str]) -> dict[str, str]:
    """``key=value`` tokens to a dict (values stay strings)."""
    out = {}
    for token in args:
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise UsageError(f"expected key=value, got {token!r}")
        out[key] = value
    return out


def _number(pairs: dict[str, str], key: str, kind: Callable[[str], object] = float, default: object = None):
    if key not in pairs:
        if default is None:
            raise UsageError(f"missing {key}=")
        return default
    try:
        return kind(pairs[key])
    except ValueError:
        name = {"flag": "true/false"}.get(kind.__name__, kind.__name__)
        raise UsageError(f"{key} must be a {name}, got {pairs[key]!r}") from None


def privacy(args: list[str]) -> int:
    """``yolo-dp privacy``: like TF Privacy's compute_dp_sgd_privacy, for a planned run."""
    from .accounting import compute_epsilon, get_noise_multiplier, plan

    pairs = parse_pairs(args)
    unknown = set(pairs) - {"n", "batch", "epochs", "delta", "noise", "epsilon"}
    if unknown:
        raise UsageError(f"unknown key(s) {', '.join(sorted(unknown))} for 'privacy'")
    if ("noise" in pairs) == ("epsilon" in pairs):
        raise UsageError("give exactly one of noise= (to get epsilon) or epsilon= (to get the noise)")
    n = _number(pairs, "n", int)
    batch = _number(pairs, "batch")
    epochs = _number(pairs, "epochs")
    delta = _number(pairs, "delta", default=1e-5)
    q, steps = plan(num_samples=n, batch_size=batch, epochs=epochs)
    print(f"dataset n={n}, expected batch {batch:g} -> sampling rate q={q:.6g}, {steps} steps, delta={delta:g}")
    if "noise" in pairs:
        sigma = _number(pairs, "noise")
        eps = compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta)
        print(f"noise_multiplier={sigma:g} spends epsilon={eps:.4f} (PRV upper bound)")
    else:
        target = _number(pairs, "epsilon")
        sigma = get_noise_multiplier(target_epsilon=target, delta=delta, sample_rate=q, steps=steps)
        eps = compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta)
        print(f"epsilon={target:g} needs noise_multiplier={sigma:.4f} (spends {eps:.4f})")
    return 0


def flag(value: str) -> bool:
    """'true'/'false' (any case), '1'/'0'."""
    lowered = value.strip().lower()
    if lowered not in {"true", "false", "1", "0"}:
        raise ValueError(f"expected true or false, got {value!r}")
    return lowered in {"true", "1"}


DP_KEYS = {"epsilon": float, "delta": float, "max_grad_norm": float, "noise_multiplier": float,
           "physical_batch": int, "dataset_budget": float, "ledger": str, "secure_mode": flag, "grad_method": str}


def train(args: list[str]) -> int:
    """``yolo-dp train``: DP keys are taken out, the rest goes to ``YOLO(model).train(...)``."""
    from ultralytics.utils import checks  # noqa: F401  (imports Ultralytics after the offline switches)

    from .adapter import DifferentialPrivacy, summary_line

    pairs = parse_pairs(args)
    if "epsilon" not in pairs:
        raise UsageError("epsilon= is required for private training (the privacy budget, e.g. epsilon=8)")
    dp_kwargs = {k: _number(pairs, k, kind) for k, kind in DP_KEYS.items() if k in pairs}
    overrides = {k: _smart(v) for k, v in pairs.items() if k not in DP_KEYS}
    from ultralytics import YOLO

    model = YOLO(overrides.pop("model", "yolo26n.yaml"))
    dp = DifferentialPrivacy(**dp_kwargs).attach(model)
    model.train(**overrides)
    print(summary_line(dp.info()))
    return 0


def _smart(value: str) -> object:
    """Ultralytics' own conversion of CLI strings ('8' -> 8, 'True' -> True, ...)."""
    from ultralytics.cfg import smart_value

    return smart_value(value)


def ledger(args: list[str]) -> int:
    """``yolo-dp ledger [--json] [ledger=PATH]``: datasets, runs and total epsilon per dataset."""
    import json

    from .ledger import Ledger

    as_json = "--json" in args
    pairs = parse_pairs([a for a in args if a != "--json"])
    unknown = set(pairs) - {"ledger"}
    if unknown:
        raise UsageError(f"unknown key(s) {', '.join(sorted(unknown))} for 'ledger'")
    book = Ledger(pairs.get("ledger"))
    summary = book.summary()
    if as_json:
        print(json.dumps({"ledger": str(book.path), "datasets": summary}, indent=2))
        return 0
    print(f"ledger {book.path}: {len(summary)} dataset(s)")
    for ds in summary:
        budget = f", budget {ds['budget']:g}" if ds["budget"] else ""
        print(f"dataset {ds['fingerprint'][:12]} ({ds['description']}, N={ds['num_samples']}): "
              f"epsilon={ds['epsilon']:.4f} at delta={ds['delta']:g}{budget}, {len(ds['runs'])} run(s)")
        for run in ds["runs"]:
            print(f"  run {run['id']}: {run['steps']} steps, noise_multiplier={run['noise_multiplier']:.4f}, "
                  f"q={run['sample_rate']:.5g}, target epsilon={run['target_epsilon']:g}  {run['name']}")
    return 0


def report(args: list[str]) -> int:
    """``yolo-dp report weights.pt``: the guarantee stored in a checkpoint."""
    from .adapter import DifferentialPrivacy

    if len(args) != 1:
        raise UsageError("usage: yolo-dp report path/to/weights.pt")
    if not Path(args[0]).is_file():
        raise UsageError(f"no such checkpoint: {args[0]}")
    DifferentialPrivacy.report(args[0])
    return 0


def passthrough(mode: str) -> Callable[[list[str]], int]:
    """Hand ``yolo MODE ...`` to Ultralytics, resolving the embedded dataset names."""

    def run(args: list[str]) -> int:
        from ultralytics.cfg import entrypoint

        from . import datasets, offline

        offline.patch_ultralytics()
        resolved = []
        for token in args:
            key, sep, value = token.partition("=")
            resolved.append(f"{key}={datasets.resolve(value)}" if sep and key == "data" else token)
        entrypoint(" ".join(["yolo", mode, *resolved]))
        return 0

    return run


def robustness(args: list[str]) -> int:
    """``yolo-dp robustness``: validate each model at each input-noise level, write CSV + PNG."""
    from .perturb import evaluate, write_report

    pairs = parse_pairs(args)
    for key in ("model", "data", "noise"):
        if not pairs.get(key):
            raise UsageError(f"missing {key}=")
    try:
        levels = [float(v) for v in pairs.pop("noise").split(",")]
    except ValueError:
        raise UsageError("noise must be a comma-separated list of numbers, e.g. noise=0,0.05,0.1") from None
    if any(not math.isfinite(v) or v < 0 for v in levels):
        raise UsageError(f"noise levels must be finite and >= 0, got {levels}")
    models = pairs.pop("model").split(",")
    data = pairs.pop("data")
    seed = _number(pairs, "seed", int, default=0)
    pairs.pop("seed", None)
    out = pairs.pop("out", "runs/robustness")
    rows = evaluate(models, data, levels, seed=seed, **{k: _smart(v) for k, v in pairs.items()})
    csv_path, png_path = write_report(rows, out)
    for row in rows:
        print(f"{row['model']}  noise={row['noise']:g}  {row['metric']}={row['value']:.4f}")
    print(f"wrote {csv_path} and {png_path}")
    return 0


MODES: dict[str, Callable[[list[str]], int]] = {
    "robustness": robustness,
    "privacy": privacy,
    "train": train,
    "report": report,
    "ledger": ledger,
    **{mode: passthrough(mode) for mode in ("val", "predict", "export")},
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``yolo-dp`` console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"help", "-h", "--help"}:
        print(HELP)
        return 0
    if args[0] in {"version", "--version"}:
        print(__version__)
        return 0
    mode = MODES.get(args[0])
    if mode is None:
        print(f"yolo-dp: unknown mode {args[0]!r}; run 'yolo-dp help'", file=sys.stderr)
        return 2
    try:
        return mode(args[1:])
    except ValueError as err:  # UsageError and the library's own input checks
        print(f"yolo-dp {args[0]}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
