"""What the scripts that run an official repository share: importing from a checkout, and its commit.

Used by ``scripts/official_speed.py``, ``scripts/gtp_golden.py``, ``scripts/dynamicvit_golden.py`` and
``scripts/make_bf16_golden.py``;
the official code itself is never part of this project (each script takes ``--official-root``).
"""
from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Optional


@contextlib.contextmanager
def on_path(folder: Path, own_modules: tuple[str, ...] = ()):
    """``folder`` first on sys.path; the top-level modules the repository brings are dropped afterwards
    (two repositories may both ship a ``models`` or ``tome`` package)."""
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))
        for name in [m for m in sys.modules if m.split(".")[0] in own_modules]:
            del sys.modules[name]


def git_head(folder: Path) -> Optional[str]:
    """The commit a checkout holds, or None where ``folder`` is no git checkout (a ``git archive`` export)."""
    try:
        return subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def official_arguments(parser, repo: str) -> None:
    """The arguments every golden-file script takes: the official checkout, its commit, the data folder."""
    parser.add_argument("--official-root", type=Path, required=True, help=f"a checkout or export of {repo}")
    parser.add_argument("--commit", help="the commit --official-root holds (read with git when it is a checkout)")
    parser.add_argument("--data-root", type=Path, default=None, help="the shared data folder (default: the harness's)")


def commit_of(root: Path, given: Optional[str]) -> str:
    """``given``, else the checkout's commit; an export without ``--commit`` is one clear error."""
    commit = given or git_head(root)
    if commit is None:
        raise SystemExit(f"error: {root} is not a git checkout: pass the commit it was exported from with --commit")
    return commit


def run_provenance(num_images: int = 40) -> dict:
    """How a golden file's official run ran: the ``run`` and ``versions`` fields of its provenance .json."""
    import platform

    import numpy as np
    import safetensors
    import timm
    import torch

    return {"run": {"device": "cpu", "dtype": "float32", "mode": "model.eval(), torch.inference_mode()",
                    "batch": f"all {num_images} images in one batch", "threads": torch.get_num_threads()},
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
                         "numpy": np.__version__, "safetensors": safetensors.__version__}}
