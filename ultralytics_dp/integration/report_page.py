"""``privacy.html``: one self-contained page a privacy officer can read, for a run or a ledger.

A run's page (``write_run_page``, at the end of every private run and by ``yolo-dp report``) states
the guarantee in one plain sentence, the unit, epsilon, delta, sigma, q, steps, C, both accountants'
values, epsilon against steps (planned, spent, budget: ``privacy.png``), what is public and what is
not covered, the DP settings and the Ultralytics arguments that shape the guarantee or the model,
and the audit's result when the run was audited (``audit.json``). A ledger's page
(``write_ledger_page``) shows every record's epsilon as a histogram, the worst record, each dataset
version and its runs.

Privacy assumptions relied on here: everything shown is already released beside the page (the
checkpoint's ``dp`` entry, ``args.yaml``, ``privacy.png``) or is a ledger aggregate the owner reads
locally; a page never shows a record's hash, a person id or the ledger's run fingerprints. The page
loads nothing: CSS inline, images as data URIs, no script.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable

from ..accounting.pld import epsilon_curve
from ..version import __version__
from .checkpoint import read_dp_entry
from .privacy_plot import plot_privacy

PAGE = "privacy.html"
# what the guarantee treats as public, and what it does not cover (the README lists the same; a test compares)
PUBLIC = (
    "the number of training records N and the sampling rate q",
    "the validation set (metrics and the choice of best.pt use it)",
    "the model architecture, the public starting weights and every training argument",
    "the DP settings: epsilon, delta, the noise multiplier, the clipping bound C",
)
NOT_COVERED = (
    "clocks: the time column of results.csv, the checkpoints' date field, the total training time and the "
    "progress bar's speed depend on the Poisson batch sizes",
    "floating-point attacks on Gaussian sampling are only mitigated (secure_mode)",
    "each private run spends privacy, hyper-parameter searches included (the ledger adds them up per record)",
    "with privacy_unit=image, a person with several images is protected only as a group",
)
# Ultralytics arguments shown on a run's page: those that decide the steps, the model or what is trained
ARGS_SHOWN = ("model", "data", "epochs", "batch", "imgsz", "optimizer", "lr0", "lrf", "momentum", "weight_decay",
              "warmup_epochs", "cos_lr", "freeze", "augment", "mosaic", "mixup", "copy_paste", "amp", "device", "seed")
_ACCOUNTANT_NAMES = {"prv_accountant": "prv-accountant (Microsoft)", "pld": "own PLD accountant"}

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2430;margin:0;background:#f5f6f8}
main{max-width:980px;margin:0 auto;padding:28px 32px 48px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #dde1e7;padding-bottom:4px}
.sub{color:#5b6575;margin:0 0 18px}
.claim{background:#fff;border-left:5px solid #2f6fdf;padding:14px 18px;border-radius:4px;font-size:16px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(140px,1fr));gap:10px;margin:16px 0}
.card{background:#fff;border-radius:6px;padding:10px 14px;box-shadow:0 1px 2px #0001}
.card b{display:block;font-size:20px}.card span{color:#5b6575;font-size:13px}
table{border-collapse:collapse;background:#fff;width:100%;font-size:14px;margin-bottom:6px}
td,th{padding:5px 10px;border-bottom:1px solid #eceef2;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:18px}
img{max-width:100%;background:#fff;border-radius:6px}
.pass{color:#17803d;font-weight:600}.fail{color:#b42318;font-weight:600}
ul{margin:4px 0 0;padding-left:20px}
footer{color:#7a8494;font-size:12px;margin-top:30px}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _png(data: bytes | None, alt: str) -> str:
    if not data:
        return f"<p class=sub>{_e(alt)}: not drawn (the run composed several noise levels or took no step)</p>"
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _table(rows: Iterable[tuple[Any, Any]], head: tuple[str, str] | None = None) -> str:
    top = f"<tr><th>{_e(head[0])}</th><th>{_e(head[1])}</th></tr>" if head else ""
    return "<table>" + top + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows) + "</table>"


def _cards(items: Iterable[tuple[str, str]]) -> str:
    return '<div class="cards">' + "".join(f'<div class="card"><b>{_e(v)}</b><span>{_e(k)}</span></div>'
                                           for k, v in items) + "</div>"


def _page(title: str, subtitle: str, body: str) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width,initial-scale=1"><title>{_e(title)}</title><style>{_CSS}</style></head>'
            f"<body><main><h1>{_e(title)}</h1><p class=sub>{_e(subtitle)}</p>{body}"
            f"<footer>written by ultralytics-dp {_e(__version__)}; this page loads nothing from the network"
            "</footer></main></body></html>")


def _lists() -> str:
    return ('<div class="cols"><div><h2>Public</h2><ul>' + "".join(f"<li>{_e(p)}</li>" for p in PUBLIC)
            + '</ul></div><div><h2>Not covered</h2><ul>' + "".join(f"<li>{_e(p)}</li>" for p in NOT_COVERED)
            + "</ul></div></div>")


def guarantee_sentence(entry: dict[str, Any]) -> str:
    """The run's guarantee in plain words, from its ``dp`` entry."""
    eps, delta = entry["epsilon"], entry["settings"]["delta"]
    who = ("one person (all of their training images together)" if entry["privacy_unit"] == "person"
           else "one training image (with all its labels)")
    return (f"For any {who}, everything this run released (weights, checkpoints, metrics, plots) is almost equally "
            f"likely whether or not it was in the training set: no outcome becomes more than e^{eps:.3g} = "
            f"{math.exp(eps):.3g} times more likely, except with probability {delta:g} "
            f"(epsilon = {eps:.4g}, delta = {delta:g}).")


