"""DiffRate: differentiable compression rates for pruning and merging.

Chen et al., "DiffRate: Differentiable Compression Rate for Efficient Vision Transformers",
ICCV 2023, arXiv 2305.17997, https://github.com/OpenGVLab/DiffRate (``DiffRate/patch/deit.py``,
``DiffRate/ddp.py``, ``DiffRate/merge.py``, ``DiffRate/utils.py``, ``engine.py``, ``main.py``).

Modifications (inference, :meth:`DiffRate.patch`):
 - between attention and MLP of every block whose schedule shrinks, sorts the non-prefix tokens by
   the class token's attention (softmax row of the block's attention with its size bias, averaged
   over heads), keeps the first ``prune_kept`` tokens, then merges the tokens ranked between
   ``merge_kept`` and ``prune_kept`` into their most similar kept token: cosine similarity of the
   block's features ``x`` (the residual stream after attention, as the official code; not keys);
 - the merge is an unweighted mean of a kept token and its sources (official ``mode="mean"``); the
   kept token's size grows by each source's size times its similarity (official "proportional
   attention considering similarity"); a negative similarity adds nothing (clamped at 0; the
   official code lets it subtract, which can make a size non-positive);
 - proportional attention (log size) is always on; average-pooling heads weight tokens by size;
 - prefix tokens (class, distillation, registers) stay first and never receive a merge; the
   official code protects the class token only (a distillation token would be sorted and pruned);
 - the schedule is two lists of kept counts per block, prefix included, one entry per block with
   the first block's entry the full count (``compression_rate.json``, official ``set_kept_num``);
   tokens leaving block i are ``min(entering, prune_kept[i], merge_kept[i])``, which is what the
   official forward does when a list is not decreasing;
 - blocks that shrink nothing run unpatched (the official sorts there too; order is invisible).

Schedules come from the search (default, ``schedules = "search"``: the runner calls
:meth:`DiffRate.calibrate` first) or from published lists (``schedules = "published"`` reads
``<data_root>/diffrate/compression_rate.json``, any other value is a JSON file of that format).
Published entries are picked by model key (``model_key`` option, else inferred from the
architecture) and by the FLOPs key closest to the knob's target GMACs.

The search (:func:`search_rates`), as the official training with frozen weights:
 - each compressible block (all but the first; MAE-style average-pool models also not the last, as
   the official MAE patch) has two learnable distributions (prune, merge) over candidate kept
   counts ``num_patches, num_patches - granularity, ...`` (granularity 4); the kept count is
   ``ceil(E[count]) + num_prefix`` with a straight-through ceil;
 - tokens are masked, not removed: a kept/dropped 0/1 mask with the straight-through gradient of
   the probability that each sorted position is kept (official ``get_token_mask``) enters attention
   as ``log(size * mask)`` through the seam's size bias, floored at 1e-6 so the gradient is the
   official multiplicative-mask gradient (the limit of d/dm of the masked softmax) with no NaN;
 - loss = cross-entropy (label smoothing 0.1) + 5 x (GMACs - target)^2; the GMACs are
   :func:`harness.schedule.analytic_gmacs` of the counts, with the official straight-through min
   (gradient to both counts of a block); AdamW (no weight decay) on the rate logits only, learning
   rate 0.01 -> 0.001 by a per-step cosine (the official steps per epoch), 3 epochs by default;
 - deviations: no mixup / cutmix / RandAugment and no drop-path (the harness hands over the model's
   eval transform and an eval-mode model); unlabelled (synthetic) data uses the unpatched model's
   predictions as labels (the runner refuses a search on synthetic data as ``unsupported``; this
   path is for tests); sorting puts masked tokens last even if a kept token's attention is lower;
 - deviation, the start (``init = "budget"``, default): both distributions of each searched block
   start as a discretised Gaussian (width 3 candidates) around the uniform-rate schedule that meets
   the target (:func:`uniform_rate_start`: every searched block removes the same number of tokens).
   The official start, uniform over the candidates (about 100 kept tokens per block on DeiT), lies
   below a 0.9 budget; with three ImageNet epochs it climbs back, with a CPU-scale search (hundreds
   of steps) it does not (deit_small at 0.9 ended at 2.73 for a 4.14 GMACs target).
   ``init = "uniform"`` is the official start;
 - deviation, landing (``land = true``, default): the learned counts are shifted, all searched blocks
   by the same whole number of tokens, to the schedule whose analytic GMACs are closest to the target
   (:func:`land_on_target`); the record keeps ``search_gmacs_learned`` (before) and ``landing_shift``.
   The official code has no such step: it relies on the FLOPs term, which leaves a few percent.

Options (``[methods.diffrate]``): ``schedules`` ("search" | "published" | a JSON path), ``model_key``
(the file's model key, needed for ViT-B whose DeiT and MAE entries share a shape; models of another
shape ignore a published key, so one suite can mix them), and the search's
``epochs`` (3, the paper's), ``lr`` (0.01), ``min_lr`` (0.001), ``batch_size`` (64; the paper's 256
per GPU is more than a CPU search can afford, and fewer images need more, smaller steps),
``granularity`` (4), ``flops_weight`` (5), ``smoothing`` (0.1), ``seed`` (0), ``init`` ("budget" |
"uniform"), ``land`` (true). A search is cached in
the runner's cache folder under the hash of the data key, the target and these options.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from harness import progress
from harness.errors import HarnessError, UnsupportedModel
from harness.registry import Knob, Method, register_method
from harness.schedule import ArchSpec, Schedule, analytic_gmacs, block_macs
from harness.seam import BlockContext, gather_tokens, install

log = logging.getLogger(__name__)

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
MASK_FLOOR = 1e-6  # a masked token's weight in attention: small, but its log and gradient are finite

Count = Union[float, torch.Tensor]


# ---------------------------------------------------------------- schedules -------------------

def tokens_after(tokens_in: int, prune: Sequence[int], merge: Sequence[int]) -> tuple[int, ...]:
    """Tokens leaving each block: ``min(entering, prune[i], merge[i])``."""
    tokens, out = tokens_in, []
    for p, m in zip(prune, merge):
        tokens = min(tokens, int(p), int(m))
        out.append(tokens)
    return tuple(out)


def _value(t: Count) -> float:
    return float(t.detach()) if isinstance(t, torch.Tensor) else float(t)


def _grad_part(t: Count) -> Count:
    """Zero in value, ``t``'s gradient path: adding it makes a straight-through estimator."""
    return t - t.detach() if isinstance(t, torch.Tensor) else 0.0


