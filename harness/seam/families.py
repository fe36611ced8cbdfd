"""One adapter per timm block family: how its attention gets q, k, v, its position term, its layer scale.

Each adapter reads timm's own modules (projections, q/k-norm, bias tables, LayerScale); none copies a
timm forward. The block forward (:mod:`harness.seam.forward`) runs timm's forward unchanged until a
block reduces or a reduction reached it, then composes the block from these pieces and
:func:`~harness.seam.attend.attend`.

Position terms: timm computes the rotary embedding (EVA's ``rope``) or the shared relative-position
bias (BEiT's ``shared_rel_pos_bias``, relpos's ``shared_rel_pos``) once for the full token grid and
hands it to every block; BEiT's and relpos's own bias tables are the block's. Once tokens were
reduced the adapter takes the term at the tokens' positions (``state.positions``): the rotary
embedding gathered per image, (B, 1, N', D); the bias gathered at positions x positions, (B, H, N', N').
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from harness.errors import UnsupportedModel

# block families the seam patches, and those whose blocks need each token's position
FAMILIES = ("vit", "eva", "beit", "relpos")
POSITION_FAMILIES = ("eva", "beit", "relpos")


@dataclass
class BlockInputs:
    """What a block's forward received besides the tokens (each family uses some of them)."""

    rope: Optional[torch.Tensor] = None
    attn_mask: Optional[torch.Tensor] = None
    is_causal: bool = False
    shared: Optional[torch.Tensor] = None  # BEiT's shared_rel_pos_bias, relpos's shared_rel_pos


def split_heads(t: torch.Tensor, parts: int, num_heads: int) -> torch.Tensor:
    """A fused projection (B, N, parts x H x d) as (parts, B, H, N, d): timm's qkv layout."""
    b, n, _ = t.shape
    return t.reshape(b, n, parts, num_heads, -1).permute(2, 0, 3, 1, 4)


