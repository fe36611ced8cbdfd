"""Where shared data and checkpoints are looked up."""
from __future__ import annotations

import os
from pathlib import Path

from harness.errors import HarnessError

ENV_DATA_ROOT = "HARNESS_DATA_ROOT"
ENV_CACHE_DIR = "HARNESS_CACHE_DIR"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def data_root(explicit: str = "") -> Path:
    """The data root: ``explicit`` (flag or config), else $HARNESS_DATA_ROOT, else ``../shared``.

    ``../shared`` is tried beside the project and beside the working directory.
    """
    if explicit or os.environ.get(ENV_DATA_ROOT):
        root = Path(explicit or os.environ[ENV_DATA_ROOT]).expanduser()
        if not root.is_dir():
            raise HarnessError(f"data root {root} is not a directory")
        return root
    for candidate in (PROJECT_ROOT.parent / "shared", Path.cwd().parent / "shared"):
        if candidate.is_dir():
            return candidate
    raise HarnessError(
        f"no data root: looked for {PROJECT_ROOT.parent / 'shared'}; pass --data-root or set {ENV_DATA_ROOT}")


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
