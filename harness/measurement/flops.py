"""Measured GMACs: fvcore on the patched model, split into the model's matmuls, its other work and the reduction's.

Three figures per cell sit side by side: *analytic* GMACs from the schedule (:mod:`harness.schedule`),
*measured* GMACs counted here by fvcore's JIT trace of the patched model, and the *overhead* of the
reduction itself, which the papers leave out.

Conventions, so that measured and analytic count the same thing:

- ``gmacs_measured``: multiply-accumulates of the matmul-class ops (linear, conv, matmul/bmm/mm/addmm,
  einsum and fused ``scaled_dot_product_attention``) that run in the model's own modules. fvcore has
  no handle for SDPA and counts nothing for it (DeiT-S then comes out at 4.25 instead of 4.6); the
  handle here counts q@k^T and attn@v, B*H*Nq*Nk*(Dqk + Dv) MACs. Linear biases are not counted,
  as in the papers and the analytic count.
- ``gmacs_other``: the model's non-matmul work in one-op-per-element units: layer norm (fvcore's 5
  per element), GELU, residual adds, the softmax hidden inside SDPA (one per logit), proportional
  attention's log(size) bias, size-weighted pooling. Analytic GMACs leave all of this out.
- ``gmacs_overhead``: everything the method's reducers do (the seam calls them between attention
  and MLP): the class-attention row or key similarity they compute (real MACs, also given alone as
  ``gmacs_overhead_matmul``), norms, means, sorts (n log2 n per row), top-k (n log2 k), gathers
  and scatters (one per element written or reduced), random draws. Pure data movement (cat, slice,
  view, expand, copies) counts nothing here or anywhere.

Reducer ops are told apart from model ops by scope: while counting, each block's reducer is wrapped
in a parameter-free module, so fvcore files its ops under ``blocks.<i>._seam_reducer``.
Image-dependent methods are counted on real images and averaged over them.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import nn

from harness.seam.forward import REDUCER_ATTR as REDUCER_SCOPE  # where a patched block keeps its reducer

log = logging.getLogger(__name__)

# fvcore's simplified op names that are multiply-accumulates in the papers' convention.
MAC_OPS = frozenset({"linear", "conv", "matmul", "mm", "bmm", "addmm", "einsum", "scaled_dot_product_attention"})


def _shape(value) -> Optional[list[int]]:
    from fvcore.nn.jit_handles import get_shape

    return get_shape(value)


def _numel(value) -> int:
    shape = _shape(value)
    return math.prod(shape) if shape is not None else 0


def _const(value, default=None):
    try:
        v = value.toIValue()
    except RuntimeError:
        return default
    return default if v is None else v


def sdpa_macs(inputs, outputs) -> Counter:
    """fvcore handle for ``aten::scaled_dot_product_attention``: q@k^T and attn@v MACs, plus its softmax.

    q (..., Nq, D), k (..., Nk, D), v (..., Nk, Dv): B*H*Nq*Nk*D + B*H*Nq*Nk*Dv MACs (2 B H N^2 D for
    self-attention), and B*H*Nq*Nk softmax elements under ``sdpa_softmax`` (not a MAC).
    """
    q, k, v = (_shape(t) for t in inputs[:3])
    batch = math.prod(q[:-2])
    nq, d, nk, dv = q[-2], q[-1], k[-2], v[-1]
    return Counter({"scaled_dot_product_attention": batch * nq * nk * (d + dv), "sdpa_softmax": batch * nq * nk})


def _per_output(inputs, outputs) -> int:
    return _numel(outputs[0])


def _per_input(inputs, outputs) -> int:
    return _numel(inputs[0])


def _sort_ops(inputs, outputs) -> int:
    # comparisons of a comparison sort: n log2 n per row along the sorted dim
    shape = _shape(inputs[0])
    n = shape[_const(inputs[1], -1)] if shape else 0
    return _numel(inputs[0]) * math.ceil(math.log2(n)) if n > 1 else 0


def _topk_ops(inputs, outputs) -> int:
    # a heap of k over each row: n log2 k
    k = _const(inputs[1], 1)
    return _numel(inputs[0]) * max(1, math.ceil(math.log2(max(k, 1))))


def _scatter_ops(inputs, outputs) -> int:
    # one op per element written (index) or reduced in (src)
    return _numel(inputs[2])


def op_handles() -> dict:
    """Handles added to fvcore's defaults: SDPA, and one-op-per-element counts for the rest.

    Ops with no handle and not in fvcore's ignore list (data movement: cat, slice, expand, ...) are
    recorded as uncounted.
    """
    from fvcore.nn.jit_handles import norm_flop_counter

    handles = {"aten::scaled_dot_product_attention": sdpa_macs, "aten::layer_norm": norm_flop_counter(2),
               "aten::sort": _sort_ops, "aten::argsort": _sort_ops, "aten::topk": _topk_ops,
               "aten::scatter": _scatter_ops, "aten::scatter_": _scatter_ops, "aten::scatter_reduce": _scatter_ops,
               "aten::scatter_add": _scatter_ops, "aten::index_add": _scatter_ops}
    per_output = ["add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "log", "exp", "sqrt", "rsqrt", "neg",
                  "gelu", "silu", "relu", "sigmoid", "tanh", "where", "rand", "randn", "gather", "index_select",
                  "index", "masked_fill", "masked_fill_", "clamp", "pow", "reciprocal", "cumsum", "eq", "gt", "lt"]
    per_input = ["softmax", "log_softmax", "mean", "sum", "max", "min", "amax", "argmax", "linalg_vector_norm",
                 "norm", "nonzero", "any", "all"]
    handles.update({f"aten::{op}": _per_output for op in per_output})
    handles.update({f"aten::{op}": _per_input for op in per_input})
    return handles


# Ops that neither compute nor matter: silenced instead of reported as uncounted.
IGNORED_OPS = ["aten::dropout", "aten::cat", "aten::expand", "aten::ones_like", "aten::zeros_like", "aten::fill_",
               "aten::unbind", "aten::flatten", "aten::view", "aten::reshape", "aten::select", "aten::slice",
               "aten::to", "aten::permute", "aten::transpose", "aten::unsqueeze", "aten::squeeze", "aten::contiguous",
               "aten::copy_", "aten::clone", "aten::detach", "aten::new_ones", "aten::ones", "aten::zeros",
               "aten::empty", "aten::stack", "aten::split", "aten::chunk", "aten::expand_as", "aten::type_as",
               "aten::lift_fresh", "aten::alias", "aten::full", "aten::full_like", "aten::arange", "aten::_unsafe_view"]


class _ReducerScope(nn.Module):
    """Parameter-free wrapper that gives a reducer's ops their own fvcore scope."""

    def __init__(self, reducer):
        super().__init__()
        self.reducer = reducer

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        return self.reducer(x, ctx)


