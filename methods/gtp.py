"""GTP-ViT: propagate the tokens a block removes into the kept ones over a sparse token graph.

Xu, Wang, Chen, Zheng, Wei and Liu, "GTP-ViT: Efficient Vision Transformers via Graph-based Token
Propagation", WACV 2024, arXiv 2311.03035, https://github.com/Ackesnal/GTP-ViT (``models_v3.py``:
``select``, ``propagate``, ``GraphPropagationBlock``, ``GraphPropagationTransformer``). Training-free,
and it works without a class token (average-pooling models).

Modifications (the official ``models_v3.py`` with ``--selection MixedAttnMax --propagation GraphProp
--graph_type Mixed --token_scale``, the setting its README reports as best):
 - the token graph is built once per forward from the patch tokens entering block 0 (after the
   position embedding; ``ctx.block_input`` of block 0): a semantic graph linking each token to the
   tokens of highest cosine similarity (every entry at or above the row's k-th smallest similarity,
   ``torch.kthvalue`` with k = P - 1 - num_neighbours + [class token], P the patch tokens: the
   official arithmetic, which on a model without a class token keeps one neighbour more; any prefix
   token counts as the class token does), self
   removed, OR-ed with the spatial graph of the 8 grid neighbours (``graph_type="Mixed"``; also
   ``"Spatial"`` or ``"Semantic"`` alone), then normalised symmetrically, D^-1/2 A D^-1/2;
 - in every block, between attention and MLP, ``num_prop`` patch tokens are removed: tokens are
   ranked by MixedAttnMax, the largest diagonal attention a token pays itself over heads times the
   largest attention it receives (column sum) over heads, computed from the block's attention
   probabilities: the block forms its map explicitly, once, as the official eager attention does,
   and the reducer reads that map (``ctx.attention()``; the seam's ``attention_map``); the
   ``num_prop`` lowest are removed;
 - propagation: every kept token adds ``alpha`` x (graph rows of the kept tokens restricted to the
   removed ones) @ (removed tokens), ``x_kept + alpha * W_prop @ x_prop`` (default alpha 0.1, the
   official ``--alpha`` default); the graph is then restricted to the kept tokens (not
   renormalised, as the official code);
 - token scales (option ``token_scale``, default on): sizes start at one and propagate the same way,
   ``s_kept + alpha * W_prop @ s_prop``; the block's attention adds log(size) to the keys' logits
   (proportional attention; the seam does this);
 - kept tokens come in descending rank order (the official ``argsort(descending=True)``), prefix
   tokens (class, distillation, registers) first and never removed; token positions follow the kept
   tokens (``harness.seam.keep_tokens``), so rope / relpos models are supported;
 - a block removes at most all but one patch token (the schedule clamps the same way; the official
   code has no clamp and fails there).

Deviations and choices:
 - ``--sparsity`` (zeroing the smallest attention probabilities inside the block's attention) is not
   implemented: its official default is 1 (off), and it would need the eager attention;
 - only the MixedAttnMax selection and GraphProp propagation are implemented (the official code
   also has attention-mean, class-attention, random selections and "None" / "Mean" propagation);
 - on average-pooling models with ``token_scale`` the seam's head averages the tokens weighted by
   their scales, where the official ``forward_head`` averages them unweighted;
 - the official graph assumes a square patch grid (sqrt(N)); we take the model's grid (rows x columns);
 - the graph and the propagation are the reducer's work: not in the analytic GMACs, measured by
   fvcore as the cell's ``gmacs_overhead`` (the attention map is the block's own, as in the
   official code).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from harness import margins
from harness.errors import HarnessError
from harness.registry import Knob, Method, Premises, register_method
from harness.schedule import Schedule
from harness.seam import BlockContext, gather_tokens, keep_tokens

GRAPH_TYPES = ("Mixed", "Spatial", "Semantic")
# The knob's upper end: every block removing 98 tokens empties a 196-patch model in the second block;
# larger values clamp everywhere anyway (the schedule applies the forward's clamp).
NUM_PROP_MAX = 98


# --- The algorithm: pure tensor functions. ------------------------------------------------------

def spatial_graph(rows: int, cols: int) -> torch.Tensor:
    """(P, P) adjacency of the 8 grid neighbours of each patch (self excluded), P = rows x cols."""
    index = torch.arange(rows * cols)
    row, col = index // cols, index % cols
    near = ((row[:, None] - row[None, :]).abs() <= 1).float() * ((col[:, None] - col[None, :]).abs() <= 1).float()
    return near - torch.eye(rows * cols)


def semantic_graph(patches: torch.Tensor, kth: int) -> torch.Tensor:
    """(B, P, P) links to each token's most similar tokens: cosine similarity at or above the row's
    ``kth`` smallest (``torch.kthvalue``, as official), self removed."""
    normed = patches / patches.norm(dim=-1, keepdim=True)
    cossim = normed @ normed.transpose(-1, -2)
    threshold = torch.kthvalue(cossim, kth, dim=-1, keepdim=True)[0]
    eye = torch.eye(patches.shape[1], device=patches.device, dtype=cossim.dtype)
    return torch.where(cossim >= threshold, 1.0, 0.0) - eye.unsqueeze(0)


def normalised(graph: torch.Tensor) -> torch.Tensor:
    """D^-1/2 A D^-1/2 of (B, P, P) ``graph``: the official ``diag @ graph @ diag``, element-wise
    (each entry is one product d_i d_j either way)."""
    degree = graph.sum(-1) ** (-1 / 2)
    return degree.unsqueeze(-1) * graph * degree.unsqueeze(-2)


def token_graph(patches: torch.Tensor, spatial: Optional[torch.Tensor], kth: int, graph_type: str) -> torch.Tensor:
    """The normalised token graph (B, P, P) of the patch tokens (B, P, C) entering the first block."""
    b = patches.shape[0]
    if graph_type == "Spatial":
        graph = spatial.to(patches.device).unsqueeze(0).expand(b, -1, -1)
    elif graph_type == "Semantic":
        graph = semantic_graph(patches, kth)
    else:
        near = spatial.to(patches.device).unsqueeze(0).expand(b, -1, -1)
        graph = torch.bitwise_or(semantic_graph(patches, kth).int(), near.int()).float()
    return normalised(graph)


def mixed_attn_max(probs: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """MixedAttnMax rank (B, N - num_prefix) of the non-prefix tokens from attention (B, H, N, N):
    max over heads of the attention a token pays itself, times max over heads of what it receives."""
    diagonal = torch.diagonal(probs, dim1=-2, dim2=-1)[:, :, num_prefix:].max(1)[0]
    received = probs[:, :, :, num_prefix:].sum(-2).max(1)[0]
    return diagonal * received


def split_by_rank(rank: torch.Tensor, num_prop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, removed) indices into ``rank`` (B, T): kept by descending rank, the ``num_prop`` lowest removed."""
    order = torch.argsort(rank, dim=1, descending=True)
    margins.note_boundary(rank, rank.shape[1] - num_prop, "GTP MixedAttnMax keep")
    return order[:, : rank.shape[1] - num_prop], order[:, rank.shape[1] - num_prop:]