def _audit_section(audit: dict[str, Any] | None) -> str:
    if audit is None:
        return "<h2>Empirical audit</h2><p class=sub>Not audited (yolo-dp audit runs one).</p>"
    verdict = ('<span class="pass">passed</span>' if audit["passed"]
               else '<span class="fail">FAILED: the lower bound exceeds the claim</span>')
    rows = [("canaries", f"{audit['kind']} ({audit['canaries']}, {audit['included']} included)"),
            ("claimed epsilon", f"{audit['claimed_epsilon']:.4f}"),
            ("empirical lower bound epsilon_lb", f"{audit['epsilon_lb']:.4f} at {audit['confidence']:.0%} confidence"),
            ("guesses", f"{audit['correct']} correct of {audit['guesses']}")]
    return (f"<h2>Empirical audit: {verdict}</h2>" + _table(rows)
            + "<p class=sub>A correct mechanism gives a lower bound at or below the claim; a one-run bound is loose "
              "by design (m canaries, one run), so it catches a broken mechanism rather than measuring a correct one."
              "</p>")


def run_page(entry: dict[str, Any], args: dict[str, Any], curve_png: bytes | None,
             audit: dict[str, Any] | None) -> str:
    """The HTML of a run's page from its ``dp`` entry, its arguments, its epsilon plot and audit."""
    settings = entry["settings"]
    unit = entry["privacy_unit"]
    cards = [("epsilon spent", f"{entry['epsilon']:.4g}"), ("delta", f"{settings['delta']:g}"),
             ("privacy unit", unit), ("noise multiplier sigma", f"{entry['noise_multiplier']:.4g}"),
             ("sampling rate q", f"{entry['sample_rate']:.4g}"), ("steps", entry["steps"]),
             ("clipping bound C", f"{settings['max_grad_norm']:g}"), (f"N ({unit}s)", entry.get("num_samples"))]
    accountants = [(_ACCOUNTANT_NAMES.get(k, k), f"{v:.6g}") for k, v in entry.get("epsilon_by_accountant", {}).items()]
    accountants.append(("released (the larger)", f"{entry['epsilon']:.6g}"))
    person = entry.get("person_epsilon")
    extra = (f"<p>Per person ({person['images_per_person']} images at most): epsilon &le; {person['epsilon']:.4g}.</p>"
             if person else "")
    stop = " Training stopped at the budget." if entry.get("stopped_by_budget") else ""
    body = (f'<p class="claim">{_e(guarantee_sentence(entry))}</p>{extra}' + _cards(cards)
            + f"<h2>Privacy spent against steps</h2>{_png(curve_png, 'epsilon against optimizer steps')}"
            + f"<p class=sub>Target epsilon {_e(settings.get('epsilon'))}.{_e(stop)}</p>"
            + "<h2>Accountants</h2>" + _table(accountants, ("accountant", f"epsilon at delta={settings['delta']:g}"))
            + f"<p class=sub>prv-accountant {_e(entry.get('prv_accountant_version'))}; both bound the same "
              "mechanism, the released epsilon is the larger.</p>"
            + _audit_section(audit) + _lists()
            + '<div class="cols"><div><h2>DP settings</h2>' + _table(sorted(settings.items()))
            + "</div><div><h2>Ultralytics arguments</h2>"
            + _table((k, args[k]) for k in ARGS_SHOWN if k in args) + "</div></div>")
    return _page("Privacy report", f"private training run, ultralytics-dp {entry.get('version', '')}", body)


