"""Analytic GMACs and tokens per block of every method on DeiT-S at budget 0.7.

Deterministic (no forward pass, no timing), so any change between commits is a real change in a
method's schedule or in the budget solver, never noise. Methods without a knob (``none``) report
the baseline; methods that must search on data first (DiffRate) are skipped.
"""
from __future__ import annotations

from harness.schedule import arch_spec

from .common import METHODS, deit_s, solve


class ScheduleDeiTS:
    """GMACs and total tokens of each registered method at budget 0.7 on DeiT-S."""

    params = [METHODS]
    param_names = ["method"]

    def setup_cache(self):
        return arch_spec(deit_s())

    def setup(self, arch, method):
        self.resolved = solve(method, arch)

    def track_gmacs(self, arch, method):
        """Analytic GMACs of one image under the method's schedule at the budget."""
        return self.resolved.gmacs

    track_gmacs.unit = "GMACs"

    def track_tokens_total(self, arch, method):
        """Tokens leaving all blocks, summed: one number that moves when any block's count moves."""
        return float(sum(self.resolved.schedule.tokens_out))

    track_tokens_total.unit = "tokens"


class TokensPerBlockDeiTS:
    """Tokens leaving each block (prefix tokens included), one value per (method, block)."""

    params = [METHODS, list(range(12))]  # DeiT-S has 12 blocks
    param_names = ["method", "block"]

    def setup_cache(self):
        return arch_spec(deit_s())

    def setup(self, arch, method, block):
        self.resolved = solve(method, arch)

    def track_tokens_out(self, arch, method, block):
        return float(self.resolved.schedule.tokens_out[block])

    track_tokens_out.unit = "tokens"
