"""DiffRate's published schedules: the authors' ``compression_rate.json`` (or a file of its format).

Entries are picked by model key (the ``model_key`` option, else inferred from the architecture's
shape) and by the FLOPs key closest to the knob's target GMACs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from harness.errors import HarnessError, UnsupportedModel
from harness.schedule import ArchSpec, Schedule, analytic_gmacs

# The official model names -> compression_rate.json keys, and the architecture each key is.
PUBLISHED_KEYS = {
    "deit_tiny_patch16_224": "ViT-T-DeiT", "deit_small_patch16_224": "ViT-S-DeiT",
    "deit_base_patch16_224": "ViT-B-DeiT", "vit_base_patch16_224.mae": "ViT-B-MAE",
    "vit_large_patch16_224.mae": "ViT-L-MAE", "vit_huge_patch14_224.mae": "ViT-H-MAE",
}
_KEY_SHAPES = {  # (depth, width, patches) -> keys; ViT-B DeiT and MAE share a shape
    (12, 192, 196): ["ViT-T-DeiT"], (12, 384, 196): ["ViT-S-DeiT"],
    (12, 768, 196): ["ViT-B-DeiT", "ViT-B-MAE"], (24, 1024, 196): ["ViT-L-MAE"],
    (32, 1280, 256): ["ViT-H-MAE"],
}


def parse_counts(text) -> Optional[list[int]]:
    """A kept-count list as the published file writes it (``"[197,196,...]"`` or ``"None"``)."""
    if text is None or text == "None":
        return None
    return [int(v) for v in (json.loads(text) if isinstance(text, str) else text)]


def model_key_for(arch: ArchSpec) -> str:
    """The published file's model key for ``arch``'s shape; ViT-B (DeiT or MAE) needs ``model_key``."""
    keys = _KEY_SHAPES.get((arch.depth, arch.attn_dim, arch.num_patches), [])
    if len(keys) != 1:
        why = f"ambiguous ({' or '.join(keys)})" if keys else "not in the published file"
        raise HarnessError(f"diffrate: published schedules for a {arch.depth}-block, {arch.attn_dim}-wide ViT are "
                           f"{why}: set [methods.diffrate] model_key")
    return keys[0]


def closest_entry(entries: dict, target_gmacs: float) -> str:
    """The FLOPs key (e.g. ``"2.9"``) closest to ``target_gmacs``."""
    return min(entries, key=lambda k: (abs(float(k) - target_gmacs), float(k)))


def schedules_path(source: str) -> Path:
    """The JSON file of published (``source`` "published") or the user's own kept-count lists."""
    if source == "published":
        from harness.paths import data_root

        return data_root() / "diffrate" / "compression_rate.json"
    return Path(source).expanduser()


class PublishedSchedules:
    """The kept-count lists of one file, read when first asked for."""

    def __init__(self, path: Path, model_key: Optional[str] = None):
        self.path, self.model_key = path, model_key
        self._entries: Optional[dict] = None

    def _load(self) -> dict:
        if self._entries is None:
            if not self.path.is_file():
                raise HarnessError(f"diffrate schedules file not found: looked for {self.path}")
            self._entries = json.loads(self.path.read_text())
        return self._entries

    def key_for(self, arch: ArchSpec) -> str:
        """The file's model key for ``arch``: ``model_key`` when it fits the shape, else inferred."""
        key = self.model_key
        shape = (arch.depth, arch.attn_dim, arch.num_patches)
        if key is None or key not in _KEY_SHAPES.get(shape, [key]) and any(key in ks for ks in _KEY_SHAPES.values()):
            # model_key settles ViT-B's DeiT-or-MAE question; a published key of another shape does
            # not apply to this model (a suite of several models shares the option)
            key = model_key_for(arch)
        return key

    def entry(self, arch: ArchSpec, value: float) -> tuple[str, str, list[int], list[int]]:
        """(model key, FLOPs key, prune counts, merge counts) of the entry closest to ``value`` x baseline."""
        published, key = self._load(), self.key_for(arch)
        if key not in published:
            raise HarnessError(f"diffrate: {self.path} has no model {key!r}; has {sorted(published)}")
        entries = published[key]
        # the budget solver rounds the knob to 6 digits after bisecting: map the rounded value, so
        # the entry it picked at the step's edge is the entry it gets
        flops = closest_entry(entries, round(float(value), 6) * analytic_gmacs(arch, Schedule.full(arch)))
        prune, merge = parse_counts(entries[flops]["prune_kept_num"]), parse_counts(entries[flops]["merge_kept_num"])
        if prune is None or len(prune) != arch.depth or len(merge) != arch.depth:
            raise HarnessError(f"diffrate: {key} @ {flops} does not give prune and merge counts for {arch.depth} blocks")
        if min(prune + merge) <= arch.num_prefix:
            raise HarnessError(f"diffrate: {key} @ {flops} keeps no patch token somewhere")
        if prune[0] != arch.tokens_in or merge[0] != arch.tokens_in:
            # every published list starts at its model's full count: one made for 197 tokens would
            # drop a patch in block 0 of a model with 198 (a distillation token)
            raise UnsupportedModel(f"diffrate: the {key} @ {flops} schedule was made for {prune[0]} tokens and this "
                                   f"model has {arch.tokens_in} ({arch.num_prefix} prefix tokens); it does not apply")
        return key, flops, prune, merge