def write_run_page(save_dir: str | Path, curve_png: bytes | None = None) -> Path:
    """Write ``privacy.html`` into a run's folder from what the run released there (``weights/last.pt``'s
    ``dp`` entry, ``args.yaml``, ``privacy.png`` unless ``curve_png`` is given, ``audit.json``)."""
    save_dir = Path(save_dir)
    checkpoint = next((p for p in (save_dir / "weights" / "last.pt", save_dir / "weights" / "best.pt") if p.exists()),
                      None)
    if checkpoint is None:
        raise ValueError(f"{save_dir} holds no weights/last.pt or weights/best.pt of a private run")
    return _write_checkpoint_page(checkpoint, save_dir, curve_png)


def write_checkpoint_page(checkpoint: str | Path, curve_png: bytes | None = None) -> Path:
    """A checkpoint's page, in its run's folder (the folder above ``weights/``) or beside it."""
    checkpoint = Path(checkpoint)
    folder = checkpoint.parent.parent if checkpoint.parent.name == "weights" else checkpoint.parent
    return _write_checkpoint_page(checkpoint, folder, curve_png)


def _write_checkpoint_page(checkpoint: Path, folder: Path, curve_png: bytes | None) -> Path:
    entry = read_dp_entry(checkpoint)
    args = _yaml(folder / "args.yaml")
    audit_file = folder / "audit.json"
    audit = json.loads(audit_file.read_text()) if audit_file.exists() else None
    try:
        if curve_png is None:
            curve_png = (folder / "privacy.png").read_bytes() if (folder / "privacy.png").exists() else _spent_png(entry)
        page = run_page(entry, args, curve_png, audit)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{checkpoint}'s dp entry lacks what the page states ({err}): it was written by another "
                         "ultralytics-dp version") from None
    out = folder / PAGE
    out.write_text(page, encoding="utf-8")
    return out


def _spent_png(entry: dict[str, Any]) -> bytes | None:
    """Epsilon against the steps taken, from the entry alone (no plan: a run folder without
    privacy.png); None for a run that composed several (sigma, q)."""
    history = entry.get("accountant_state", {}).get("history", [])
    if len(history) != 1 or not entry["steps"]:
        return None
    steps = entry["steps"]
    grid = sorted({max(1, round(steps * i / 24)) for i in range(25)})
    eps = epsilon_curve(noise_multiplier=entry["noise_multiplier"], sample_rate=entry["sample_rate"], steps=grid,
                        delta=entry["settings"]["delta"])
    scale = entry["epsilon"] / eps[-1] if eps[-1] > 0 else 1.0  # the released (larger) figure at the end
    buffer = io.BytesIO()
    plot_privacy(buffer, [(t, e * scale) for t, e in zip(grid, eps)], steps, entry["epsilon"],
                 entry["settings"].get("epsilon", entry["epsilon"]), entry["settings"]["delta"])
    return buffer.getvalue()


