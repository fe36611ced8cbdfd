"""Benchmark harness for token reduction in Vision Transformers.

Import stays light on purpose (`python -m harness ls` must be instant): torch, timm, pandas and
matplotlib are imported by the modules that use them.

The folders name the layers, downhill from what a user runs to what a plugin uses:

 - ``cli`` / ``__main__``: ``python -m harness``;
 - ``reporting/``: tables, figures, the HTML report, from stored records;
 - ``sweep/``: configuration, plan, cells, execution, the store, calibration, ranks;
 - ``training/``: the fine-tuning protocol and its recipes;
 - ``measurement/``: accuracy, speed, FLOPs, statistics, golden-logit fidelity;
 - ``loading/``: data and models;
 - the plugin API, at the top: ``registry`` (the method contract and discovery), ``schedule``
   (the per-block token schedule and its GMACs), ``seam/`` (the one place timm blocks are
   patched, and the operations methods share), ``keeprate``, ``margins``, ``progress``, ``errors``,
   ``paths``.

Modules that moved into the folders keep their old import path for one release (:mod:`harness._moved`).
"""
__version__ = "0.1.0"

from harness import _moved  # noqa: E402  (old import paths of moved modules, for one release)

_moved.install()
