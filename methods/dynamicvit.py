"""DynamicViT: a learned prediction module keeps the informative tokens, in three stages.

Rao et al., "DynamicViT: Efficient Vision Transformers with Dynamic Token Sparsification",
NeurIPS 2021, arXiv 2106.02034, https://github.com/raoyongming/DynamicViT (``models/dyvit.py``,
``losses.py``; checked against commit 1322e626d1e9eca18cc150569908fb4af29e15f7).

Modifications:
 - three prediction modules (the official ``PredictorLG``: LayerNorm, Linear, GELU; the first half
   of the channels per token, the second half averaged over the kept tokens; an MLP C -> C/2 -> C/4
   -> 2 to log-probabilities (keep, drop)) before blocks depth/4, 2 depth/4, 3 depth/4 (3, 6, 9 of
   12 as the official DeiT models, 4 / 8 / 12 of 16 and 5 / 10 / 15 of 20 as its LV-ViTs: block
   ``depth * k // 4`` for stage k). They run at the seam after the MLP of the block before (stage
   "post"), so that block is counted at its full tokens. On fewer than 4 blocks a stage placed before
   block 0 moves to block 1, and stages on one block become one that keeps the last one's ratio;
 - they are submodules of the model, ``model.score_predictor`` (the official name, so an official
   checkpoint's ``score_predictor.*`` keys load as they are), created at patch time and initialised
   as the official ``_init_weights`` (weights truncated normal, std 0.02; biases 0; LayerNorm 1 / 0)
   from a generator seeded by the option ``seed``: fine-tuning trains them, checkpoints save them;
 - inference (``model.eval()``): stage k keeps the ``int(N * rho ** k)`` patch tokens (N: the
   patches, 196 at 224 px; the official ``int(init_n * token_ratio[k])``, at least one) with the
   highest keep log-probability, in DESCENDING score order (the official ``argsort(descending=True)``
   gather), after the prefix tokens;
 - training (``model.train()``): nothing is dropped (static shapes): each stage draws a hard
   Gumbel-softmax keep mask (tau 1) from its predictor, multiplied by the previous stage's, and
   every later block's attention weights its keys by the mask, each token still attending to itself
   (the official ``softmax_with_policy``, :func:`harness.seam.policy_attention`);
 - training losses (:meth:`DynamicViT.training_loss`), added to the recipe's loss (its cross
   entropy and, with a teacher, DeiT's distillation): the keep-ratio loss (per image, the squared
   difference of the kept fraction and rho ** k, averaged over the batch, summed over the stages,
   divided by their number, weight 2.0), token distillation (MSE between the model's and the
   teacher's final tokens over the tokens the last mask keeps, weight 0.5) and the KL divergence of
   the logits from the teacher's (batch mean, weight 0.5): ``DistillDiffPruningLoss_dynamic`` with
   the official DeiT settings (``mse_token=True``, ``ratio_weight=2.0``, ``distill_weight=0.5``);
 - off the shelf the predictors are untrained, so the method is undefined there: its off-the-shelf
   cells are ``unsupported`` ("needs training"), its ``finetune:<recipe>`` cells ordinary rows.

Deviations:
 - prefix tokens (class, distillation, registers) are always kept, first; the official code has
   only the class token. A model without a class token (global pooling) has every token scored;
 - blocks before the first stage attend with a plain softmax while training; the official code
   runs ``softmax_with_policy`` with an all-ones policy there (1e-6 apart: its eps terms);
 - the recipe's loss is the harness's: its cross entropy mixed with DeiT's soft distillation when
   the recipe distils (``cpu-smoke``: alpha 0.5), to which the official logit KL is added, so the
   logits are distilled twice; the official loss is cross entropy (weight 1) plus the KL alone.
   Without a teacher (``distill = "none"``) only the keep-ratio loss is added;
 - GMACs include the predictors' linear layers on the patch tokens each scores
   (``Schedule.extra_macs``: 0.026 of DeiT-T's 0.801 GMACs at rho 0.7; the harness's fvcore count of
   the patched model is the same 0.801198).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from harness.margins import note_boundary
from harness.registry import Knob, Method, Premises, register_method
from harness.schedule import Schedule
from harness.seam import BlockContext, keep_tokens

RATIO_WEIGHT = 2.0    # main.py's --ratio_weight default
DISTILL_WEIGHT = 0.5  # DistillDiffPruningLoss_dynamic(distill_weight=0.5), for the logit KL and the tokens
STAGES = 3


class PredictorLG(nn.Module):
    """The official prediction module: per token, the log-probabilities (keep, drop), (B, N, 2)."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, embed_dim), nn.GELU())
        self.out_conv = nn.Sequential(nn.Linear(embed_dim, embed_dim // 2), nn.GELU(),
                                      nn.Linear(embed_dim // 2, embed_dim // 4), nn.GELU(),
                                      nn.Linear(embed_dim // 4, 2), nn.LogSoftmax(dim=-1))

    def forward(self, x: torch.Tensor, policy: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scores of the tokens ``x`` (B, N, C); ``policy`` (B, N, 1) weights the global average (None: all 1)."""
        x = self.in_conv(x)
        half = x.shape[-1] // 2
        local_x, global_x = x[..., :half], x[..., half:]
        if policy is None:
            global_x = global_x.mean(dim=1, keepdim=True)
        else:
            global_x = (global_x * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True)
        return self.out_conv(torch.cat([local_x, global_x.expand_as(local_x)], dim=-1))


class ScorePredictors(nn.ModuleList):
    """The model's predictors (``model.score_predictor``), each one's keep-ratio target (rho ** k), and
    what one training forward leaves for the losses: each stage's hard keep mask (B, N) and the
    model's final tokens."""

    def __init__(self, predictors, targets: list[float]):
        super().__init__(predictors)
        self.targets = targets
        self.decisions: list[torch.Tensor] = []
        self.final_tokens: Optional[torch.Tensor] = None


def init_official_(module: nn.Module, generator: torch.Generator) -> None:
    """The official ``_init_weights``: Linear weights truncated normal (std 0.02), biases 0, LayerNorm 1 / 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, generator=generator)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_uniform_(module: nn.Module, seed: int) -> None:
    """Linear weights and biases uniform in +-1/sqrt(fan_in), bit for bit the same on any CPU.

    A predictor whose scores are far from ties, for the golden check against the official code
    (the official initialisation scores every token within ~1e-3 of the others). Only exact
    operations follow the integer-derived draws in [0, 1): 2u - 1, then one product.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.in_features)
                for p in (m.weight, m.bias):
                    p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)


def state_sha256(module: nn.Module) -> str:
    """sha256 of ``module``'s parameters and buffers (names, then fp32 bytes), in state-dict order."""
    digest = hashlib.sha256()
    for key, value in module.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def stage_blocks(depth: int) -> dict[int, int]:
    """Block index -> stage k (1-based) of the predictor that runs before it: ``depth * k // 4``,
    at least block 1; stages on one block become the last of them (fewer than 4 blocks)."""
    return {max(1, depth * k // 4): k for k in range(1, STAGES + 1)}


def kept_patches(num_patches: int, rho: float, k: int) -> int:
    """Patch tokens stage k keeps: the official ``int(init_n * token_ratio[k])``, at least one."""
    return max(1, int(num_patches * rho ** k))


def predictor_macs_per_token(embed_dim: int) -> int:
    """Multiply-accumulates of :class:`PredictorLG`'s linear layers for one token (C -> C -> C/2 -> C/4 -> 2)."""
    c = embed_dim
    return c * c + c * (c // 2) + (c // 2) * (c // 4) + (c // 4) * 2


def keep_order(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """(B, keep) indices of the highest ``scores`` (B, N), highest first: the official
    ``torch.argsort(score, dim=1, descending=True)[:, :keep]``."""
    return torch.argsort(scores, dim=1, descending=True)[:, :keep]


def gumbel_keep(scores: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """A hard keep mask (B, N, 1) drawn from log-probabilities ``scores`` (B, N, 2) by the
    straight-through Gumbel softmax (tau 1), within the ``previous`` stage's mask (B, N, 1)."""
    return F.gumbel_softmax(scores, hard=True)[:, :, 0:1] * previous


def ratio_loss(decisions: list[torch.Tensor], targets: list[float]) -> torch.Tensor:
    """The official keep-ratio loss: per stage, mean over images of (kept fraction - target)^2;
    summed over the stages and divided by their number. ``decisions``: (B, N) masks."""
    total = sum(((d.mean(1) - t) ** 2).mean() for d, t in zip(decisions, targets))
    return total / len(decisions)


def token_distill_loss(tokens: torch.Tensor, teacher_tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE of ``tokens`` and ``teacher_tokens`` (B, N, C) over the tokens ``mask`` (B, N) keeps (0
    when it keeps none): the official masked ``pow(token_pred - token_t, 2).mean()``, without the
    boolean indexing (a host sync)."""
    kept = mask.detach().to(tokens.dtype).unsqueeze(-1)
    sq = ((tokens - teacher_tokens) ** 2 * kept).sum()
    return sq / (kept.sum() * tokens.shape[-1]).clamp_min(1.0)


def dynamicvit_reducer(predictors: ScorePredictors, index: int, keep: int) -> Callable:
    """The seam reducer of predictor ``index``: top-``keep`` pruning in eval mode, a Gumbel mask
    carried to the next blocks' attention (``state.policy``) while training."""
    predictor = predictors[index]

    def reduce(x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        p = ctx.num_prefix
        if predictor.training:
            return _mask_stage(x, ctx, predictors, index)
        scores = predictor(x[:, p:])[..., 0]
        note_boundary(scores, keep, "dynamicvit keep")
        return keep_tokens(ctx, x, keep_order(scores, keep) + p)

    return reduce


def _mask_stage(x: torch.Tensor, ctx: BlockContext, predictors: ScorePredictors, index: int) -> torch.Tensor:
    """Training: draw this stage's mask, record it, and set the policy the next blocks attend with."""
    p, state = ctx.num_prefix, ctx.state
    if index == 0:
        predictors.decisions = []
    ones = x.new_ones(x.shape[0], x.shape[1], 1)
    previous = (state.policy if state.policy is not None else ones)[:, p:]
    decision = gumbel_keep(predictors[index](x[:, p:], previous), previous)
    predictors.decisions.append(decision[..., 0])
    state.policy = torch.cat([ones[:, :p], decision], dim=1)
    return x


@register_method
class DynamicViT(Method):
    """DynamicViT: learned predictors keep rho, rho^2, rho^3 of the tokens at depth/4, /2, 3/4 (Rao et al., NeurIPS 2021)."""

    name = "dynamicvit"
    version = "1"
    knob = Knob("rho", float, 0.2, 1.0, identity=1.0)
    premises = Premises(tracks_positions=True)
    stage = "post"
    cannot_train = None  # the paper trains with the masks in place (its 30-epoch fine-tune)
    needs_training = "its prediction modules are learned (run it with --protocol finetune:<recipe>)"

    @dataclass(frozen=True)
    class Options:
        seed: int = 0  # seeds the predictors' initialisation (a cell's id includes it)

    def stages(self, depth: int) -> dict[int, int]:
        """Seam block (the block before the predictor's) -> stage k."""
        return {block - 1: k for block, k in stage_blocks(depth).items()}

    def schedule(self, arch, value: float) -> Schedule:
        if value >= 1.0:
            return Schedule.full(arch)
        stages, tokens, out, scored = self.stages(arch.depth), arch.tokens_in, [], 0
        for i in range(arch.depth):
            if i in stages:
                scored += tokens - arch.num_prefix  # each predictor scores the patch tokens it receives
                tokens = arch.num_prefix + kept_patches(arch.num_patches, value, stages[i])
            out.append(tokens)
        return Schedule(arch.tokens_in, tuple(out), stage=self.stage,
                        extra_macs=scored * predictor_macs_per_token(arch.embed_dim))

    def targets(self, arch, value: float) -> list[float]:
        """The keep-ratio loss's target of each predictor, in order: rho ** k."""
        return [value ** k for k in self.stages(arch.depth).values()]

    def reducers(self, model, arch, value: float) -> dict:
        """The predictors join ``model`` here (``model.score_predictor``: learned, so part of its weights);
        at the identity nothing is predicted, and the model stays the unpatched one, bit for bit."""
        if value >= 1.0:
            return {}
        stages = self.stages(arch.depth)
        predictors = ScorePredictors([PredictorLG(arch.embed_dim) for _ in stages], self.targets(arch, value))
        init_official_(predictors, torch.Generator().manual_seed(self.options.seed))
        predictors.train(model.training)  # a new module trains; the model it joins may not
        model.score_predictor = predictors
        model.norm.register_forward_hook(_keep_final_tokens(predictors))
        return {block: dynamicvit_reducer(predictors, i, kept_patches(arch.num_patches, value, k))
                for i, (block, k) in enumerate(stages.items())}

    def training_loss(self, model, step) -> Optional[torch.Tensor]:
        predictors = getattr(model, "score_predictor", None)
        if predictors is None:  # the identity: nothing predicts, nothing to add
            return None
        loss = RATIO_WEIGHT * ratio_loss(predictors.decisions, predictors.targets)
        if step.teacher_logits is None:
            return loss
        p = model.num_prefix_tokens
        kl = F.kl_div(F.log_softmax(step.logits, -1), F.log_softmax(step.teacher_logits, -1), reduction="batchmean",
                      log_target=True)
        tokens = token_distill_loss(predictors.final_tokens[:, p:], step.teacher_tokens[:, p:],
                                    predictors.decisions[-1])
        return loss + DISTILL_WEIGHT * kl + DISTILL_WEIGHT * tokens


def _keep_final_tokens(predictors: ScorePredictors) -> Callable:
    """A forward hook on the model's last norm: while training, its output is the token-distillation input."""

    def hook(module, inputs, output):
        if module.training:  # inference leaves the last training forward's tokens; only the loss reads them
            predictors.final_tokens = output

    return hook
