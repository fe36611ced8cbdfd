"""The common currency: per-block token schedules, and analytic GMACs computed from them.

Convention (the papers'): multiply-accumulates of the matmuls, attention included. A block that
receives ``n_in`` tokens and passes ``n_out`` on runs its attention (qkv, q@k, attn@v, proj) at
``n_in`` and its MLP at ``n_out`` when the method reduces between attention and MLP (stage
``"mid"``, most methods). A method that reduces after the MLP (``"post"``, DCT) runs both at
``n_in``; one that reduces before the attention from the block's own attention on the entering
tokens (``"pre"``, MCTF's one-step-ahead) runs the q/k projection and q@k at ``n_in`` and the rest
(v projection, attn@v, proj, MLP) at ``n_out``. Norms, softmax, GELU and the reduction's own work
(similarities, sorting) are not counted (fvcore's count of the patched model is recorded beside).
"""
from __future__ import annotations

from dataclasses import dataclass

from harness.errors import UnsupportedModel


@dataclass(frozen=True)
class ArchSpec:
    """What analytic GMACs need to know about a ViT, read off its modules.

    Attributes:
        depth: number of blocks.
        num_patches: patch tokens entering the first block.
        num_prefix: class / distillation / register tokens (never removed).
        attn_dim: heads x head_dim, the width of the q@k and attn@v matmuls.
        attn_linear_macs_per_token: qkv + proj MACs for one token.
        mlp_macs_per_token: MLP MACs for one token.
        stem_macs: patch embedding MACs for one image at the model's input size (``num_patches``
            patches; analytic GMACs scale it to the patches a schedule starts with).
        head_macs: classifier MACs for one image, with an attention-pool head's fixed part (its
            latent query, output projection and MLP).
        pool_macs_per_token: an attention-pool head's MACs per token it pools (the kv projection and
            the latent's q@k and attn@v); 0 for other heads. Scales with the last block's output.
        qk_macs_per_token: the q and k rows of the qkv projection for one token (part of
            ``attn_linear_macs_per_token``; the one-step-ahead attention of stage "pre" runs them
            on the entering tokens).
        fixed_macs: MACs that do not depend on the tokens: the relative-position MLPs of relpos
            ViTs, which compute each block's bias for the full grid (then gathered at the kept
            tokens' positions).
        embed_dim: the width of the tokens (the residual stream).
    """

    depth: int
    num_patches: int
    num_prefix: int
    attn_dim: int
    attn_linear_macs_per_token: int
    mlp_macs_per_token: int
    stem_macs: int
    head_macs: int
    pool_macs_per_token: int = 0
    qk_macs_per_token: int = 0
    fixed_macs: int = 0
    embed_dim: int = 0

    @property
    def tokens_in(self) -> int:
        """Tokens entering the first block (patches plus prefix tokens)."""
        return self.num_patches + self.num_prefix


STAGES = ("pre", "mid", "post")  # where a block reduces (harness.seam.STAGES is this tuple)


@dataclass(frozen=True)
class Schedule:
    """Tokens leaving each block (prefix tokens included). Floats allowed for image-dependent methods.

    ``stage`` says where in each block the reduction happens ("pre", "mid" or "post"; see the
    module docstring), which decides at which count each part of the block is paid for.
    ``extra_macs`` are the MACs per image of modules the method adds to the model (DynamicViT's
    prediction modules), paid on top of the blocks'.
    """

    tokens_in: int
    tokens_out: tuple[float, ...]
    stage: str = "mid"
    extra_macs: float = 0.0

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"unknown schedule stage {self.stage!r}; choices: {', '.join(STAGES)}")

    @classmethod
    def full(cls, arch: ArchSpec) -> "Schedule":
        """The schedule of the unpatched model: nothing removed anywhere."""
        return cls(arch.tokens_in, (arch.tokens_in,) * arch.depth)

    def tokens_entering(self, block: int) -> float:
        """Tokens entering ``block`` (0-based)."""
        return self.tokens_in if block == 0 else self.tokens_out[block - 1]

    def as_list(self) -> list[float]:
        return [int(t) if float(t).is_integer() else round(float(t), 2) for t in self.tokens_out]


def _linear_macs(module, exclude=None) -> int:
    """MACs per token of ``module``'s Linear layers, leaving out those inside ``exclude``."""
    import torch.nn as nn

    skip = set() if exclude is None else {id(m) for m in exclude.modules()}
    return sum(m.in_features * m.out_features for m in module.modules()
               if isinstance(m, nn.Linear) and id(m) not in skip)


def _attn_width(attn) -> int:
    """heads x head_dim of a ViT attention: from ``head_dim`` (timm's ViT, EVA, relpos) or, where the
    attention keeps none (BEiT), from its qkv projection (3 x heads x head_dim outputs)."""
    if getattr(attn, "head_dim", None):
        return int(attn.num_heads * attn.head_dim)
    qkv = getattr(attn, "qkv", None)
    if qkv is not None and hasattr(qkv, "out_features") and qkv.out_features % 3 == 0:
        return qkv.out_features // 3
    raise UnsupportedModel(f"{type(attn).__name__} has no head_dim and no fused qkv projection: its GMACs cannot be "
                           f"read analytically")


