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
