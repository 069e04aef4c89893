"""``yolo-dp``: the ``yolo`` command line with differential privacy.

``yolo-dp train`` takes every Ultralytics training key, parsed by Ultralytics' own rules
(``merge_equals_args``, ``parse_key_value_pair``, ``check_dict_alignment`` with its "Similar
arguments are ..." suggestions, ``check_cfg`` type checks), plus the DP keys of
``config.DPConfig``. ``val``, ``predict`` and ``export`` go to Ultralytics unchanged. Bad input
gives one line on stderr and exit code 2. ``help`` and ``version`` import neither torch nor
Ultralytics; ``ledger`` creates nothing, ``report`` only its ``privacy.html``. ``audit`` runs one
private training with canaries (``auditing``) and exits with 1 when the mechanism fails it.
"""

from __future__ import annotations

import difflib
import math
import pickle
import sys
from pathlib import Path
from typing import Any, Callable

from . import checks
from .config import SETTINGS, DPConfig, check_setting, defaults, usage
from .console import one_line
from .version import __version__

HELP = f"""yolo-dp {__version__}: differentially private training for Ultralytics YOLO

Usage:
  yolo-dp train {usage()}
          model=yolo26n.yaml data=digits-det epochs=10 imgsz=128 batch=64 ...
      private training (the stock `yolo train ... epsilon=...` does the same); every other key is
      an Ultralytics training key, batch is the expected (Poisson) batch size
  yolo-dp ledger [--json] [ledger=PATH] [records=FOLDER] [delta=D]
      every training image's and person's epsilon (the worst, a histogram), each dataset version and its runs;
      with records=, the epsilon of the images in FOLDER (the worst, and how many are new)
  yolo-dp report PATH [out=FILE] [delta=D]
      PATH a checkpoint or a run folder: print its guarantee and write the run's privacy.html;
      PATH a ledger: write its page (each record's epsilon, datasets, runs) to out= (privacy.html)
  yolo-dp audit epsilon=EPS [model=yolo26n-cls.yaml] [data=digits-cls] [canaries=1000]
          [kind=gradient|input] [confidence=0.95] + DP and Ultralytics training keys
      one private run with canaries: an empirical lower bound on epsilon (Steinke et al. 2023);
      writes audit.json and privacy.html, exit code 1 if the bound exceeds the claimed epsilon
  yolo-dp robustness model=a.pt[,b.pt] data=D noise=0,0.05,0.1,0.2 [seed=0] [out=runs/robustness] ...
      validation metric against Gaussian input noise (this is not differential privacy);
      writes robustness.csv and robustness.png
  yolo-dp val|predict|export ...
      passed to Ultralytics' `yolo` unchanged (data=digits-det/digits-cls resolve)
  yolo-dp privacy n=N batch=B epochs=E [delta=1e-5] (noise=SIGMA | epsilon=EPS)
      plan a run without training: epsilon for a noise multiplier, or the noise for an epsilon
  yolo-dp help | version

DP keys:
""" + "\n".join(f"  {k:<17}{f.metadata['help']}" for k, f in SETTINGS.items())


class UsageError(ValueError):
    """Bad command-line input: reported in one line, exit code 2."""


def parse_pairs(args: list[str], allowed: set[str], mode: str) -> dict[str, str]:
    """``key=value`` tokens of a yolo-dp mode (values stay strings); an unknown key gets the
    closest allowed ones, as Ultralytics does."""
    out = {}
    for token in args:
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise UsageError(f"expected key=value, got {token!r}")
        if key not in allowed:
            similar = difflib.get_close_matches(key, sorted(allowed))
            raise UsageError(f"'{key}' is not a valid key for '{mode}'."
                             + (f" Similar keys are i.e. {similar}." if similar else f" Valid keys: {sorted(allowed)}"))
        out[key] = value
    return out


def _number(pairs: dict[str, str], key: str, kind: Callable[[str], Any] = float, default: Any = None) -> Any:
    if key not in pairs:
        if default is None:
            raise UsageError(f"missing {key}=")
        return default
    try:
        return kind(pairs[key])
    except ValueError:
        raise UsageError(f"{key} must be a {kind.__name__}, got {pairs[key]!r}") from None