def soft_gmacs(arch: ArchSpec, prune: Sequence[Count], merge: Sequence[Count]) -> Count:
    """:func:`harness.schedule.analytic_gmacs` of kept counts that may carry gradients.

    The tokens leaving a block are the min of what entered and the block's two counts, with the
    official straight-through min: its gradient goes to both counts, none to what entered.
    """
    n: Count = float(arch.tokens_in)
    total: Count = float(arch.stem_macs + arch.head_macs)
    for p, m in zip(prune, merge):
        n_out = min(_value(n), _value(p), _value(m)) + _grad_part(p) + _grad_part(m)
        total = total + block_macs(arch, n, n_out)
        n = n_out
    return total / 1e9


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


# ---------------------------------------------------------------- token selection and merging --

def attentive_order(cls_attn: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Token order (B, N): prefix tokens first, then the rest by descending class attention."""
    order = cls_attn[:, num_prefix:].argsort(dim=1, descending=True, stable=True) + num_prefix
    prefix = torch.arange(num_prefix, device=order.device).expand(order.shape[0], -1)
    return torch.cat([prefix, order], 1)


def match_similar(metric: torch.Tensor, kept: int, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each token from ``kept`` on, its most similar token before ``kept`` (cosine).

    Args:
        metric: (B, N, C) features of the sorted tokens.
        kept: tokens that stay; those after it are merged away.
        num_prefix: leading tokens that never receive a merge.

    Returns:
        ``dst`` (B, N - kept) the receiving index and ``sim`` (B, N - kept) the similarity.
    """
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, kept:] @ metric[:, :kept].transpose(1, 2)
        scores[..., :num_prefix] = -math.inf
        sim, dst = scores.max(dim=-1)
    return dst, sim


def merge_mean(x: torch.Tensor, kept: int, dst: torch.Tensor) -> torch.Tensor:
    """The first ``kept`` tokens, each averaged (unweighted) with the tokens merged into it."""
    src = x[:, kept:]
    index = dst.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    return x[:, :kept].scatter_reduce(1, index, src, reduce="mean", include_self=True)


