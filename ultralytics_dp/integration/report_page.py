"""``privacy.html``: one self-contained page a privacy officer can read, for a run or a ledger.

A run's page (``write_run_page``, at the end of every private run and by ``yolo-dp report``) states
the guarantee in one plain sentence, the unit, epsilon, delta, sigma, q, steps, C, both accountants'
values, epsilon against steps (planned, spent, budget), what is public and what is not covered, the
DP settings and the Ultralytics arguments that shape the guarantee or the model, and the audit's
result when the run was audited (``audit.json``, shown only if it states this run's epsilon, steps
and sigma). A ledger's page
(``write_ledger_page``) shows every record's epsilon as a histogram, the worst record, each dataset
version and its runs.

Privacy assumptions relied on here: everything shown is already released beside the page (the
checkpoint's ``dp`` entry and training arguments, ``audit.json``) or is a ledger aggregate the owner reads
locally; a page never shows a record's hash, a person id or the ledger's run fingerprints. The page
loads nothing: CSS inline, charts as inline SVG, no script.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..accounting.pld import epsilon_curve
from ..version import __version__
from .checkpoint import read_entries

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
svg{background:#fff;border-radius:6px;max-width:100%;height:auto}
.card b{display:block;font-size:20px}.card span{color:#5b6575;font-size:13px}
table{border-collapse:collapse;background:#fff;width:100%;font-size:14px;margin-bottom:6px}
td,th{padding:5px 10px;border-bottom:1px solid #eceef2;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:18px}
.pass{color:#17803d;font-weight:600}.fail{color:#b42318;font-weight:600}
ul{margin:4px 0 0;padding-left:20px}
footer{color:#7a8494;font-size:12px;margin-top:30px}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


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
    verdict = {"passed": '<span class="pass">passed</span>',
               "failed": '<span class="fail">FAILED: the lower bound exceeds the claim</span>',
               "inconclusive": "inconclusive"}[audit["verdict"]]
    rows = [("canaries", f"{audit['kind']} ({audit['canaries']}, {audit['included']} included)"),
            ("claimed epsilon", f"{audit['claimed_epsilon']:.4f}"),
            ("empirical lower bound epsilon_lb", f"{audit['epsilon_lb']:.4f} at {audit['confidence']:.0%} confidence"),
            ("the most these canaries can show", f"{audit['ceiling']:.4f}"),
            ("guesses", f"{audit['correct']} correct of {audit['guesses']}")]
    return (f"<h2>Empirical audit: {verdict}</h2>" + _table(rows)
            + "<p class=sub>A correct mechanism gives a lower bound at or below the claim; a one-run bound is loose "
              "by design (m canaries, one run), so it catches a broken mechanism rather than measuring a correct one, "
              "and only where the claim is below what the canaries can show.</p>")


def run_page(entry: dict[str, Any], args: dict[str, Any], planned: Sequence[tuple[int, float]],
             audit: dict[str, Any] | None) -> str:
    """The HTML of a run's page from its ``dp`` entry, its training arguments, the planned epsilon
    curve (step, epsilon upper bound) and its audit."""
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
            + "<h2>Privacy spent against steps</h2>"
            + curve_svg(planned, entry["steps"], entry["epsilon"], settings.get("epsilon", entry["epsilon"]),
                        settings["delta"])
            + f"<p class=sub>Target epsilon {_e(settings.get('epsilon'))}.{_e(stop)}</p>"
            + "<h2>Accountants</h2>" + _table(accountants, ("accountant", f"epsilon at delta={settings['delta']:g}"))
            + f"<p class=sub>prv-accountant {_e(entry.get('prv_accountant_version'))}; both bound the same "
              "mechanism, the released epsilon is the larger.</p>"
            + _audit_section(audit) + _lists()
            + '<div class="cols"><div><h2>DP settings</h2>' + _table(sorted(settings.items()))
            + "</div><div><h2>Ultralytics arguments</h2>"
            + _table((k, args[k]) for k in ARGS_SHOWN if k in args) + "</div></div>")
    return _page("Privacy report", f"private training run, ultralytics-dp {entry.get('version', '')}", body)


def run_checkpoint(save_dir: str | Path) -> Path:
    """A run folder's ``weights/last.pt``, else its ``weights/best.pt``."""
    save_dir = Path(save_dir)
    checkpoint = next((p for p in (save_dir / "weights" / "last.pt", save_dir / "weights" / "best.pt") if p.exists()),
                      None)
    if checkpoint is None:
        raise ValueError(f"{save_dir} holds no weights/last.pt or weights/best.pt of a private run")
    return checkpoint


