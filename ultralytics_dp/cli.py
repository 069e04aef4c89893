"""``yolo-dp``: the ``yolo`` command line with differential privacy.

Usage: ``yolo-dp MODE key=value ...``. Unknown modes and keys go to Ultralytics unchanged.
"""

from __future__ import annotations

import sys

from . import __version__

HELP = f"""yolo-dp {__version__}: differentially private training for Ultralytics YOLO

Usage:
  yolo-dp help | version
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``yolo-dp`` console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"help", "-h", "--help"}:
        print(HELP)
        return 0
    if args[0] in {"version", "--version"}:
        print(__version__)
        return 0
    print(f"yolo-dp: unknown mode {args[0]!r}; run 'yolo-dp help'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
