"""User-facing errors: the CLI prints their message as one line and exits with code 2."""
from __future__ import annotations

import difflib


class HarnessError(Exception):
    """Bad input from the user (unknown name, bad budget, missing file, malformed config)."""


class UnsupportedModel(HarnessError):
    """The model is not a timm VisionTransformer the seam can patch; recorded, not raised to the user."""


def did_you_mean(kind: str, name: str, choices: list[str]) -> HarnessError:
    """Build an "unknown X" error with close matches and the full list of choices."""
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    hint = f" did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return HarnessError(f"unknown {kind} {name!r};{hint} choices: {', '.join(sorted(choices))}")