def merge_size(size: torch.Tensor, kept: int, dst: torch.Tensor, sim: torch.Tensor,
               floor: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sizes after merging: each kept token adds its sources' sizes times their similarity.

    Args:
        size: (B, N, 1) sizes of the sorted tokens.
        floor: the least a source adds (0 at inference; the official search clamps at 1).

    Returns:
        The kept tokens' new sizes (B, kept, 1) and the sources' scaled sizes (B, N - kept, 1).
    """
    src = (size[:, kept:] * sim.unsqueeze(-1).to(size.dtype)).clamp(min=floor)
    head = size[:, :kept].clamp(min=floor) if floor > 0 else size[:, :kept]
    return head.scatter_reduce(1, dst.unsqueeze(-1), src, reduce="sum"), src


def prune_and_merge(x: torch.Tensor, size: Optional[torch.Tensor], cls_attn: torch.Tensor, prune: int,
                    merge: int, num_prefix: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """DiffRate's inference step on (B, N, C) tokens: sort, keep ``prune``, merge down to ``merge``.

    ``size`` None means every token is one patch; it stays None until something merges.
    """
    order = attentive_order(cls_attn, num_prefix)
    keep = min(x.shape[1], prune)
    x = gather_tokens(x, order)[:, :keep]
    size = None if size is None else gather_tokens(size, order)[:, :keep]
    if merge < keep:
        dst, sim = match_similar(x, merge, num_prefix)
        size = size if size is not None else torch.ones_like(x[..., :1])
        x = merge_mean(x, merge, dst)
        size, _ = merge_size(size, merge, dst, sim)
    return x, size


def diffrate_reducer(prune: int, merge: int) -> Callable[[torch.Tensor, BlockContext], torch.Tensor]:
    """The seam reducer of one block at fixed kept counts."""

    def reduce(x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        x, ctx.state.size = prune_and_merge(x, ctx.state.size, ctx.cls_attn(), prune, merge, ctx.num_prefix)
        return x

    return reduce


# ---------------------------------------------------------------- differentiable rates --------

def ste_ceil(x: torch.Tensor) -> torch.Tensor:
    """ceil(x) with the gradient of x (official ``STE_Ceil``)."""
    return x + (torch.ceil(x) - x).detach()


def kept_probability(probs: torch.Tensor, candidates: torch.Tensor, num_tokens: int, num_prefix: int) -> torch.Tensor:
    """Probability (num_tokens,) that each sorted position is kept when ``candidates[k]`` patch
    tokens (plus the prefix) are kept with probability ``probs[k]`` (official ``get_token_probability``)."""
    position = torch.arange(num_tokens, device=probs.device, dtype=probs.dtype)
    return ((candidates + num_prefix).unsqueeze(-1) > position).to(probs.dtype).T @ probs


def step_mask(kept: int, upto: int, keep_prob: torch.Tensor) -> torch.Tensor:
    """0 at positions [kept, upto), else 1, with the gradient of ``keep_prob`` (official ``get_token_mask``)."""
    hard = torch.ones_like(keep_prob)
    hard[kept:upto] = 0
    return hard + _grad_part(keep_prob)


def floored(mask: torch.Tensor, floor: float = MASK_FLOOR) -> torch.Tensor:
    """``mask`` clamped at ``floor`` in value, with the unclamped gradient.

    ``log(floored(m))`` is then finite with gradient 1/max(m, floor): softmax(logits + log m) has
    the official multiplicative mask's value (to within ``floor``) and gradient, without 0 x inf.
    """
    return mask + (mask.clamp(min=floor) - mask).detach()


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim with columns weighted by ``mask`` as the search's attention does."""
    return (logits + floored(mask).log()).softmax(-1)


def uniform_rate_start(arch: ArchSpec, blocks: Sequence[int], target_gmacs: float) -> list[float]:
    """Kept patch tokens per searched block of the uniform-rate schedule that meets ``target_gmacs``.

    Each searched block removes the same (real) number ``r`` of patch tokens, as ToMe's constant
    ``r``; ``r`` is bisected on the analytic GMACs. This is the search's start (``init = "budget"``).
    """
    full = float(arch.tokens_in)

    def counts(r: float) -> list[float]:
        return [max(1.0, arch.num_patches - r * (j + 1)) for j in range(len(blocks))]

    def gmacs(r: float) -> float:
        kept = dict(zip(blocks, counts(r)))
        per_block = [kept[i] + arch.num_prefix if i in kept else full for i in range(arch.depth)]
        return float(soft_gmacs(arch, per_block, per_block))

    lo, hi = 0.0, float(arch.num_patches)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gmacs(mid) > target_gmacs else (lo, mid)
    return counts(hi)


def peaked_logits(candidates: torch.Tensor, centre: float, width: float) -> torch.Tensor:
    """Logits of a discretised Gaussian over ``candidates`` around ``centre``: a start near a schedule
    that still spreads mass over neighbours, so the gradient can move it (a one-hot start cannot)."""
    return -0.5 * ((candidates - centre) / width) ** 2


class Rates(torch.nn.Module):
    """The learnable prune and merge distributions of the searched blocks.

    ``start`` (kept patch tokens per searched block) centres both distributions of a block there;
    None is the official uniform distribution over the candidates.
    """

    def __init__(self, arch: ArchSpec, blocks: Sequence[int], granularity: int,
                 start: Optional[Sequence[float]] = None):
        super().__init__()
        self.arch, self.blocks = arch, list(blocks)
        self.register_buffer("candidates", torch.arange(arch.num_patches, 0, -granularity, dtype=torch.float32))
        if start is None:
            init = [torch.zeros(len(self.candidates)) for _ in range(2 * len(self.blocks))]
        else:
            width = 3.0 * granularity
            init = [peaked_logits(self.candidates, c, width) for c in start for _ in ("prune", "merge")]
        self.logits = torch.nn.ParameterList([torch.nn.Parameter(t) for t in init])
        self.enabled = True
        self.refresh()

    def refresh(self) -> None:
        """Recompute the kept counts and position probabilities from the current logits (once a step)."""
        self.probs, self.counts = {}, {}
        for j, block in enumerate(self.blocks):
            for kind, logits in (("prune", self.logits[2 * j]), ("merge", self.logits[2 * j + 1])):
                p = logits.softmax(-1)
                self.probs[block, kind] = kept_probability(p, self.candidates, self.arch.tokens_in, self.arch.num_prefix)
                self.counts[block, kind] = ste_ceil(self.candidates @ p) + self.arch.num_prefix

    def per_block(self) -> tuple[list[Count], list[Count]]:
        """Prune and merge counts of every block (the full count where nothing is searched)."""
        full = float(self.arch.tokens_in)
        prune = [self.counts.get((i, "prune"), full) for i in range(self.arch.depth)]
        merge = [self.counts.get((i, "merge"), full) for i in range(self.arch.depth)]
        return prune, merge

    def hard(self) -> tuple[list[int], list[int]]:
        prune, merge = self.per_block()
        return [int(_value(p)) for p in prune], [int(_value(m)) for m in merge]

    def reducer(self, block: int) -> Callable[[torch.Tensor, BlockContext], torch.Tensor]:
        """The search-time reducer: masks instead of removing, so shapes stay static."""

        def reduce(x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
            if not self.enabled:
                return x
            if block == self.blocks[0]:
                self.mask, self.size = torch.ones_like(x[..., 0]), torch.ones_like(x[..., :1])
            x = self._mask_tokens(x, ctx, block)
            ctx.state.size = self.size * floored(self.mask).unsqueeze(-1)
            return x

        return reduce

    def _mask_tokens(self, x: torch.Tensor, ctx: BlockContext, block: int) -> torch.Tensor:
        pre = ctx.num_prefix
        with torch.no_grad():
            # masked tokens last: the official relies on their near-zero attention for this
            order = attentive_order(ctx.cls_attn().masked_fill(self.mask == 0, -1.0), pre)
        x, self.size = gather_tokens(x, order), gather_tokens(self.size, order)
        self.mask = self.mask.gather(1, order)
        last = int(self.mask[0].detach().sum())
        prune = int(_value(self.counts[block, "prune"]))
        if prune < last:
            self.mask = self.mask * step_mask(prune, last, self.probs[block, "prune"])
        mid = min(last, prune)
        merge = int(_value(self.counts[block, "merge"]))
        if merge < mid:
            dst, sim = match_similar(x[:, :mid].detach(), merge, pre)
            x = torch.cat([merge_mean(x[:, :mid], merge, dst), x[:, merge:]], 1)
            head, src = merge_size(self.size[:, :mid], merge, dst, sim, floor=1.0)
            self.size = torch.cat([head, src, self.size[:, mid:]], 1)
            self.mask = self.mask * step_mask(merge, mid, self.probs[block, "merge"])
        return x


def land_on_target(arch: ArchSpec, prune: list[int], merge: list[int], blocks: Sequence[int],
                   target_gmacs: float) -> tuple[list[int], list[int], int]:
    """Shift every searched block's two counts by one whole number of tokens so the schedule's
    analytic GMACs land as close to ``target_gmacs`` as whole tokens allow.

    The searched shape (which blocks keep more, how pruning and merging share the work) is kept;
    only its level moves. Returns the shifted counts and the shift.
    """
    searched = set(blocks)
    low, high = arch.num_prefix + 1, arch.tokens_in

    def shifted(delta: int) -> tuple[list[int], list[int]]:
        move = [lambda c, i=i: min(high, max(low, c + delta)) if i in searched else c for i in range(arch.depth)]
        return [move[i](p) for i, p in enumerate(prune)], [move[i](m) for i, m in enumerate(merge)]

    def gmacs(delta: int) -> float:
        return analytic_gmacs(arch, Schedule(arch.tokens_in, tokens_after(arch.tokens_in, *shifted(delta))))

    lo, hi = -arch.tokens_in, arch.tokens_in  # gmacs(delta) never decreases with delta
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if gmacs(mid) <= target_gmacs else (lo, mid)
    best = min((lo, hi), key=lambda d: (abs(gmacs(d) - target_gmacs), abs(d)))
    return (*shifted(best), best)


def searched_blocks(model) -> list[int]:
    """Blocks whose rates are learned: all but the first (and the last for average-pool heads)."""
    depth = len(model.blocks)
    avg_pool = getattr(model, "global_pool", "token") == "avg"
    return [i for i in range(1, depth) if not (avg_pool and i == depth - 1)]


def _cosine_lr(step: int, total: int, lr: float, min_lr: float) -> float:
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * step / max(total, 1)))