def _yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    import yaml

    return yaml.safe_load(path.read_text()) or {}


# ----------------------------------------------------------------- the ledger's page
def _histogram_png(rows: list[dict[str, Any]], what: str) -> bytes | None:
    if not rows:
        return None
    from matplotlib.figure import Figure  # no pyplot: the user's backend is left alone

    fig = Figure(figsize=(6.4, 2.8), tight_layout=True)
    ax = fig.subplots()
    labels = [f"{r['epsilon']:.3g}" for r in rows]
    ax.bar(range(len(rows)), [r[what] for r in rows], color="tab:blue")
    ax.set_xticks(range(len(rows)), labels, rotation=45 if len(rows) > 8 else 0)
    ax.set(xlabel="epsilon spent", ylabel=what, title=f"{what.capitalize()} by epsilon spent")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def ledger_page(summary: dict[str, Any], delta: float | None) -> str:
    """The HTML of a ledger's page from ``Ledger.summary`` (aggregates only: no hash, no person id)."""
    at = f"delta={summary['delta']:g}" if summary["delta"] is not None else "any delta (no run recorded)"
    people = summary.get("per_person") or {}
    cards = [("worst epsilon per image", f"{summary['worst_epsilon']:.4g}"), ("at", at),
             ("datasets", len(summary.get("datasets", []))),
             ("runs", sum(len(d["runs"]) for d in summary.get("datasets", [])))]
    if people.get("persons"):
        cards.insert(1, ("worst epsilon per person", f"{people['worst_epsilon']:.4g}"))
    body = (f'<p class="claim">The worst-off training image has spent epsilon = {summary["worst_epsilon"]:.4g} at '
            f"{_e(at)} over every run this ledger recorded; each run stopped before it would exceed its own "
            "target, and runs with a dataset budget before any image exceeded it.</p>" + _cards(cards)
            + "<h2>Images by epsilon spent</h2>" + _png(_histogram_png(summary["histogram"], "records"), "histogram"))
    if people.get("persons"):
        body += "<h2>Persons by epsilon spent</h2>" + _png(_histogram_png(people["histogram"], "persons"), "persons")
    if summary.get("legacy_epsilon"):
        body += f"<p>Every image, known or not, has spent at least epsilon = {summary['legacy_epsilon']:.4g} (legacy runs).</p>"
    for ds in summary.get("datasets", []):
        rows = [(f"{r['steps']} steps per {r['unit']}, sigma={r['noise_multiplier']:.4g}, q={r['sample_rate']:.4g}",
                 f"target epsilon {r['settings']['epsilon']:g}"
                 + (f", dataset budget {r['budget']:g}" if r["budget"] is not None else "") + f"  {r['name']}")
                for r in ds["runs"]]
        persons = f", worst per person {ds['worst_person_epsilon']:.4g}" if ds["persons"] else ""
        body += (f"<h2>Dataset version {_e(ds['id'])}: {_e(ds['description'])}</h2><p>N={_e(ds['num_samples'])}, "
                 f"worst epsilon per image {ds['worst_epsilon']:.4g}{_e(persons)}</p>" + _table(rows, ("run", "budget")))
    return _page("Privacy ledger report", f"every record's privacy spent, at {at}", body + _lists())


def write_ledger_page(ledger: str | Path, out: str | Path, delta: float | None = None) -> Path:
    """Write a ledger's page to ``out``."""
    from ..accounting.ledger import Ledger

    book = Ledger(ledger, create=False)
    out = Path(out)
    out.write_text(ledger_page(book.summary(delta), delta), encoding="utf-8")
    return out
