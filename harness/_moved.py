"""Import paths of the modules that moved into layer folders (issue 23), kept for one release.

``import harness.report`` (or ``from harness.plan import ...``) still works and gives the module at
its new path (``harness.reporting.report``), with a DeprecationWarning naming it. Plugins' own import
paths (``harness.registry``, ``harness.schedule``, ``harness.seam``, ``harness.keeprate``,
``harness.margins``, ``harness.progress``, ``harness.errors``) did not move.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

LAYERS = {
    "sweep": ("plan", "cell", "execute", "runner", "store", "calibration", "config", "budget", "run_summary",
              "distributed"),
    "measurement": ("measure", "flops", "stats", "fidelity", "tokenmap"),
    "loading": ("data", "datacache", "inputs", "models"),
    "reporting": ("report", "plots", "style", "html_report", "readme_block", "protocol_report"),
    "training": ("finetune", "recipes"),
}
MOVED = {f"harness.{m}": f"harness.{layer}.{m}" for layer, mods in LAYERS.items() for m in mods}


class _OldPath(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path and hands back the module imported from its new one."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {MOVED[spec.name]}; the old path goes in the next release",
                      DeprecationWarning, stacklevel=3)
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module) -> None:
        """Nothing to run: the module was executed at its new path."""


def install() -> None:
    """Put the old-path finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, _OldPath) for f in sys.meta_path):
        sys.meta_path.insert(0, _OldPath())  # before an editable install's finder, which may know the old files
