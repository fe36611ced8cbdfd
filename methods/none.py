"""Baseline: the unpatched model.

Modifications: none. Its schedule keeps every token in every block; every other method's
GMACs ratio and accuracy change are measured against it.
"""
from __future__ import annotations

from harness.registry import Method, register_method
from harness.schedule import Schedule


@register_method
class NoReduction(Method):
    """Baseline: the unpatched timm model, every token through every block."""

    name = "none"
    version = "1"
    cannot_train = None  # the plain fine-tune: what every reducing method's fine-tune is compared with

    def schedule(self, arch, value=None) -> Schedule:
        return Schedule.full(arch)

    def patch(self, model, value=None, arch=None) -> None:
        """Nothing to patch: the baseline runs timm's own forward."""
