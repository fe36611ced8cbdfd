"""Where the configuration, shared data and checkpoints are looked up: flags, environment, working directory.

Nothing here depends on where the code is installed, except the last fallbacks of a source checkout
(``../shared`` beside it), so a wheel installed anywhere behaves like the checkout run from the same
working directory.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from harness.errors import HarnessError

ENV_DATA_ROOT = "HARNESS_DATA_ROOT"
ENV_CACHE_DIR = "HARNESS_CACHE_DIR"
CONFIG_NAME = "benchmark.toml"
PACKAGE_DIR = Path(__file__).resolve().parent
# The checkout in a source or editable install; in a wheel install, site-packages (see checkout_root).
PROJECT_ROOT = PACKAGE_DIR.parent
DEFAULT_CONFIG = PACKAGE_DIR / "default_benchmark.toml"  # package data: the checkout's benchmark.toml (a link)


def checkout_root() -> Optional[Path]:
    """The source checkout this code runs from, or None for an installed (non-editable) copy."""
    return PROJECT_ROOT if (PROJECT_ROOT / "pyproject.toml").is_file() and (PROJECT_ROOT / "methods").is_dir() else None


def default_config() -> Path:
    """``./benchmark.toml`` when the working directory has one, else the built-in defaults shipped in the package."""
    local = Path(CONFIG_NAME)
    return local if local.is_file() else DEFAULT_CONFIG


def _data_root_candidates() -> list[Path]:
    cwd = Path.cwd()
    candidates = [cwd / "shared", cwd.parent / "shared"]
    checkout = checkout_root()
    if checkout is not None:
        candidates.append(checkout.parent / "shared")
    return list(dict.fromkeys(candidates))


def data_root(explicit: str = "") -> Path:
    """The data root: ``explicit`` (flag or config), else $HARNESS_DATA_ROOT, else a ``shared`` folder.

    ``shared`` is tried in the working directory, beside it (``../shared``), then beside the source
    checkout (when running from one).
    """
    if explicit or os.environ.get(ENV_DATA_ROOT):
        root = Path(explicit or os.environ[ENV_DATA_ROOT]).expanduser()
        if not root.is_dir():
            raise HarnessError(f"data root {root} is not a directory")
        return root
    candidates = _data_root_candidates()
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise HarnessError(f"no data root: looked for {', '.join(map(str, candidates))}; "
                       f"pass --data-root or set {ENV_DATA_ROOT}")


def cache_dir(explicit: str = "") -> Path:
    """Where decoded data (and other derived files shared across result folders) are cached.

    ``explicit``, else $HARNESS_CACHE_DIR, else ``$XDG_CACHE_HOME/vit-token-harness``
    (``~/.cache/vit-token-harness``). Not under the results folder: the decoded crops of an eval set
    do not depend on a sweep's results, and every results folder (each test's too) shares them.
    """
    if explicit or os.environ.get(ENV_CACHE_DIR):
        return Path(explicit or os.environ[ENV_CACHE_DIR]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "vit-token-harness"


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file, else a HarnessError saying what was looked for and where."""
    if not path.is_file():
        raise HarnessError(f"{what} not found: looked for {path} (set --data-root or {ENV_DATA_ROOT})")
    return path


class DataRoot:
    """The data root, looked up only when something needs it.

    A sweep of synthetic-data models runs without any data root; an explicit root (flag, config or
    environment) is still checked at once, so a wrong path is an immediate error.
    """

    def __init__(self, explicit: str = ""):
        self.explicit = explicit
        self._path = data_root(explicit) if explicit or os.environ.get(ENV_DATA_ROOT) else None

    def available(self) -> bool:
        try:
            self.path()
        except HarnessError:
            return False
        return True

    def path(self) -> Path:
        if self._path is None:
            self._path = data_root(self.explicit)
        return self._path

    def __truediv__(self, other) -> Path:
        return self.path() / other

    def __str__(self) -> str:
        return str(self._path) if self._path else "<data root>"