def _batch(train, index: torch.Tensor, device: torch.device):
    return train.take(index, device)


def _teacher_labels(model, rates: Rates, x: torch.Tensor, device: torch.device, dtype: str) -> torch.Tensor:
    """The unpatched model's predictions, the labels of unlabelled (synthetic) search data."""
    from harness.measure import autocast

    rates.enabled = False
    try:
        with torch.no_grad(), autocast(device, dtype):
            return model(x).argmax(-1)
    finally:
        rates.enabled = True


def _search_step(model, rates: Rates, optimizer, x, y, target_gmacs: float, opts: dict, device, dtype) -> tuple:
    """One AdamW step on the rate logits; returns the task loss and the differentiable GMACs."""
    from harness.measure import autocast

    rates.refresh()
    with autocast(device, dtype):
        logits = model(x)
    task = F.cross_entropy(logits.float(), y, label_smoothing=float(opts["smoothing"]))
    gmacs = soft_gmacs(rates.arch, *rates.per_block())
    loss = task + float(opts["flops_weight"]) * (gmacs - target_gmacs) ** 2
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return task.item(), _value(gmacs)


def search_rates(model, arch: ArchSpec, target_gmacs: float, train, device: torch.device, dtype: str,
                 opts: dict) -> dict:
    """Learn per-block kept counts for ``target_gmacs`` on ``train`` with ``model``'s weights frozen.

    ``model`` is patched for the search and must not be reused. Returns the found counts and stats.
    """
    model.eval().requires_grad_(False)
    blocks = searched_blocks(model)
    start = uniform_rate_start(arch, blocks, target_gmacs) if opts["init"] == "budget" else None
    rates = Rates(arch, blocks, int(opts["granularity"]), start).to(device)
    install(model, {i: rates.reducer(i) for i in rates.blocks}, prop_attn=True, needs_class_token=True, merges=True,
            method="diffrate")
    optimizer = torch.optim.AdamW(rates.parameters(), lr=opts["lr"], weight_decay=0.0)
    n, bs, epochs = len(train), int(opts["batch_size"]), int(opts["epochs"])
    per_epoch = math.ceil(n / bs)
    total = per_epoch * epochs
    gen = torch.Generator().manual_seed(int(opts["seed"]))
    due = progress.Throttle()
    for step in range(total):
        if step % per_epoch == 0:
            perm = torch.randperm(n, generator=gen)  # a shuffled pass: the train split is class-sorted
        x, y = _batch(train, perm[(step % per_epoch) * bs:(step % per_epoch + 1) * bs], device)
        y = _teacher_labels(model, rates, x, device, dtype) if y is None else y
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, total, opts["lr"], opts["min_lr"])
        task, gmacs = _search_step(model, rates, optimizer, x, y, target_gmacs, opts, device, dtype)
        if step % 10 == 0 or step == total - 1:
            log.debug("diffrate search step %d/%d: task loss %.4f, gmacs %.4f (target %.4f)",
                      step + 1, total, task, gmacs, target_gmacs)
        if due(last=step == total - 1):
            progress.report("diffrate search step %d/%d: task loss %.3f, %.3f GMACs (target %.3f)",
                            step + 1, total, task, gmacs, target_gmacs)
    rates.refresh()
    prune, merge = rates.hard()
    found = {"search_images": n * epochs, "search_steps": total, "search_epochs": epochs,
             "search_gmacs_learned": round(analytic_gmacs(arch, Schedule(arch.tokens_in, tokens_after(
                 arch.tokens_in, prune, merge))), 4), "landing_shift": 0}
    if opts["land"]:
        prune, merge, found["landing_shift"] = land_on_target(arch, prune, merge, blocks, target_gmacs)
    return {"prune_kept": prune, "merge_kept": merge, **found}


