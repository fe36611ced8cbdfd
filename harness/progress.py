"""Progress of long work (evaluation passes, searches), shown by the command line.

Code that runs for minutes reports through the ``harness.progress`` logger, at most every
``seconds`` (:class:`Throttle`), so a full-test-split pass on CPU or a DiffRate search is not silent.
The CLI prints this logger's messages to stdout; as a library, it is an ordinary logger.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable

log = logging.getLogger("harness.progress")


class Throttle:
    """True at most once per ``seconds`` (never on the first call), and always when ``last``."""

    def __init__(self, seconds: float = 20.0, clock: Callable[[], float] = time.monotonic):
        self.seconds, self.clock = seconds, clock
        self.last_time = clock()

    def __call__(self, last: bool = False) -> bool:
        now = self.clock()
        if last or now - self.last_time >= self.seconds:
            self.last_time = now
            return True
        return False


def duration_text(seconds: float) -> str:
    """``seconds`` as a short duration: ``45 s``, ``3 min 20 s``, ``1 h 05 min``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def eta_text(cell_s: list[float], left: int) -> str:
    """The overall progress of a sweep: cells done, cells left and, once a cell has finished, an ETA.

    The ETA is the mean time of the finished cells times the cells left (a DiffRate search or a
    slow method moves it; it settles as cells finish).
    """
    text = f"{len(cell_s)} done, {left} left"
    if cell_s and left:
        text += f", ETA ~{duration_text(sum(cell_s) / len(cell_s) * left)}"
    return text


def report(message: str, *args) -> None:
    log.info(message, *args)


class _Stdout(logging.StreamHandler):
    """A handler writing to whatever ``sys.stdout`` is when a message comes (it may be replaced)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def to_stdout(indent: str = "      ") -> None:
    """Print progress messages on stdout (the CLI's choice), whatever the root logger's level."""
    if any(isinstance(h, _Stdout) for h in log.handlers):
        return
    handler = _Stdout()
    handler.setFormatter(logging.Formatter(indent + "%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
