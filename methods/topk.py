"""Top-K: EViT without fusion, the attentive-token baseline.

Haurum et al., "Which Tokens to Use? Investigating Token Reduction in Vision Transformers",
ICCVW 2023, arXiv 2308.04657, https://github.com/JoakimHaurum/TokenReduction; the selection is
EViT's (Liang et al., ICLR 2022, arXiv 2202.07800, https://github.com/youweiliang/evit).

Modifications: as :mod:`methods.evit` with ``fuse`` fixed off: at the drop blocks, keeps the
ceil(keep_rate x non-prefix tokens) tokens the class token attends to most (descending attention
order) and drops the rest; prefix tokens always stay.
"""
from __future__ import annotations

from harness.registry import register_method
from harness.methods.evit import EViT


@register_method
class TopK(EViT):
    """Top-K: keep the tokens the class token attends to most, drop the rest (EViT without fusion)."""

    name = "topk"
    version = "1"

    option_defaults = {"drop_loc": None}
    implicit_defaults = {"drop_loc": None}  # ids stored before defaults were filled

    @property
    def fuse(self) -> bool:
        return False
