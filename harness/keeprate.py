"""A keep rate that training can warm up: what EViT-style drop blocks share (EViT, Top-K).

The paper (EViT, Liang et al., ICLR 2022, Sec. 3.3; official ``main.py`` ``adjust_keep_rate``) trains
with the reorganisation in place and the keep rate warmed up: 1 until ``--shrink_start_epoch`` 10,
then a cosine down to the target over ``--shrink_epochs`` 100, of 300 epochs, here as fractions of a
fine-tune's steps. Top-K (Haurum et al.) is trained with EViT's code, so with the same warm-up.
"""
from __future__ import annotations

import math


class KeepRate:
    """The keep rate a patched model's drop blocks read: fixed when measured, warmed up in training."""

    def __init__(self, value: float):
        self.value = value


class KeepRateWarmup:
    """Mixin for a :class:`harness.registry.Method` whose drop blocks read ``model._keep_rate``."""

    cannot_train = None
    keep_rate_warmup = (10 / 300, 110 / 300)

    def train_knob(self, value: float, done: float) -> float:
        """The keep rate after ``done`` (0..1) of the fine-tune: 1, then a cosine down to ``value``."""
        start, end = self.keep_rate_warmup
        if value >= 1.0 or done >= end:
            return value
        if done < start:
            return 1.0
        return value + (1.0 - value) * (math.cos((done - start) / (end - start) * math.pi) + 1) * 0.5

    def set_train_knob(self, model, value: float) -> None:
        model._keep_rate.value = value

    def training_identity(self) -> dict:
        return {"keep_rate_warmup": list(self.keep_rate_warmup)}

    @staticmethod
    def keep_rate(model, value: float) -> KeepRate:
        """The model's one keep rate, set to ``value`` (every drop block reads it)."""
        model._keep_rate = KeepRate(value)
        return model._keep_rate
