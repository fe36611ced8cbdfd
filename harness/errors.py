"""User-facing errors: the CLI prints their message as one line (and a hint line) and exits with code 2."""
from __future__ import annotations

import difflib
from typing import Optional


class HarnessError(Exception):
    """Bad input from the user (unknown name, bad budget, missing file, malformed config).

    Attributes:
        hint: what to do about it, printed by the CLI as a second line ("" for none).
    """

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


class UnsupportedModel(HarnessError):
    """The model is not a timm VisionTransformer the seam can patch; recorded, not raised to the user."""


def did_you_mean(kind: str, name: str, choices: list[str], n: int = 3, listing: Optional[str] = None) -> HarnessError:
    """Build an "unknown X" error with up to ``n`` close matches.

    Args:
        kind, name: what was asked for ("method", "tomee").
        choices: every valid name.
        n: at most this many suggestions.
        listing: where the choices are listed (a hint line), instead of listing them all in the message:
            for choices too many for one line (timm's hundreds of ViTs).
    """
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    hint = f" did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    if listing is not None:
        return HarnessError(f"unknown {kind} {name!r};{hint}" if close else f"unknown {kind} {name!r}", listing)
    return HarnessError(f"unknown {kind} {name!r};{hint} choices: {', '.join(sorted(choices))}")