@contextlib.contextmanager
def reducer_scopes(model: nn.Module) -> Iterator[list[str]]:
    """Wrap each block's reducer in a module while inside; yields the scope names; restores on exit."""
    from harness import seam

    if seam.token_state(model) is None:
        yield []
        return
    scoped = sorted(seam.block_reducers(model))
    undo = seam.wrap_reducers(model, lambda _, reducer: _ReducerScope(reducer))
    try:
        yield [f"blocks.{i}.{REDUCER_SCOPE}" for i in scoped]
    finally:
        undo()


@dataclass
class FlopCount:
    """Per-image counts, averaged over the images counted (op name -> ops), and what was seen.

    Attributes:
        model_ops: ops in the model's own modules (fvcore op names; MACs for ``MAC_OPS``).
        reduction_ops: ops inside the method's reducers.
        uncounted: ops fvcore saw with no handle, and how often (whole trace).
        tokens_per_block: tokens leaving each block, averaged over images (patched models only).
        n_images: images counted.
    """

    model_ops: Counter = field(default_factory=Counter)
    reduction_ops: Counter = field(default_factory=Counter)
    uncounted: Counter = field(default_factory=Counter)
    tokens_per_block: Optional[list[float]] = None
    n_images: int = 0

    @property
    def gmacs(self) -> float:
        """Matmul-class MACs of the model's own modules (comparable to analytic GMACs)."""
        return sum(v for k, v in self.model_ops.items() if k in MAC_OPS) / 1e9

    @property
    def gmacs_other(self) -> float:
        """The model's non-matmul work (norms, GELU, adds, softmax), one op per element."""
        return sum(v for k, v in self.model_ops.items() if k not in MAC_OPS) / 1e9

    @property
    def gmacs_overhead(self) -> float:
        """All the reducers' work: their matmuls plus sorting, matching, gathers, scatters."""
        return sum(self.reduction_ops.values()) / 1e9

    @property
    def gmacs_overhead_matmul(self) -> float:
        """The matmul-class part of the overhead (class-attention row, key similarity)."""
        return sum(v for k, v in self.reduction_ops.items() if k in MAC_OPS) / 1e9

    def record(self, analytic_gmacs: Optional[float] = None) -> dict:
        """Fields for a cell's record; with ``analytic_gmacs``, the relative difference too."""
        out = {"gmacs_measured": round(self.gmacs, 4), "gmacs_other": round(self.gmacs_other, 4),
               "gmacs_overhead": round(self.gmacs_overhead, 5),
               "gmacs_overhead_matmul": round(self.gmacs_overhead_matmul, 5),
               "gmacs_overhead_by_op": {k: round(v / 1e9, 6) for k, v in sorted(self.reduction_ops.items()) if v},
               "flops_images": self.n_images, "flops_uncounted_ops": dict(self.uncounted)}
        if self.tokens_per_block is not None:
            out["tokens_per_block_observed"] = [round(t, 2) for t in self.tokens_per_block]
        if analytic_gmacs:
            out["gmacs_measured_vs_analytic"] = round(self.gmacs / analytic_gmacs - 1, 5)
        return out


