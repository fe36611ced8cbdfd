"""Golden logits of the official GTP-ViT code on deit_tiny_cifar10, for tests/test_fidelity.py.

Runs ``models_v3.py`` of https://github.com/Ackesnal/GTP-ViT (read from ``--official-root``, a
checkout or ``git archive`` of the repository; nothing of it is copied here) in fp32 on the CPU on
the 40 images of the shared ``fidelity/deit_tiny_cifar10_golden.npz``, and writes the logits of a
few settings to ``tests/fixtures/golden/deit_tiny_cifar10_gtp_golden.{npz,json}``: logits only, the
.json naming the shared file the inputs came from (``inputs_from``) and the compatibility shims.

    git --git-dir=<GTP-ViT git dir> archive HEAD | tar -x -C /tmp/official/GTP-ViT
    python scripts/gtp_golden.py --official-root /tmp/official/GTP-ViT --commit <sha>
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts.official_code, run as a file too
from scripts.official_code import commit_of, official_arguments, on_path, run_provenance  # noqa: E402

REPO = "https://github.com/Ackesnal/GTP-ViT"
NUM_CLASSES = 10
INPUTS_FROM = "fidelity/deit_tiny_cifar10_golden.npz"  # the same 40 images and normalisation for both models
GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "golden"


@dataclass(frozen=True)
class Target:
    """A reference model and the shape GraphPropagationTransformer is built with for it."""

    model: str
    arch: str
    embed_dim: int
    num_heads: int


TARGETS = {t.model: t for t in (Target("deit_tiny_cifar10", "deit_tiny_patch16_224", 192, 3),
                                Target("deit_small_cifar10", "deit_small_patch16_224", 384, 6))}

# The README's best setting (MixedAttnMax selection, Mixed graph, GraphProp, token scale) with
# main.py's defaults for the rest; num_prop 3 / 9 / 16 are the 0.9 / 0.7 / 0.5 GMACs budgets of a
# 197-token, 12-block model. Two variants: no token scale, and the spatial graph alone at alpha 0.3.
BASE = {"alpha": 0.1, "num_neighbours": 8, "graph_type": "Mixed", "token_scale": True}
CASES = {
    "gtp_p3": {"num_prop": 3},
    "gtp_p9": {"num_prop": 9},
    "gtp_p16": {"num_prop": 16},
    "gtp_p9_noscale": {"num_prop": 9, "token_scale": False},
    "gtp_p12_spatial_a0.3": {"num_prop": 12, "graph_type": "Spatial", "alpha": 0.3},
}
FIXED = {"selection": "MixedAttnMax", "propagation": "GraphProp", "sparsity": 1.0}

COMPAT = [
    "no edit to the repository's files; models_v3.py is imported as it is (its timm imports - "
    "timm.models.layers, timm.models._registry, vision_transformer._load_weights - exist in timm 1.0.31)",
    "GraphPropagationTransformer.__init__ moves its spatial graph to CUDA (`graph.to(\"cuda\")`, with the "
    "comment 'comment .to(\"cuda\") if the environment is cpu'): while the model is built, Tensor.to('cuda') "
    "returns the tensor itself, so the graph stays on the CPU; nothing else is affected",
    "GraphPropagationTransformer is called directly with the model's shape (patch 16, depth 12, mlp 4, "
    "qkv_bias, LayerNorm eps 1e-6; DeiT-T: dim 192, 3 heads, DeiT-S: dim 384, 6 heads) and num_classes=10, as "
    "its graph_propagation_deit_small_patch16_224 does for DeiT-S (models_v3.py has no DeiT-Tiny constructor)",
    "propagate() appends a statistic to a file named 'missing' in the working directory on every call: the "
    "forward runs in a temporary working directory, removed afterwards",
    "weights: the timm safetensors state dict loads into GraphPropagationTransformer with strict=True, no key mapping",
]


def load_inputs(data_root: Path) -> torch.Tensor:
    """The shared golden images as tests/test_fidelity.py normalises them: fp32 NCHW."""
    with np.load(data_root / INPUTS_FROM) as g:
        images, mean, std = g["images_uint8"], g["mean"], g["std"]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - torch.from_numpy(mean).view(1, 3, 1, 1)) / torch.from_numpy(std).view(1, 3, 1, 1)


@contextlib.contextmanager
def cuda_to_is_noop():
    """While active, ``tensor.to("cuda")`` returns the tensor (the official spatial graph stays on the CPU)."""
    original = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and isinstance(args[0], str) and args[0].startswith("cuda"):
            return self
        return original(self, *args, **kwargs)

    torch.Tensor.to = to
    try:
        yield
    finally:
        torch.Tensor.to = original


def official_model(models_v3, state_dict: dict, options: dict, target: Target) -> nn.Module:
    """The official GraphPropagationTransformer at ``target``'s shape, the checkpoint loaded strictly."""
    with cuda_to_is_noop():
        model = models_v3.GraphPropagationTransformer(
            patch_size=16, embed_dim=target.embed_dim, depth=12, num_heads=target.num_heads, mlp_ratio=4, qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=NUM_CLASSES, **options)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Logits and the tokens leaving each block (forward hooks: a block returns (x, graph, scales))."""
    leaving: list[int] = []
    hooks = [blk.register_forward_hook(lambda _m, _i, out: leaving.append(out[0].shape[1])) for blk in model.blocks]
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # propagate() writes ./missing
        try:
            with torch.inference_mode():
                logits = model(x)
        finally:
            os.chdir(cwd)
            for h in hooks:
                h.remove()
    return logits, leaving


def official_options(knob: dict) -> dict:
    return {**FIXED, "num_prop": knob["num_prop"], "num_neighbours": knob["num_neighbours"],
            "alpha": knob["alpha"], "token_scale": knob["token_scale"], "graph_type": knob["graph_type"]}


def make_case(models_v3, state_dict: dict, x: torch.Tensor, knob: dict, target: Target) -> tuple[np.ndarray, dict]:
    """One case's logits, run twice (the second must equal the first bit for bit), and its description."""
    model = official_model(models_v3, state_dict, official_options(knob), target)
    logits, leaving = run(model, x)
    again, _ = run(model, x)
    if not torch.equal(logits, again):
        raise SystemExit(f"the official forward is not deterministic for {knob}")
    removed = [a - b for a, b in zip([197] + leaving[:-1], leaving)]
    spec = {"method": "gtp", "official": "Ackesnal/GTP-ViT models_v3.py", "knob": knob, **FIXED,
            "tokens_per_block_observed": leaving, "tokens_removed_per_block_observed": removed,
            "argmax": logits.argmax(-1).tolist(),
            "how": f"models_v3.GraphPropagationTransformer({target.arch} shape, {official_options(knob)}); "
                   "load_state_dict(strict=True); eval(); model(x) under inference_mode"}
    return logits.numpy().astype(np.float32), spec