def privacy(args: list[str]) -> int:
    """``yolo-dp privacy``: like TF Privacy's compute_dp_sgd_privacy, for a planned run, with the
    same checks as ``train`` (the settings' own, delta < 1/N, batch <= N) before anything prints."""
    from .accounting import accountant
    from .accounting.pld import plan

    pairs = parse_pairs(args, {"n", "batch", "epochs", "delta", "noise", "epsilon"}, "privacy")
    if ("noise" in pairs) == ("epsilon" in pairs):
        raise UsageError("give exactly one of noise= (to get epsilon) or epsilon= (to get the noise)")
    n, batch, epochs = _number(pairs, "n", int), _number(pairs, "batch"), _number(pairs, "epochs")
    delta = _number(pairs, "delta", default=SETTINGS["delta"].default)
    sigma = _number(pairs, "noise") if "noise" in pairs else None
    target = _number(pairs, "epsilon") if "epsilon" in pairs else None
    for key, value in (("epsilon", target), ("delta", delta), ("noise_multiplier", sigma)):
        if value is not None:
            check_setting(key, value)
    q, steps = plan(num_samples=n, batch_size=batch, epochs=epochs)
    checks.delta("delta", delta, n)
    if sigma is None:
        sigma = accountant.noise_multiplier(target_epsilon=target, delta=delta, sample_rate=q, steps=steps)
    released = accountant.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta)
    eps, bounds = released.epsilon, ", ".join(f"{k} {v:.4f}" for k, v in released.by_accountant.items())
    print(f"dataset n={n}, expected batch {batch:g} -> sampling rate q={q:.6g}, {steps} steps, delta={delta:g}")
    if target is None:
        print(f"noise_multiplier={sigma:g} spends epsilon={eps:.4f} (the larger upper bound of {bounds})")
    else:
        print(f"epsilon={target:g} needs noise_multiplier={sigma:.4f} (spends {eps:.4f}: the larger upper bound of "
              f"{bounds})")
    return 0


def split_train_args(args: list[str]) -> tuple[DPConfig, dict[str, Any]]:
    """The DP settings and the Ultralytics training overrides of ``yolo-dp train ...``, each checked
    the way its owner checks it; a bad key or value is one UsageError line."""
    from ultralytics.cfg import DEFAULT_CFG_DICT, check_cfg, check_dict_alignment, merge_equals_args
    from ultralytics.cfg import parse_key_value_pair

    from .console import quiet_console  # Ultralytics logs its whole help before raising on a bad key

    dp, overrides = {}, {}
    for token in merge_equals_args(args):
        key, sep, value = token.partition("=")
        if not sep or not key or not value.strip():
            raise UsageError(f"expected key=value, got {token!r}")
        if key in SETTINGS:
            dp[key] = value
        else:
            k, v = parse_key_value_pair(token)
            overrides[k] = v
    if "cfg" in overrides:  # a cfg= file holds defaults, DP keys included; the command line wins
        from .integration.explicit import cfg_values

        path = Path(str(overrides.pop("cfg")))
        if not path.is_file():
            raise UsageError(f"cfg={path} does not exist")
        for key, value in cfg_values(str(path)).items():
            if key in SETTINGS:
                dp.setdefault(key, str(value))
            else:
                overrides.setdefault(key, value)
    if "epsilon" not in dp:
        raise UsageError("epsilon= is required for private training (the privacy budget, e.g. epsilon=8)")
    try:
        with quiet_console():
            check_dict_alignment({**DEFAULT_CFG_DICT, **defaults()}, overrides)
            check_cfg({k: v for k, v in overrides.items() if k != "model"})
    except (SyntaxError, TypeError) as err:
        raise UsageError(one_line(err)) from None
    return DPConfig.from_strings(dp), overrides


def train(args: list[str]) -> int:
    """``yolo-dp train``: DP keys to ``DifferentialPrivacy``, the rest to ``YOLO(model).train(...)``."""
    config, overrides = split_train_args(args)
    from ultralytics import YOLO

    from .integration.adapter import DifferentialPrivacy

    model = YOLO(overrides.pop("model", "yolo26n.yaml"))
    DifferentialPrivacy(config).attach(model)
    model.train(**overrides)  # the guarantee's summary line is logged at the end of training
    return 0


def ledger(args: list[str]) -> int:
    """``yolo-dp ledger [--json] [ledger=PATH] [records=FOLDER] [delta=D]``: per-record epsilon (at D,
    by default the smallest delta of the runs), versions, runs."""
    import json

    from .accounting.ledger import Ledger

    as_json = "--json" in args
    pairs = parse_pairs([a for a in args if a != "--json"], {"ledger", "records", "delta"}, "ledger")
    book = Ledger(pairs.get("ledger"), create=False)
    delta = _number(pairs, "delta") if "delta" in pairs else None
    if delta is not None:
        check_setting("delta", delta)
    if "records" in pairs:
        from ultralytics.data.utils import IMG_FORMATS

        folder = Path(pairs["records"])
        if not folder.is_dir():
            raise UsageError(f"records= must be a folder of images, got {folder}")
        images = sorted(p for p in folder.rglob("*") if p.suffix[1:].lower() in IMG_FORMATS)
        from .integration.training_set import identify_all

        report = {"records": str(folder), "images": len(images), **book.epsilons(identify_all(images), delta)}
    else:
        report = {"ledger": str(book.path), **book.summary(delta)}
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    head = f"{report['images']} images in {folder}" if "records" in pairs else f"ledger {book.path}"
    if report["delta"] is None:
        at = "any delta (no run recorded)"
    else:
        at = f"delta={report['delta']:g}" + ("" if delta is not None else " (the smallest of the runs' deltas; delta= "
                                                                          "for another)")
    print(f"{head}: worst epsilon={report['worst_epsilon']:.4f} per image at {at}, "
          f"{report['new_records']} never trained on")
    for row in report["histogram"]:
        print(f"  epsilon={row['epsilon']:.4f}: {row['records']} image(s)")
    if report["legacy_epsilon"]:
        print(f"  every image, known or not, has spent at least epsilon={report['legacy_epsilon']:.4f} (legacy runs)")
    if report["records_of_persons"]:
        print(f"  {report['records_of_persons']} image(s) belong to persons: accounted per person")
    people = report.get("per_person")
    if people and people["persons"]:
        print(f"{people['persons']} person(s): worst epsilon={people['worst_epsilon']:.4f} per person at {at}")
        for row in people["histogram"]:
            print(f"  epsilon={row['epsilon']:.4f}: {row['persons']} person(s)")
    for ds in report.get("datasets", []):
        persons = (f", {ds['persons']} person(s): worst epsilon={ds['worst_person_epsilon']:.4f} per person"
                   if ds["persons"] else "")
        print(f"dataset version {ds['id']} ({ds['description']}, N={ds['num_samples']}): worst epsilon="
              f"{ds['worst_epsilon']:.4f} per image{persons}, {len(ds['runs'])} run(s)")
        for run in ds["runs"]:
            budget = f", budget {run['budget']:g}" if run["budget"] is not None else ""
            print(f"  run {run['id']} per {run['unit']}: {run['steps']} steps, noise_multiplier={run['noise_multiplier']:.4f}, "
                  f"q={run['sample_rate']:.5g}, target epsilon={run['settings']['epsilon']:g}{budget}  {run['name']}")
    for run in report.get("legacy_runs", []):
        print(f"legacy run {run['id']} (schema 1/2, counted for every image): {run['steps']} steps  {run['name']}")
    return 0


