"""DiffRate's search: per-block prune and merge rates learned with the model's weights frozen.

As the official training (``DiffRate/ddp.py``, ``DiffRate/utils.py``, ``engine.py``, ``main.py``):
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
   rate 0.01 -> 0.001 by a per-step cosine (the official steps per epoch), 3 epochs by default.

The deviations (no augmentation, the start at the budget, the landing) are listed in the package's
docstring (:mod:`methods.diffrate`).
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from harness import progress
from harness.schedule import ArchSpec, Schedule, analytic_gmacs, block_macs
from harness.seam import BlockContext, gather_tokens, install

from .merge import attentive_order, match_similar, merge_mean, merge_size, tokens_after

log = logging.getLogger(__name__)

MASK_FLOOR = 1e-6  # a masked token's weight in attention: small, but its log and gradient are finite

Count = Union[float, torch.Tensor]


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
    from harness.measurement.measure import autocast

    rates.enabled = False
    try:
        with torch.no_grad(), autocast(device, dtype):
            return model(x).argmax(-1)
    finally:
        rates.enabled = True


def _search_step(model, rates: Rates, optimizer, x, y, target_gmacs: float, opts: dict, device, dtype) -> tuple:
    """One AdamW step on the rate logits; returns the task loss and the differentiable GMACs."""
    from harness.measurement.measure import autocast

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
                 opts: dict, report: Callable[..., None] = progress.report) -> dict:
    """Learn per-block kept counts for ``target_gmacs`` on ``train`` with ``model``'s weights frozen.

    ``model`` is patched for the search and must not be reused; ``report`` takes progress lines.
    Returns the found counts and stats.
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
            report("diffrate search step %d/%d: task loss %.3f, %.3f GMACs (target %.3f)",
                            step + 1, total, task, gmacs, target_gmacs)
    rates.refresh()
    prune, merge = rates.hard()
    found = {"search_images": n * epochs, "search_steps": total, "search_epochs": epochs,
             "search_gmacs_learned": round(analytic_gmacs(arch, Schedule(arch.tokens_in, tokens_after(
                 arch.tokens_in, prune, merge))), 4), "landing_shift": 0}
    if opts["land"]:
        prune, merge, found["landing_shift"] = land_on_target(arch, prune, merge, blocks, target_gmacs)
    return {"prune_kept": prune, "merge_kept": merge, **found}


SEARCH_DEFAULTS = {"epochs": 3, "lr": 0.01, "min_lr": 0.001, "batch_size": 64, "granularity": 4,
                   "flops_weight": 5.0, "smoothing": 0.1, "seed": 0, "init": "budget", "land": True}
INITS = ("budget", "uniform")
