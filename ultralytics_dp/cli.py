"""``yolo-dp``: the ``yolo`` command line with differential privacy.

Usage: ``yolo-dp MODE key=value ...``. Unknown modes and keys go to Ultralytics unchanged.
Bad input gives a one-line error on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from typing import Callable

from . import __version__

HELP = f"""yolo-dp {__version__}: differentially private training for Ultralytics YOLO

Usage:
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
        raise UsageError(f"{key} must be a {kind.__name__}, got {pairs[key]!r}") from None


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


MODES: dict[str, Callable[[list[str]], int]] = {"privacy": privacy}


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