def project(attn: torch.nn.Module, x: torch.Tensor):
    """q, k, v (B, heads, N, d) as the attention projects them, q/k-norm applied, and the fused qkv
    output (B, N, 3 x H x d) where the block has a plain fused projection (else None).

    Fused qkv (with EVA's and BEiT's separate q/k/v biases), or separate q/k/v projections.
    """
    fused = None
    if getattr(attn, "qkv", None) is not None:
        q_bias = getattr(attn, "q_bias", None)
        if q_bias is None:
            qkv = fused = attn.qkv(x)
        elif getattr(attn, "qkv_bias_separate", False):
            qkv = attn.qkv(x) + torch.cat((q_bias, attn.k_bias, attn.v_bias))
        else:
            qkv = F.linear(x, weight=attn.qkv.weight, bias=torch.cat((q_bias, attn.k_bias, attn.v_bias)))
        q, k, v = split_heads(qkv, 3, attn.num_heads).unbind(0)
    else:
        b, n, _ = x.shape
        kv_heads = getattr(attn, "num_kv_heads", attn.num_heads)
        q = attn.q_proj(x).reshape(b, n, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(b, n, kv_heads, -1).transpose(1, 2)
        v = attn.v_proj(x).reshape(b, n, kv_heads, -1).transpose(1, 2)
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    return q, k, v, fused


def gather_rope(rope: torch.Tensor, patch_index: torch.Tensor) -> torch.Tensor:
    """The rotary embedding of each image's current patch tokens.

    Args:
        rope: timm's embedding for all patches, (P, D), or per head (H, P, D) (mixed rope).
        patch_index: (B, N') each current patch token's index among the original patches.

    Returns:
        (B, 1, N', D) (or (B, H, N', D)), broadcasting over the heads of q and k (B, H, N', d).
    """
    if rope.dim() == 2:
        return rope[patch_index].unsqueeze(1)
    if rope.dim() == 3:
        return rope[:, patch_index].transpose(0, 1)
    raise UnsupportedModel(f"rotary embedding of shape {tuple(rope.shape)}: expected (P, D) or (H, P, D)")


def gather_pair_bias(bias: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A relative-position bias (1, H, N, N) at positions x positions per image: (B, H, N', N')."""
    if bias.shape[0] != 1:
        raise UnsupportedModel(f"a per-image relative-position bias {tuple(bias.shape)} is not supported")
    return bias[0][:, positions[:, :, None], positions[:, None, :]].transpose(0, 1)


class Family:
    """The ViT adapter (``vision_transformer.Block``); the others override what differs."""

    name = "vit"
    exposes_qkv = True  # ctx.qkv: the fused projection is all a reducer needs of q, k, v here

    def timm_forward(self, blk, x: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        """The block's own timm forward, bit for bit."""
        return type(blk).forward(blk, x, attn_mask=inputs.attn_mask, is_causal=inputs.is_causal)

    def rotate(self, attn, q, k, v, inputs: BlockInputs, positions: Optional[torch.Tensor]):
        """q and k with the family's rotary embedding (none here)."""
        return q, k

    def position_bias(self, attn, inputs: BlockInputs, positions: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The additive relative-position bias for the current tokens (1 or B, H, N, N), or None."""
        return None

    def layer_scale(self, blk, branch: int, y: torch.Tensor) -> torch.Tensor:
        """The block's LayerScale of residual ``branch`` (1: attention, 2: MLP), as its forward applies it."""
        return (blk.ls1 if branch == 1 else blk.ls2)(y)


class EvaFamily(Family):
    """EVA-02 / ``vit_*_rope_*`` (``eva.EvaBlock``): rotary embedding of each token's position."""

    name = "eva"
    exposes_qkv = False  # q and k are rotated after the projection: ctx.qkv would mislead

    def timm_forward(self, blk, x, inputs):
        return type(blk).forward(blk, x, rope=inputs.rope, attn_mask=inputs.attn_mask, is_causal=inputs.is_causal)

    def rotate(self, attn, q, k, v, inputs, positions):
        if inputs.rope is None:
            return q, k
        from timm.layers import apply_rot_embed_cat

        npt, rope = attn.num_prefix_tokens, inputs.rope
        if positions is not None:
            rope = gather_rope(rope, positions[:, npt:] - npt)
        half = getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        return q, k

    def layer_scale(self, blk, branch, y):
        gamma = blk.gamma_1 if branch == 1 else blk.gamma_2
        return y if gamma is None else gamma * y


class BeitFamily(EvaFamily):
    """BEiT (``beit.Block``): a relative-position bias table per block and/or one shared by all."""

    name = "beit"

    def timm_forward(self, blk, x, inputs):
        return type(blk).forward(blk, x, shared_rel_pos_bias=inputs.shared)

    def rotate(self, attn, q, k, v, inputs, positions):
        return q, k

    def position_bias(self, attn, inputs, positions):
        bias = inputs.shared
        if attn.relative_position_bias_table is not None:
            # timm has no public accessor for a BEiT block's own bias
            own = attn._get_rel_pos_bias()
            bias = own if bias is None else own + bias
        return bias if bias is None or positions is None else gather_pair_bias(bias, positions)


class RelPosFamily(Family):
    """``vision_transformer_relpos.RelPosBlock``: a relative-position bias (MLP or table)."""

    name = "relpos"
    exposes_qkv = False  # the position bias is not in the projection: ctx.qkv would mislead

    def timm_forward(self, blk, x, inputs):
        return type(blk).forward(blk, x, shared_rel_pos=inputs.shared)

    def position_bias(self, attn, inputs, positions):
        bias = attn.rel_pos.get_bias() if attn.rel_pos is not None else inputs.shared
        return bias if bias is None or positions is None else gather_pair_bias(bias, positions)


ADAPTERS = {family.name: family for family in (Family(), EvaFamily(), BeitFamily(), RelPosFamily())}


def block_family(blk: torch.nn.Module) -> str:
    """The seam family of one timm block, or :class:`UnsupportedModel` with the reason.

    - "vit": ``vision_transformer.Block`` with timm's ``Attention`` forward and a fused qkv projection;
    - "eva": ``eva.EvaBlock`` (EVA-02, ``vit_*_rope_*``) with ``EvaAttention`` or ``AttentionRope``:
      rotary embeddings of each token's position;
    - "beit": ``beit.Block`` with BEiT's ``Attention``: a relative-position bias table;
    - "relpos": ``vision_transformer_relpos.RelPosBlock`` with ``RelPosAttention``: a
      relative-position bias (MLP or table).

    A subclass that overrides the block's or the attention's forward (e.g. adds a bias) is refused:
    the attention the adapter composes would not match what it computes.
    """
    from timm.models import beit, eva, vision_transformer as vt, vision_transformer_relpos as relpos

    def same(obj, cls) -> bool:
        return isinstance(obj, cls) and type(obj).forward is cls.forward

    families = [("vit", vt.Block, (vt.Attention,)), ("eva", eva.EvaBlock, (eva.EvaAttention, eva.AttentionRope)),
                ("beit", beit.Block, (beit.Attention,)), ("relpos", relpos.RelPosBlock, (relpos.RelPosAttention,))]
    attn = getattr(blk, "attn", None)
    for family, block_cls, attn_classes in families:
        if not same(blk, block_cls):
            continue
        if not any(same(attn, cls) for cls in attn_classes):
            raise UnsupportedModel(f"unsupported attention {type(attn).__name__} in {block_cls.__module__.split('.')[-1]}."
                                   f"{block_cls.__name__}: the seam needs the {' or '.join(c.__name__ for c in attn_classes)} forward "
                                   f"of timm (the keys and class attention it derives)")
        if family == "vit" and not isinstance(getattr(attn, "qkv", None), torch.nn.Linear):
            raise UnsupportedModel(f"unsupported attention {type(attn).__name__}: the seam needs a fused qkv projection")
        return family
    raise UnsupportedModel(f"unsupported block {type(blk).__name__}: the seam patches timm's vision_transformer.Block, "
                           f"eva.EvaBlock, beit.Block and vision_transformer_relpos.RelPosBlock")


def check_blocks(model: torch.nn.Module) -> str:
    """The family every block of ``model`` belongs to (:func:`block_family`), or
    :class:`UnsupportedModel` (not a timm ViT, an unsupported block, or mixed families)."""
    if not hasattr(model, "blocks") or not hasattr(model, "num_prefix_tokens"):
        raise UnsupportedModel(f"unsupported model {type(model).__name__}: not a timm VisionTransformer")
    families = {block_family(blk) for blk in model.blocks}
    if len(families) != 1:
        raise UnsupportedModel(f"{type(model).__name__} mixes block families {sorted(families)}")
    family = families.pop()
    if family == "eva" and getattr(model, "rope", None) is not None and getattr(model, "patch_drop", None) is not None:
        raise UnsupportedModel("EVA patch dropout gathers the rotary embedding per image itself: not supported")
    return family