def propagate(kept_x: torch.Tensor, removed_x: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """Kept tokens (B, K, C) plus ``alpha`` x ``weight`` (B, K, R) @ removed tokens (B, R, C)."""
    return kept_x + alpha * (weight @ removed_x)


def restrict(graph: torch.Tensor, kept: torch.Tensor, removed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``graph`` (B, T, T) at rows ``kept`` (B, K): its columns ``removed`` (B, R), the propagation
    weights (B, K, R), and its columns ``kept``, the graph of the kept tokens (B, K, K)."""
    rows = graph.gather(1, kept.unsqueeze(-1).expand(-1, -1, graph.shape[2]))  # one row gather for both
    cols = torch.cat([removed, kept], 1).unsqueeze(1).expand(-1, kept.shape[1], -1)
    weight, kept_graph = rows.gather(2, cols).split([removed.shape[1], kept.shape[1]], 2)
    return weight, kept_graph


# --- The adapter. -------------------------------------------------------------------------------

def propagate_block(x: torch.Tensor, ctx: BlockContext, num_prop: int, alpha: float, token_scale: bool) -> torch.Tensor:
    """One block's selection and propagation of ``x`` (B, N, C); updates the graph and the sizes."""
    p, state = ctx.num_prefix, ctx.state
    kept, removed = split_by_rank(mixed_attn_max(ctx.attention(), p), num_prop)
    weight, state.gtp_graph = restrict(state.gtp_graph, kept, removed)
    removed_x = gather_tokens(x[:, p:], removed)
    if token_scale and state.size is None:
        state.size = torch.ones(x.shape[0], x.shape[1], 1, device=x.device, dtype=torch.float32)
    removed_size = None if state.size is None else gather_tokens(state.size[:, p:], removed)
    x = keep_tokens(ctx, x, kept + p)  # prefix first, kept in rank order; sizes and positions follow
    if removed_size is not None:
        state.size = torch.cat([state.size[:, :p], propagate(state.size[:, p:], removed_size, weight, alpha)], 1)
    return torch.cat([x[:, :p], propagate(x[:, p:], removed_x, weight.to(x.dtype), alpha)], 1)


def gtp_reducer(num_prop: int, alpha: float, token_scale: bool,
                graph_of: Optional[Callable[[torch.Tensor], torch.Tensor]]) -> Callable:
    """The seam reducer of one block; the first block's (``graph_of`` given) builds the token graph."""

    def reduce(x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        if graph_of is not None:  # a fresh graph every forward, from the tokens entering block 0
            ctx.state.gtp_graph = graph_of(ctx.block_input[:, ctx.num_prefix:])
        removable = min(num_prop, int(x.shape[1]) - ctx.num_prefix - 1)
        if removable <= 0:
            return x
        return propagate_block(x, ctx, removable, alpha, token_scale)

    return reduce


def props_per_block(arch, num_prop: int) -> list[int]:
    """Tokens each block removes: ``num_prop``, clamped so one patch token always stays."""
    tokens, out = arch.num_patches, []
    for _ in range(arch.depth):
        removed = max(0, min(num_prop, tokens - 1))
        tokens -= removed
        out.append(removed)
    return out


@register_method
class GTP(Method):
    """GTP-ViT: remove low-attention tokens and propagate them into the kept ones over a token graph (Xu et al., WACV 2024)."""

    name = "gtp"
    version = "2"  # 2: the block forms its attention map once and hands it over (bf16 logits move by rounding)
    cannot_train = ("GTP-ViT is training-free by design: the paper reports every result on pre-trained "
                    "DeiT / ViT weights 'without finetuning' (arXiv 2311.03035, abstract and experiments; "
                    "the official README gives evaluation commands only)")
    knob = Knob("num_prop", int, 0, NUM_PROP_MAX, identity=0)
    attention_map = True  # it reads the whole attention map in every block: the block forms it once, explicitly

    @dataclass(frozen=True)
    class Options:
        alpha: float = 0.1  # the share of a removed token propagated into its neighbours
        num_neighbours: int = 8  # the semantic graph's neighbours per token
        graph_type: str = "Mixed"  # the token graph (GRAPH_TYPES)
        token_scale: bool = True  # kept tokens carry scales (sizes): proportional attention, size pooling

        def __post_init__(self):
            if self.graph_type not in GRAPH_TYPES:
                raise HarnessError(f"gtp graph_type {self.graph_type!r}; choices: {', '.join(GRAPH_TYPES)}")

    @property
    def premises(self) -> Premises:
        # token scales (option token_scale, on by default) are sizes: the head must pool by them
        return Premises(merges=self.options.token_scale, tracks_positions=True)

    @property
    def prop_attn(self) -> bool:
        return self.options.token_scale

    @property
    def graph_type(self) -> str:
        return self.options.graph_type

    def schedule(self, arch, value: int) -> Schedule:
        tokens, out = arch.tokens_in, []
        for removed in props_per_block(arch, int(value)):
            tokens -= removed
            out.append(tokens)
        return Schedule(arch.tokens_in, tuple(out))

    def graph_builder(self, model, arch) -> Callable[[torch.Tensor], torch.Tensor]:
        """The token-graph function for ``model``'s patch grid and this method's options."""
        rows, cols = model.patch_embed.grid_size
        spatial = spatial_graph(rows, cols)
        # the official k counts the class token in N: one neighbour more on a model without one
        kth = arch.num_patches - self.options.num_neighbours - (0 if arch.num_prefix else 1)
        graph_type = self.graph_type
        return lambda patches: token_graph(patches, spatial, kth, graph_type)

    def reducers(self, model, arch, value: int) -> dict:
        if int(value) <= 0:
            return {}
        graph_of, options = self.graph_builder(model, arch), self.options
        return {i: gtp_reducer(int(value), options.alpha, options.token_scale, graph_of if i == 0 else None)
                for i in range(arch.depth)}