def write_run_page(save_dir: str | Path, planned: Sequence[tuple[int, float]] | None = None) -> Path:
    """Write ``privacy.html`` into a run's folder from its checkpoint (``run_checkpoint``);
    ``planned``: the plan's epsilon curve (default: the steps taken, from the checkpoint)."""
    return _write_checkpoint_page(run_checkpoint(save_dir), Path(save_dir), planned)


def write_checkpoint_page(checkpoint: str | Path) -> Path:
    """A checkpoint's page, in its run's folder (the folder above ``weights/``) or beside it."""
    checkpoint = Path(checkpoint)
    folder = checkpoint.parent.parent if checkpoint.parent.name == "weights" else checkpoint.parent
    return _write_checkpoint_page(checkpoint, folder, None)


def _write_checkpoint_page(checkpoint: Path, folder: Path, planned: Sequence[tuple[int, float]] | None) -> Path:
    entries = read_entries(checkpoint)
    entry = entries["dp"]
    if not entry:
        raise ValueError(f"{checkpoint} has no 'dp' entry: it was not trained with ultralytics-dp")
    audit = _audit_of(folder / "audit.json", entry)
    try:
        page = run_page(entry, entries["train_args"] or {}, _spent_curve(entry) if planned is None else planned, audit)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{checkpoint}'s dp entry lacks what the page states ({err}): it was written by another "
                         "ultralytics-dp version") from None
    out = folder / PAGE
    out.write_text(page, encoding="utf-8")
    return out