def sanity_identity(models_v3, state_dict: dict, x: torch.Tensor, target: Target) -> float:
    """Max |logits| difference between the official model with nothing selected and timm's own model."""
    import timm

    reference = timm.create_model(target.arch, num_classes=NUM_CLASSES)
    reference.load_state_dict(state_dict)
    with torch.inference_mode():
        expected = reference.eval()(x)
    logits, _ = run(official_model(models_v3, state_dict, {}, target), x)
    return float((logits - expected).abs().max())


def metadata(data_root: Path, commit: str, sanity: float, cases: dict, target: Target) -> dict:
    checkpoint = data_root / "models" / f"{target.model}.safetensors"
    return {
        "model": target.model, "arch": target.arch, "num_classes": NUM_CLASSES, "checkpoint": f"shared/models/{checkpoint.name}",
        "checkpoint_sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest(), "inputs_from": INPUTS_FROM,
        **run_provenance(),
        "official": {"gtp": {"repo": REPO, "commit": commit, "compat": COMPAT}},
        "sanity_no_selection_max_abs_diff_vs_timm": sanity,
        "tokens_note": "tokens_per_block_observed[i] = tokens leaving block i (forward hook on blocks[i]); "
                       "GTP removes num_prop patch tokens in every block between attention and MLP",
        "reproduce": f"python scripts/gtp_golden.py --model {target.model} --official-root <GTP-ViT export> "
                     "--commit <sha>; every case is "
                     "run twice with bit-identical logits",
        "cases": cases,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    official_arguments(parser, "Ackesnal/GTP-ViT")
    parser.add_argument("--model", choices=sorted(TARGETS), default="deit_tiny_cifar10", help="the reference model")
    parser.add_argument("--out", type=Path, default=None,
                        help="output stem (.npz and .json are written; default tests/fixtures/golden/<model>_gtp_golden)")
    args = parser.parse_args(argv)
    if not (args.official_root / "models_v3.py").is_file():
        print(f"error: {args.official_root}/models_v3.py not found: pass the GTP-ViT repository root", file=sys.stderr)
        return 2
    from harness.paths import data_root
    from safetensors.torch import load_file

    root = args.data_root or data_root()
    commit = commit_of(args.official_root, args.commit)
    with on_path(args.official_root, ("models_v3",)):
        import models_v3  # the official module, from --official-root

    target = TARGETS[args.model]
    out = args.out or GOLDEN / f"{target.model}_gtp_golden"
    torch.manual_seed(0)
    state_dict = load_file(root / "models" / f"{target.model}.safetensors")
    x = load_inputs(root)
    arrays, cases = {}, {}
    for name, change in CASES.items():
        arrays[name], cases[name] = make_case(models_v3, state_dict, x, {**BASE, **change}, target)
        print(f"{name}: tokens {cases[name]['tokens_per_block_observed']}")
    sanity = sanity_identity(models_v3, state_dict, x, target)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out.with_suffix(".npz"), **arrays)
    out.with_suffix(".json").write_text(json.dumps(metadata(root, commit, sanity, cases, target), indent=1) + "\n")
    print(f"wrote {out}.npz/.json (no-selection vs timm: {sanity:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