def _count_batch(model: nn.Module, x: torch.Tensor) -> tuple[Counter, Counter, Counter]:
    from fvcore.nn import FlopCountAnalysis

    with reducer_scopes(model) as scopes:
        fca = FlopCountAnalysis(model, x).set_op_handle(**op_handles())
        fca.set_op_handle(**{op: None for op in IGNORED_OPS})
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        try:
            by_module = fca.by_module_and_operator()
        except RuntimeError as exc:  # the JIT tracer rejects some eager code (e.g. scatter with a bool value)
            raise RuntimeError(f"fvcore could not trace the patched model: {str(exc).splitlines()[0]}") from exc
        reduction = sum((by_module.get(s, Counter()) for s in scopes), Counter())
        total = Counter(by_module[""])
        total.subtract(reduction)
        return +total, reduction, Counter(fca.unsupported_ops())


@torch.no_grad()
def count_gmacs(model: nn.Module, images: Optional[torch.Tensor] = None, img_size: Optional[int] = None,
                batch_size: int = 16) -> FlopCount:
    """Count the ops of one forward of ``model`` per image, split into model and reduction.

    Args:
        model: a timm ViT, patched through the seam or not, in eval mode.
        images: (N, 3, H, W) model inputs to average over (image-dependent methods need real ones);
            None counts one random image of ``img_size``.
        img_size: side of the random image when ``images`` is None; by default the model's own input
            size (``patch_embed.img_size``; 224 when the model does not say).
        batch_size: images per trace (a trace holds one batch).

    Returns:
        A :class:`FlopCount` averaged over the images.
    """
    if images is None:
        param = next(model.parameters())
        height, width = (img_size, img_size) if img_size else _input_size(model)
        images = torch.randn(1, 3, height, width, device=param.device)
    out = FlopCount(n_images=len(images))
    tokens = _count_batches(model, images, batch_size, out)
    n = len(images)
    out.model_ops = Counter({k: v / n for k, v in out.model_ops.items()})
    out.reduction_ops = Counter({k: v / n for k, v in out.reduction_ops.items()})
    if tokens:
        out.tokens_per_block = [sum(col) / n for col in zip(*tokens)]
    log.debug("measured %.4f GMACs (+%.4f other, +%.5f overhead) over %d images", out.gmacs, out.gmacs_other,
              out.gmacs_overhead, n)
    return out


def _input_size(model: nn.Module) -> tuple[int, int]:
    """(height, width) the model's patch embedding was built for, else 224 x 224."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        return 224, 224
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _count_batches(model: nn.Module, images: torch.Tensor, batch_size: int, out: FlopCount) -> list[list[int]]:
    """Add each batch's op counts to ``out``; return the tokens the seam saw per batch (times its images)."""
    from harness.seam import token_state

    state = token_state(model)
    tokens = []
    if state is not None:
        state.recording = True
    try:
        for i in range(0, len(images), batch_size):
            model_ops, reduction_ops, uncounted = _count_batch(model, images[i:i + batch_size])
            out.model_ops.update(model_ops)
            out.reduction_ops.update(reduction_ops)
            out.uncounted.update(uncounted)
            if state is not None:
                tokens.append([int(t) * len(images[i:i + batch_size]) for t in state.observed])
    finally:
        if state is not None:
            state.recording = False
    return tokens
