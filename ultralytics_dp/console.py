"""What reaches the user's console from this package: one ``DP:`` line at a time on Ultralytics'
logger, errors on one line, and silence around Ultralytics code that would print statistics of
the private training set. Ultralytics is imported only when a function runs.
"""

from __future__ import annotations

import contextlib
import io
import re
from typing import Iterator


def log(message: str) -> None:
    """One ``DP:`` line on Ultralytics' logger."""
    from ultralytics.utils import LOGGER

    LOGGER.info(f"DP: {message}")


def one_line(err: BaseException) -> str:
    """An error message on one line, without terminal colours (Ultralytics' messages have both)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


@contextlib.contextmanager
def quiet_console() -> Iterator[None]:
    """Nothing Ultralytics logs or prints inside reaches the console (for code that would print
    statistics of the training set)."""
    from ultralytics.utils import LOGGER

    disabled, LOGGER.disabled = LOGGER.disabled, True
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        LOGGER.disabled = disabled