def report(args: list[str]) -> int:
    """``yolo-dp report PATH``: a checkpoint's or run's guarantee and page, or a ledger's page."""
    from .integration import report_page
    from .integration.checkpoint import read_dp_entry, summary_line

    if not args or ("=" in args[0] and not Path(args[0]).exists()):
        raise UsageError("usage: yolo-dp report path/to/weights.pt|run-folder|ledger.sqlite [out=FILE] [delta=D]")
    path = Path(args[0])
    pairs = parse_pairs(args[1:], {"out", "delta"}, "report")
    is_ledger = path.is_file() and path.read_bytes()[:16] == b"SQLite format 3\x00"
    if pairs and not is_ledger:
        raise UsageError(f"{' and '.join(k + '=' for k in pairs)} are for a ledger's page; a run's page is written "
                         "into its folder at the run's own delta")
    if is_ledger:
        delta = _number(pairs, "delta") if "delta" in pairs else None
        if delta is not None:
            check_setting("delta", delta)
        page = report_page.write_ledger_page(path, pairs.get("out", report_page.PAGE), delta)
    elif path.exists():
        checkpoint = report_page.run_checkpoint(path) if path.is_dir() else path
        print(summary_line(read_dp_entry(checkpoint)))
        page = report_page.write_checkpoint_page(checkpoint)
    else:
        raise UsageError(f"no such checkpoint, run folder or ledger: {path}")
    print(f"wrote {page}")
    return 0


AUDIT_KEYS = {"canaries": int, "kind": str, "confidence": float}


def audit(args: list[str]) -> int:
    """``yolo-dp audit ...``: one audited private run; exit code 1 when epsilon_lb > the claim."""
    own = {t.partition("=")[0]: t.partition("=")[2] for t in args if t.partition("=")[0] in AUDIT_KEYS}
    config, overrides = split_train_args([t for t in args if t.partition("=")[0] not in AUDIT_KEYS])
    options = {key: _number(own, key, kind) for key, kind in AUDIT_KEYS.items() if key in own}
    from .auditing.run import audit as run_audit

    given = {t.partition("=")[0] for t in args}  # an explicit default counts (ledger= on embedded data)
    settings = {k: getattr(config, k) for k in SETTINGS if k in given or getattr(config, k) != SETTINGS[k].default}
    result = run_audit(overrides.pop("model", "yolo26n-cls.yaml"), overrides.pop("data", "digits-cls"),
                       **options, **settings, **overrides)
    return 0 if result.passed else 1


def passthrough(mode: str) -> Callable[[list[str]], int]:
    """Hand ``yolo MODE ...`` to Ultralytics (importing this package made its dataset checks accept
    the embedded names)."""

    def run(args: list[str]) -> int:
        from ultralytics.cfg import entrypoint

        from .integration import offline

        offline.patch_ultralytics()
        entrypoint(" ".join(["yolo", mode, *args]))
        return 0

    return run


def robustness(args: list[str]) -> int:
    """``yolo-dp robustness``: validate each model at each input-noise level, write CSV + PNG."""
    from .tools.robustness import evaluate, write_report

    pairs = {}
    for token in args:
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise UsageError(f"expected key=value, got {token!r}")
        pairs[key] = value
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
    from ultralytics.cfg import smart_value

    rows = evaluate(models, data, levels, seed=seed, **{k: smart_value(v) for k, v in pairs.items()})
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
    "audit": audit,
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
    except (ValueError, OSError, SyntaxError, AssertionError, pickle.UnpicklingError) as err:
        # UsageError, the library's own input checks, and Ultralytics' refusals of missing or bad files
        print(f"yolo-dp {args[0]}: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
