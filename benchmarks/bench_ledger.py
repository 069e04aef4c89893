"""Per-record ledger at scale: identify, register and query 100,000 training images.

Prints seconds for: identifying a folder of N small images (decoded pixels, file bytes, thumbnail),
registering a run over all N records, registering a second run over half of them plus 10% new
ones (new records are checked for near-duplicates of known ones), and answering "worst epsilon for
this folder" (images identified again, records grouped by the runs that included them, one
released composition per group).

Usage: python benchmarks/bench_ledger.py [--n 100000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ultralytics_dp.accounting.ledger import Ledger
from ultralytics_dp.accounting.records import THUMB, Record
from ultralytics_dp.integration.training_set import identify_all


def timed(label: str, fn):  # noqa: ANN001, ANN201
    start = time.perf_counter()
    out = fn()
    print(f"{label:<48} {time.perf_counter() - start:7.2f} s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100_000)
    n = parser.parse_args().n
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(n):  # distinct small noise images (content: each is checked for near-duplicates)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")
        files = sorted(folder.iterdir())
        book = Ledger(Path(tmp) / "ledger.sqlite")
        records = timed(f"identify {n} images", lambda: identify_all(files))
        run = timed(f"register a run of {n} records", lambda: book.start_run(
            records, fingerprint="v1", settings={}, delta=1e-5, budget=8.0))
        for _ in range(5):  # five epochs, reserved one by one as a run does
            book.reserve(run, steps=100, noise_multiplier=1.0, sample_rate=0.01)
        extra = [Record(pixels=f"new-{i}", file=f"new-file-{i}",
                        thumb=rng.integers(0, 256, THUMB * THUMB, dtype=np.uint8).tobytes()) for i in range(n // 10)]
        second = timed(f"register a run of {n // 2 + n // 10} records (half shared)", lambda: book.start_run(
            records[: n // 2] + extra, fingerprint="v2", settings={}, delta=1e-5))
        book.reserve(second, steps=300, noise_multiplier=1.2, sample_rate=0.01)
        report = timed(f"worst epsilon for the folder of {n} images (identifying included)", lambda: book.epsilons(
            identify_all(files)))
        timed(f"budget check for a run over the {n} records", lambda: book.budgets(records, None, 1e-5))
        print(f"worst epsilon {report['worst_epsilon']:.4f}; histogram {report['histogram']}")


if __name__ == "__main__":
    main()