# ---------------------------------------------------------------- the plugin ------------------

SEARCH_DEFAULTS = {"epochs": 3, "lr": 0.01, "min_lr": 0.001, "batch_size": 64, "granularity": 4,
                   "flops_weight": 5.0, "smoothing": 0.1, "seed": 0, "init": "budget", "land": True}
INITS = ("budget", "uniform")


@register_method
class DiffRate(Method):
    """DiffRate: searched per-block prune and merge rates (Chen et al., ICCV 2023)."""

    name = "diffrate"
    needs_class_token = True
    merges = True
    version = "2"  # 2: the search starts at the budget and lands on it
    knob = Knob("gmacs_ratio", float, 0.05, 1.0, identity=1.0)
    needs_calibration = True

    @classmethod
    def option_names(cls) -> list[str]:
        return ["schedules", "model_key", *SEARCH_DEFAULTS]

    def __init__(self, **options):
        super().__init__(**options)
        self.source = str(self.options.get("schedules", "search"))
        self.needs_calibration = self.source == "search"
        self.search_options = {k: type(v)(self.options.get(k, v)) for k, v in SEARCH_DEFAULTS.items()}
        if self.search_options["init"] not in INITS:
            raise HarnessError(f"diffrate: init must be one of {', '.join(INITS)}, got {self.search_options['init']!r}")
        self._found: dict[tuple, tuple[list[int], list[int]]] = {}
        self._published: Optional[dict] = None

    def resolved_options(self) -> dict:
        out = {"schedules": self.source, **({"model_key": self.options["model_key"]} if "model_key" in self.options else {})}
        return {**out, **self.search_options} if self.needs_calibration else out

    # -- schedules ---------------------------------------------------------------------------

    def counts(self, arch: ArchSpec, value: float) -> Optional[tuple[list[int], list[int]]]:
        """Prune and merge kept counts per block at knob ``value`` (None: the unpatched model)."""
        if value is None or value >= self.knob.identity:
            return None
        if self.source != "search":
            return self.published_entry(arch, value)[2:]
        found = self._found.get(self._found_key(arch, value))
        if found is None:
            raise HarnessError(f"diffrate has no searched schedule at gmacs_ratio={value}: run calibrate() first "
                               f"(the runner does), or set [methods.diffrate] schedules = \"published\"")
        return found

    def schedule(self, arch: ArchSpec, value: float) -> Schedule:
        counts = self.counts(arch, value)
        if counts is None:
            return Schedule.full(arch)
        return Schedule(arch.tokens_in, tokens_after(arch.tokens_in, *counts))

    def patch(self, model, value: float, arch: ArchSpec) -> None:
        counts = self.counts(arch, value)
        reducers = {}
        if counts is not None:
            if self.source != "search":
                key, flops = self.published_entry(arch, value)[:2]
                log.info("diffrate: published schedule %s at %s GFLOPs from %s", key, flops, self.published_path())
            entering = (arch.tokens_in,) + tokens_after(arch.tokens_in, *counts)
            reducers = {i: diffrate_reducer(p, m) for i, (p, m) in enumerate(zip(*counts)) if min(p, m) < entering[i]}
        install(model, reducers, prop_attn=True, needs_class_token=self.needs_class_token, merges=self.merges,
                method=self.name)

    # -- published lists ---------------------------------------------------------------------

    def published_path(self) -> Path:
        """The JSON file of published (or the user's own) kept-count lists."""
        if self.source == "published":
            from harness.paths import data_root

            return data_root() / "diffrate" / "compression_rate.json"
        return Path(self.source).expanduser()

    def published_entry(self, arch: ArchSpec, value: float) -> tuple[str, str, list[int], list[int]]:
        """(model key, FLOPs key, prune counts, merge counts) of the entry closest to ``value`` x baseline."""
        if self._published is None:
            path = self.published_path()
            if not path.is_file():
                raise HarnessError(f"diffrate schedules file not found: looked for {path}")
            self._published = json.loads(path.read_text())
        key = self.options.get("model_key")
        shape = (arch.depth, arch.attn_dim, arch.num_patches)
        if key is None or key not in _KEY_SHAPES.get(shape, [key]) and any(key in ks for ks in _KEY_SHAPES.values()):
            # model_key settles ViT-B's DeiT-or-MAE question; a published key of another shape does
            # not apply to this model (a suite of several models shares the option)
            key = model_key_for(arch)
        if key not in self._published:
            raise HarnessError(f"diffrate: {self.published_path()} has no model {key!r}; has {sorted(self._published)}")
        entries = self._published[key]
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

    def describe(self, arch: ArchSpec, value: float) -> dict:
        """Record fields saying where the schedule at ``value`` came from."""
        if self.source == "search" or value is None or value >= 1.0:
            return {"schedule_source": self.source}
        key, flops = self.published_entry(arch, value)[:2]
        return {"schedule_source": self.source, "published_model": key, "published_gflops": flops}

    # -- the search --------------------------------------------------------------------------

    @staticmethod
    def _found_key(arch: ArchSpec, value: float) -> tuple:
        return (arch, round(float(value), 6))

    def cache_key(self, data_key: dict, value: float) -> str:
        """Hash of what determines a search's result."""
        key = {"data": data_key, "gmacs_ratio": round(float(value), 6), "search": self.search_options,
               "method_version": self.version}
        return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def calibrate(self, model, value, arch, data, cache_dir) -> dict:
        """Search the kept counts for ``value`` x baseline GMACs, or reuse the cached search."""
        if not self.needs_calibration or value >= self.knob.identity:
            return {}
        path = Path(cache_dir) / f"{self.cache_key(data.key, value)}.json"
        cached = path.is_file() and not data.force
        if cached:
            found = json.loads(path.read_text())
        else:
            target = value * analytic_gmacs(arch, Schedule.full(arch))
            start = time.perf_counter()
            found = search_rates(model, arch, target, data.train, data.device, data.dtype, self.search_options)
            found.update(search_s=round(time.perf_counter() - start, 3), search_gmacs_target=round(target, 4),
                         search_key=path.stem)
            path.write_text(json.dumps(found, indent=1))
        self._found[self._found_key(arch, value)] = (found["prune_kept"], found["merge_kept"])
        gmacs = analytic_gmacs(arch, self.schedule(arch, value))
        return {**{k: found.get(k) for k in ("search_s", "search_images", "search_epochs", "search_steps",
                                             "search_gmacs_target", "prune_kept", "merge_kept", "search_key",
                                             "search_gmacs_learned", "landing_shift")},
                "search_cached": cached, "search_gmacs": round(gmacs, 4)}