def _rel_pos_macs(model) -> int:
    """MACs of the relative-position MLPs (relpos ViTs' ``RelPosMlp``), once per forward per block."""
    total = 0
    mods = [blk.attn.rel_pos for blk in model.blocks if getattr(blk.attn, "rel_pos", None) is not None]
    shared = getattr(model, "shared_rel_pos", None)
    mods += [shared] if shared is not None else []
    for rel in mods:
        coords = getattr(rel, "rel_coords_log", None)
        if coords is not None and hasattr(rel, "mlp"):
            total += (coords.numel() // coords.shape[-1]) * _linear_macs(rel.mlp)  # one row per relative offset
    return total


def arch_spec(model) -> ArchSpec:
    """Read an ArchSpec off a timm VisionTransformer (weights are not looked at)."""
    blocks = getattr(model, "blocks", None)
    embed = getattr(model, "patch_embed", None)
    if blocks is None or embed is None or not hasattr(blocks[0], "attn"):
        raise UnsupportedModel(f"{type(model).__name__} is not a timm VisionTransformer")
    attn = blocks[0].attn
    if not hasattr(attn, "num_heads"):
        raise UnsupportedModel(f"{type(blocks[0]).__name__}'s attention {type(attn).__name__} has no num_heads: "
                               f"its GMACs cannot be read analytically")
    width = _attn_width(attn)
    proj = embed.proj
    num_patches = embed.num_patches
    stem = proj.out_channels * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1] * num_patches
    if getattr(embed, "backbone", None) is not None:
        stem += _backbone_macs(embed)
    heads = [model.head] + ([model.head_dist] if hasattr(model, "head_dist") else [])
    pool_fixed, pool_per_token = _attn_pool_macs(getattr(model, "attn_pool", None))
    return ArchSpec(
        depth=len(blocks),
        num_patches=num_patches,
        num_prefix=model.num_prefix_tokens,
        attn_dim=width,
        attn_linear_macs_per_token=_linear_macs(attn, exclude=getattr(attn, "rel_pos", None)),
        mlp_macs_per_token=_linear_macs(blocks[0].mlp),
        stem_macs=stem,
        head_macs=sum(_linear_macs(h) for h in heads) + pool_fixed,
        pool_macs_per_token=pool_per_token,
        qk_macs_per_token=2 * width * _embed_dim(model, blocks[0]),
        fixed_macs=_rel_pos_macs(model),
        embed_dim=_embed_dim(model, blocks[0]),
    )


def _backbone_macs(embed) -> int:
    """MACs of a hybrid stem's CNN (``HybridEmbed.backbone``) on one image of the embedding's size.

    A CNN's cost has no closed form here: it is counted once by fvcore (convolutions and linears, with
    the harness's op handles), on zeros, weights untouched. It scales with the pixels, so with the
    patches, as :func:`analytic_gmacs` scales the stem.
    """
    import torch
    from fvcore.nn import FlopCountAnalysis

    from harness.measurement.flops import MAC_OPS, op_handles

    height, width = embed.img_size
    param = next(embed.backbone.parameters())
    x = torch.zeros(1, embed.in_chans, height, width, device=param.device, dtype=param.dtype)
    fca = FlopCountAnalysis(embed.backbone, x).set_op_handle(**op_handles())
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with torch.no_grad():
        return int(sum(v for k, v in fca.by_operator().items() if k in MAC_OPS))


def _embed_dim(model, block) -> int:
    """The width of the residual stream (the qkv projection's input)."""
    dim = getattr(model, "embed_dim", None)
    return int(dim) if dim else int(block.norm1.normalized_shape[0])


def _attn_pool_macs(pool) -> tuple[int, int]:
    """(fixed MACs, MACs per pooled token) of timm's ``AttentionPoolLatent`` (MAP head, SigLIP)."""
    if pool is None:
        return 0, 0
    latent, dim = pool.latent_len, pool.latent_dim
    fixed = latent * (pool.q.in_features * pool.q.out_features + pool.proj.in_features * pool.proj.out_features)
    fixed += latent * (_linear_macs(pool.mlp) if pool.mlp is not None else 0)
    per_token = pool.kv.in_features * pool.kv.out_features + 2 * latent * dim  # kv, then q@k^T and attn@v
    return fixed, per_token


def block_macs(arch: ArchSpec, n_in: float, n_out: float, stage: str = "mid") -> float:
    """MACs of one block that receives ``n_in`` tokens and passes ``n_out`` on, reducing at ``stage``."""
    if stage == "post":
        n_out = n_in  # the MLP ran before the reduction
    if stage == "pre":  # q/k projection and q@k on the entering tokens, everything else on the kept
        return (n_in * arch.qk_macs_per_token + n_in * n_in * arch.attn_dim
                + n_out * (arch.attn_linear_macs_per_token - arch.qk_macs_per_token) + n_out * n_out * arch.attn_dim
                + n_out * arch.mlp_macs_per_token)
    attn_matmuls = 2 * n_in * n_in * arch.attn_dim  # q@k^T and attn@v
    return n_in * arch.attn_linear_macs_per_token + attn_matmuls + n_out * arch.mlp_macs_per_token


def analytic_gmacs(arch: ArchSpec, schedule: Schedule) -> float:
    """GMACs of one image under ``schedule`` (the papers' "GFLOPs")."""
    if len(schedule.tokens_out) != arch.depth:
        raise ValueError(f"schedule has {len(schedule.tokens_out)} blocks, model has {arch.depth}")
    # the stem embeds the patches that enter (a lower input resolution embeds fewer)
    stem = arch.stem_macs * (schedule.tokens_in - arch.num_prefix) / arch.num_patches
    total = stem + arch.head_macs + arch.fixed_macs + arch.pool_macs_per_token * schedule.tokens_out[-1]
    total += schedule.extra_macs
    for i, n_out in enumerate(schedule.tokens_out):
        total += block_macs(arch, schedule.tokens_entering(i), n_out, schedule.stage)
    return total / 1e9