def _audit_of(path: Path, entry: dict[str, Any]) -> dict[str, Any] | None:
    """The audit in ``path`` if it audited the run of ``entry`` (same epsilon, steps and sigma:
    a later run written into the same folder was not audited)."""
    if not path.exists():
        return None
    try:
        audit = json.loads(path.read_text())
        same = (math.isclose(audit["claimed_epsilon"], entry["epsilon"], rel_tol=1e-9) and audit["steps"] == entry["steps"]
                and math.isclose(audit["noise_multiplier"], entry["noise_multiplier"], rel_tol=1e-9))
        audit["verdict"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not an audit result ({type(err).__name__}: {err})") from None
    return audit if same else None


def _spent_curve(entry: dict[str, Any]) -> list[tuple[int, float]]:
    """Epsilon upper bounds at up to 25 step counts of the steps taken, from the entry alone (scaled
    to the released figure at the end, as the trainer's own curve); empty for a run that composed
    several (sigma, q)."""
    if len(entry.get("accountant_state", {}).get("history", [])) != 1 or not entry["steps"]:
        return []
    steps = entry["steps"]
    grid = sorted({max(1, round(steps * i / 24)) for i in range(25)})
    eps = epsilon_curve(noise_multiplier=entry["noise_multiplier"], sample_rate=entry["sample_rate"], steps=grid,
                        delta=entry["settings"]["delta"])
    scale = entry["epsilon"] / eps[-1] if eps[-1] > 0 else 1.0
    return [(0, 0.0)] + [(t, e * scale) for t, e in zip(grid, eps)]


def _svg_axes(width: int, height: int, x_max: float, y_max: float, x_label: str, y_label: str, x_ticks: bool = True
              ) -> tuple[list[str], Callable[[float, float], tuple[float, float]]]:
    """An SVG canvas with axes (6 ticks each; whole numbers on x) and grid lines; returns its
    elements and the data -> pixel map."""
    left, right, top, bottom = 56, 16, 14, 44
    w, h = width - left - right, height - top - bottom

    def at(x: float, y: float) -> tuple[float, float]:
        return left + w * x / x_max, top + h * (1 - y / y_max)

    parts = [f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="#fff" stroke="#9aa3b0"/>']
    for i in range(6):
        x, y = round(x_max * i / 5), y_max * i / 5
        px, _ = at(x, 0)
        _, py = at(0, y)
        if x_ticks:
            parts.append(f'<text x="{px:.1f}" y="{top + h + 16}" text-anchor="middle">{x}</text>')
        parts.append(f'<text x="{left - 6}" y="{py + 4:.1f}" text-anchor="end">{y:.3g}</text>')
        parts.append(f'<line x1="{left}" x2="{left + w}" y1="{py:.1f}" y2="{py:.1f}" stroke="#eceef2"/>')
    parts.append(f'<text x="{left + w / 2}" y="{height - 6}" text-anchor="middle">{_e(x_label)}</text>')
    parts.append(f'<text transform="translate(14 {top + h / 2}) rotate(-90)" text-anchor="middle">{_e(y_label)}</text>')
    return parts, at


def _svg(width: int, height: int, parts: list[str], title: str) -> str:
    return (f'<svg role="img" aria-label="{_e(title)}" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" font-size="12" fill="#1d2430">' + "".join(parts) + "</svg>")


def curve_svg(planned: Sequence[tuple[int, float]], steps: int, epsilon: float, target: float, delta: float) -> str:
    """Epsilon against optimizer steps: the plan's curve (dashed), the part spent, the budget line."""
    x_max = max([steps, 1, *(t for t, _ in planned)])
    y_max = 1.15 * max([target, epsilon, *(e for _, e in planned)]) or 1.0
    parts, at = _svg_axes(640, 300, x_max, y_max, "optimizer steps", f"epsilon at delta={delta:g}")

    def line(points: Sequence[tuple[float, float]], style: str) -> str:
        xy = " ".join("{:.1f},{:.1f}".format(*at(t, e)) for t, e in points)
        return f'<polyline points="{xy}" fill="none" {style}/>'

    if planned:
        parts.append(line(planned, 'stroke="#8a94a3" stroke-dasharray="5 4" stroke-width="1.5"'))
    spent = [(t, e) for t, e in planned if t < steps] + [(steps, epsilon)]
    parts.append(line(spent if len(spent) > 1 else [(0, 0), (steps, epsilon)], 'stroke="#2f6fdf" stroke-width="2.5"'))
    x, y = at(steps, epsilon)
    parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="#2f6fdf"/>')
    _, ty = at(0, target)
    parts.append(f'<line x1="56" x2="624" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#b42318"/>')
    parts.append(f'<text x="620" y="{ty - 5:.1f}" text-anchor="end" fill="#b42318">budget epsilon={target:g}</text>')
    parts.append(f'<text x="{x - 8:.1f}" y="{y + 18:.1f}" text-anchor="end">epsilon={epsilon:.3g} after {steps} steps'
                 "</text>")
    return _svg(640, 300, parts, "epsilon against optimizer steps")


def bars_svg(rows: Sequence[dict[str, Any]], what: str) -> str:
    """A histogram: how many ``what`` (records or persons) have spent each epsilon."""
    n = len(rows)
    parts, at = _svg_axes(640, 260, n, 1.1 * max(r[what] for r in rows), "epsilon spent", what, x_ticks=False)
    for i, r in enumerate(rows):
        x0, y = at(i + 0.15, r[what])
        x1, y0 = at(i + 0.85, 0)
        parts.append(f'<rect x="{x0:.1f}" y="{y:.1f}" width="{x1 - x0:.1f}" height="{y0 - y:.1f}" fill="#2f6fdf">'
                     f'<title>{r[what]} {what} at epsilon {r["epsilon"]:.4g}</title></rect>')
        parts.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{y - 4:.1f}" text-anchor="middle">{r["epsilon"]:.3g}</text>')
    return _svg(640, 260, parts, f"{what} by epsilon spent")


# ----------------------------------------------------------------- the ledger's page
def ledger_page(summary: dict[str, Any], delta: float | None) -> str:
    """The HTML of a ledger's page from ``Ledger.summary`` (aggregates only: no hash, no person id).
    Images that belong to persons are accounted per person, the others per image."""
    at = f"delta={summary['delta']:g}" if summary["delta"] is not None else "any delta (no run recorded)"
    people = summary.get("per_person") or {}
    owned = summary.get("records_of_persons") or 0
    cards = [("at", at), ("datasets", len(summary.get("datasets", []))),
             ("runs", sum(len(d["runs"]) for d in summary.get("datasets", [])))]
    claims = []
    if summary["histogram"] or not people.get("persons"):
        cards.insert(0, ("worst epsilon per image", f"{summary['worst_epsilon']:.4g}"))
        claims.append(f"the worst-off training image has spent epsilon = {summary['worst_epsilon']:.4g}")
    if people.get("persons"):
        cards.insert(0, ("worst epsilon per person", f"{people['worst_epsilon']:.4g}"))
        claims.append(f"the worst-off person (all of their images together) has spent epsilon = "
                      f"{people['worst_epsilon']:.4g}")
    if owned:
        cards.append(("images accounted per person", owned))
    body = (f'<p class="claim">Over every run this ledger recorded, {" and ".join(claims)}, at {_e(at)}; each run '
            "stopped before its unit (an image, or a person) would exceed the run's target, and runs with a dataset "
            "budget before any record exceeded it.</p>" + _cards(cards)
            + ("<h2>Images by epsilon spent</h2>" + bars_svg(summary["histogram"], "records")
               if summary["histogram"] else ""))
    if people.get("persons"):
        body += "<h2>Persons by epsilon spent</h2>" + bars_svg(people["histogram"], "persons")
    if summary.get("legacy_epsilon"):
        body += f"<p>Every image, known or not, has spent at least epsilon = {summary['legacy_epsilon']:.4g} (legacy runs).</p>"
    for ds in summary.get("datasets", []):
        rows = [(f"{r['steps']} steps per {r['unit']}, sigma={r['noise_multiplier']:.4g}, q={r['sample_rate']:.4g}",
                 f"target epsilon {r['settings']['epsilon']:g}"
                 + (f", dataset budget {r['budget']:g}" if r["budget"] is not None else "") + f"; {r['name']}")
                for r in ds["runs"]]
        worst = ([f"worst epsilon per image {ds['worst_epsilon']:.4g}"] if ds["worst_epsilon"] or not ds["persons"]
                 else []) + ([f"worst per person {ds['worst_person_epsilon']:.4g}"] if ds["persons"] else [])
        body += (f"<h2>Dataset version {_e(ds['id'])}: {_e(ds['description'])}</h2><p>N={_e(ds['num_samples'])}, "
                 f"{_e(', '.join(worst))}</p>" + _table(rows, ("run", "target; run folder")))
    return _page("Privacy ledger report", f"every record's privacy spent, at {at}", body + _lists())


def write_ledger_page(ledger: str | Path, out: str | Path, delta: float | None = None) -> Path:
    """Write a ledger's page to ``out``."""
    from ..accounting.ledger import Ledger

    book = Ledger(ledger, create=False)
    out = Path(out)
    out.write_text(ledger_page(book.summary(delta), delta), encoding="utf-8")
    return out
