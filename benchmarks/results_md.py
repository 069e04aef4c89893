"""Write one benchmark's section of ``benchmarks/RESULTS.md`` and leave the others as they are."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def replace_section(lines: list[str]) -> None:
    """Replace the section whose first line (a ``# `` heading) is ``lines[0]``, or append it."""
    old = RESULTS.read_text().splitlines() if RESULTS.exists() else []
    heading = lines[0]
    start = old.index(heading) if heading in old else len(old)
    end = next((i for i in range(start + 1, len(old)) if old[i].startswith("# ")), len(old))
    body = [*lines]
    if end < len(old) and body and body[-1] != "":
        body.append("")
    if start == len(old) and old and old[-1] != "":  # appended: a blank line before the heading
        body.insert(0, "")
    RESULTS.write_text("\n".join([*old[:start], *body, *old[end:]]).rstrip("\n") + "\n")


def _table(heading: str) -> list[dict[str, str]]:
    """The rows of the first table in the section ``heading``, as dicts keyed by its header."""
    lines = RESULTS.read_text().splitlines() if RESULTS.exists() else []
    if heading not in lines:
        return []
    rows = []
    for line in lines[lines.index(heading) + 1:]:
        if line.startswith("# "):
            break
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return [dict(zip(rows[0], r)) for r in rows[1:]] if rows else []


def draw_ratios() -> Path:
    """``ratios.png``: private/non-private time per step and peak memory (CPU step table) and the
    time of a whole run (whole-run table), against the targets of 1.2 (step, memory) and 1.3 (run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in _table("# Benchmark: private vs non-private training steps") if r.get("time ratio")]
    runs = [r for r in _table("# Benchmark: whole private vs non-private runs") if r.get("ratio")]
    labels = [f"step: {r['case']}" for r in steps] + [f"run: {r['case']}" for r in runs]
    time_ratio = [float(r["time ratio"]) for r in steps] + [float(r["ratio"]) for r in runs]
    memory = [float(r["memory ratio"]) for r in steps] + [float("nan")] * len(runs)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], time_ratio, 0.4, label="time private/non-private")
    ax.bar([i + 0.2 for i in x], memory, 0.4, label="peak memory ratio (steps)")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.2, color="r", lw=0.8, ls="--", label="1.2x target (step, memory)")
    ax.axhline(1.3, color="m", lw=0.8, ls=":", label="1.3x target (whole run)")
    ax.set_xticks(list(x), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("ratio")
    ax.set_ylim(0, max([2.2, *time_ratio]) * 1.05)
    ax.legend(fontsize=7, ncol=2, loc="upper center")
    fig.tight_layout()
    path = RESULTS.parent / "ratios.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
