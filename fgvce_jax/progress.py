"""Progress bars on stderr: tqdm on a terminal, plain lines in a log.

Redirected to a file, tqdm's redraws (carriage returns, and cursor-up escapes for nested bars) turn
into one unreadable line. When stderr is not a terminal, :func:`bar` writes a plain line at most every
``LOG_INTERVAL_S`` seconds and one at the end instead. Callers show one bar at a time.
"""
from __future__ import annotations

import io
import sys

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0


class _Lines(io.TextIOBase):
    """A text stream that turns tqdm's redraws into lines of ``out``: every carriage return ends a line,
    and blank lines (a bar clearing itself) are dropped."""

    def __init__(self, out):
        self.out = out

    def write(self, s: str) -> int:
        for line in s.replace("\r", "\n").split("\n"):
            if line.strip():
                self.out.write(line.rstrip() + "\n")
        self.out.flush()
        return len(s)

    def flush(self) -> None:
        self.out.flush()


def bar(iterable=None, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)`` on stderr; in a log (stderr not a terminal) a plain line every
    ``LOG_INTERVAL_S`` seconds and at the end."""
    if sys.stderr.isatty():
        return tqdm(iterable, file=sys.stderr, **kwargs)
    return tqdm(iterable, file=_Lines(sys.stderr), mininterval=LOG_INTERVAL_S, ascii=True, ncols=100,
                **{**kwargs, "leave": True})


def write(message: str) -> None:
    """Print a line on stderr without breaking a bar that is showing."""
    tqdm.write(message, file=sys.stderr)
