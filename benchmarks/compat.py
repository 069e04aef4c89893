"""The window of Ultralytics releases, tested: for each release, a venv with that Ultralytics and
this package installed (not editable), the fast test suite, one private detection run through the
stock ``yolo`` command, one private classification run through it, and one private detection run
through ``DifferentialPrivacy(...).attach(model)``.

Each venv (``.compat/<version>``) takes torch and every other dependency from the repository's
``.venv`` (built from ``constraints.txt``) through a ``.pth`` line, so only Ultralytics and this
package are installed into it: the release under test shadows ``.venv``'s own.

    .venv/bin/python benchmarks/compat.py [--versions 8.4.187,8.4.188,8.4.189,8.4.190]

Writes benchmarks/COMPAT.md (date, machine, one row per release) and exits non-zero if any fails.
``make test-compat`` runs it with the window's default releases.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from ultralytics_dp.integration.keys import ULTRALYTICS_WINDOW  # noqa: E402

DEFAULT = ("8.4.187", "8.4.188", "8.4.189", "8.4.190")  # the whole window
PRIVATE_DET = ("train model=yolo26n.yaml data=digits-det imgsz=64 epochs=1 batch=16 fraction=0.1 workers=0 "
               "epsilon=8 delta=1e-3 plots=False")
PRIVATE_CLS = ("classify train model=yolo26n-cls.yaml data=digits-cls imgsz=32 epochs=1 batch=64 fraction=0.2 "
               "workers=0 epsilon=8 delta=1e-3 plots=False")
ATTACHED = """
import sys
from ultralytics import YOLO
from ultralytics_dp import DifferentialPrivacy
model = YOLO("yolo26n.yaml")
dp = DifferentialPrivacy(epsilon=8, delta=1e-3).attach(model)
model.train(data="digits-det", imgsz=64, epochs=1, batch=16, fraction=0.1, workers=0, plots=False,
            project=sys.argv[1], name="attached")
assert dp.steps > 0 and dp.epsilon <= 8, (dp.steps, dp.epsilon)
"""


def run(cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> tuple[bool, float]:
    start = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(map(str, cmd))}\n")
        out.flush()
        code = subprocess.run(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT).returncode
    return code == 0, time.perf_counter() - start


def build(version: str, root: Path, log: Path) -> Path:
    """A venv with Ultralytics ``version`` and this package (a wheel install), the rest from .venv."""
    env_dir = root / version
    shutil.rmtree(env_dir, ignore_errors=True)
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the venv's bundled setuptools is older than torch requires: .venv's is used instead
    subprocess.run([py, "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=True)
    Path(site, "repository-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: .venv's own Ultralytics (seen through the .pth line) must not satisfy the request
    for args in (["--no-deps", "--ignore-installed", f"ultralytics=={version}"],
                 ["--no-deps", "--no-build-isolation", str(REPO)]):
        ok, _ = run([py, "-m", "pip", "install", "-q", *args], dict(os.environ), root, log)
        if not ok:
            raise RuntimeError(f"installing {args[-1]} into {env_dir} failed (see {log})")
    return env_dir


def check(version: str, root: Path, log: Path) -> dict[str, object]:
    env_dir = build(version, root, log)
    bin_dir = env_dir / "bin"
    work = Path(tempfile.mkdtemp(prefix=f"compat-{version}-"))
    env = {**os.environ, "YOLO_CONFIG_DIR": str(work / "config"), "ULTRALYTICS_DP_DATA": str(work / "data"),
           "ULTRALYTICS_DP_LEDGER": str(work / "ledger.sqlite"), "PYTHONPATH": ""}
    row: dict[str, object] = {"version": version}
    # outside the checkout, so that the installed package is the one imported
    row["fast suite"] = run([bin_dir / "python", "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider",
                             str(REPO / "tests")], env, work, log)
    row["yolo train (det)"] = run([bin_dir / "yolo", *PRIVATE_DET.split(), f"project={work}", "name=det"], env, work, log)
    row["yolo classify train"] = run([bin_dir / "yolo", *PRIVATE_CLS.split(), f"project={work}", "name=cls"], env, work,
                                     log)
    row["attach (det)"] = run([bin_dir / "python", "-c", ATTACHED, str(work)], env, work, log)
    shutil.rmtree(work, ignore_errors=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--versions", default=",".join(DEFAULT))
    versions = parser.parse_args().versions.split(",")
    root = REPO / ".compat"
    root.mkdir(exist_ok=True)
    log = root / "compat.log"
    log.write_text("")
    rows = []
    for version in versions:
        print(f"Ultralytics {version} ...", flush=True)
        rows.append(check(version, root, log))
        print("  " + ", ".join(f"{k}: {'pass' if v[0] else 'FAIL'} ({v[1]:.0f} s)" for k, v in rows[-1].items()
                               if k != "version"), flush=True)
    columns = [k for k in rows[0] if k != "version"]
    lines = [
        "# Ultralytics releases tested with this package",
        "",
        f"- date: {datetime.date.today()}; machine: {platform.machine()}, {os.cpu_count()} cores, CPU; "
        f"python {platform.python_version()}; torch and the rest from `constraints.txt`",
        f"- command: `python benchmarks/compat.py --versions {','.join(versions)}` (`make test-compat`)",
        f"- the window the plugin accepts: Ultralytics {ULTRALYTICS_WINDOW[0]} to {ULTRALYTICS_WINDOW[1]} "
        "(`ultralytics_dp/integration/keys.py`, the same bounds as `pyproject.toml`)",
        "",
        "| Ultralytics | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append(f"| {row['version']} | " + " | ".join(
            f"{'pass' if row[c][0] else 'FAIL'} ({row[c][1]:.0f} s)" for c in columns) + " |")
    (REPO / "benchmarks" / "COMPAT.md").write_text("\n".join(lines) + "\n")
    return 0 if all(row[c][0] for row in rows for c in columns) else 1


if __name__ == "__main__":
    raise SystemExit(main())
