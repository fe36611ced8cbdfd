"""Golden logits of the official DynamicViT inference on deit_tiny_cifar10, for tests/test_fidelity.py.

Runs ``models/dyvit.py`` of https://github.com/raoyongming/DynamicViT (read from ``--official-root``,
a checkout or ``git archive`` of the repository; nothing of it is copied here) in fp32 on the CPU
on the 40 images of the shared ``fidelity/deit_tiny_cifar10_golden.npz``, and writes the logits at
a few keep ratios to ``tests/fixtures/golden/deit_tiny_cifar10_dynamicvit_golden.{npz,json}``, with
one TRAINING forward (Gumbel masks from a seeded RNG; its logits, masks and the official loss less
the cross entropy) for ``tests/test_dynamicvit.py``.

The official model is ``VisionTransformerDiffPruning`` at DeiT-T's shape with the reference
checkpoint; its prediction modules (``score_predictor``) get the weights the project's
``harness.methods.dynamicvit.init_uniform_`` draws from a seed (bit for bit the same on any CPU:
integer-derived uniforms, then exact operations), so the test rebuilds the same weights from the
seed and checks their sha256 (in the .json) before it compares. They are not the official
initialisation (std 0.02 weights score every token within ~1e-3 of the others: a test of ties),
and not trained: the check is of the inference path, for any predictor weights.

    git --git-dir=<DynamicViT git dir> archive HEAD | tar -x -C /tmp/official/DynamicViT
    python scripts/dynamicvit_golden.py --official-root /tmp/official/DynamicViT --commit <sha>
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import sys
import types
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts.*, run as a file too
from scripts.gtp_golden import load_inputs  # noqa: E402  (the shared images, normalised as the test does)
from scripts.official_code import commit_of, official_arguments, on_path, run_provenance  # noqa: E402

REPO = "https://github.com/raoyongming/DynamicViT"
MODEL, ARCH, NUM_CLASSES = "deit_tiny_cifar10", "deit_tiny_patch16_224", 10
INPUTS_FROM = "fidelity/deit_tiny_cifar10_golden.npz"
CHECKPOINT = "models/deit_tiny_cifar10.safetensors"
GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "golden" / f"{MODEL}_dynamicvit_golden"
PRUNING_LOC = [3, 6, 9]  # main.py for deit-s / deit-b
PREDICTOR_SEED = 0
CASES = {"dynamicvit_rho0.9": 0.9, "dynamicvit_rho0.7": 0.7, "dynamicvit_rho0.5": 0.5}

COMPAT = [
    "no edit to the repository's files; models/dyvit.py is imported as it is (its timm imports - "
    "timm.models.layers DropPath, to_2tuple, trunc_normal_ - exist in timm 1.0.31)",
    "utils.py (imported by models/dyvit.py for batch_index_select) imports `from torch._six import inf`, gone "
    "since torch 2.0: a module torch._six with inf = math.inf is put in sys.modules while it is imported",
    "utils.py imports tensorboardX at module level (for its TensorboardLogger, unused here), not installed: "
    "an empty module tensorboardX with a placeholder SummaryWriter is put in sys.modules while it is imported",
    "VisionTransformerDiffPruning is built with DeiT-T's shape (patch 16, dim 192, depth 12, 3 heads, mlp 4, "
    "qkv_bias, LayerNorm eps 1e-6), num_classes=10, pruning_loc=[3, 6, 9], token_ratio=[rho, rho**2, rho**3], "
    "distill=True, as main.py builds deit-s with embed_dim 384",
    "losses.py (DistillDiffPruningLoss_dynamic, for the training case) is imported as it is; the teacher is its "
    "VisionTransformerTeacher with the same checkpoint (strict=True)",
    "weights: the timm safetensors state dict loads with strict=False; the only missing keys are score_predictor.*, "
    "which then get the seeded weights (predictor_init in each case), none unexpected",
]


@contextlib.contextmanager
def import_shims():
    """``torch._six`` and ``tensorboardX`` as stand-ins while the official modules are imported."""
    six = types.ModuleType("torch._six")
    six.inf = math.inf
    board = types.ModuleType("tensorboardX")
    board.SummaryWriter = object
    added = {name: mod for name, mod in (("torch._six", six), ("tensorboardX", board)) if name not in sys.modules}
    sys.modules.update(added)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def predictor_state(seed: int) -> tuple[dict, str]:
    """The three predictors' weights drawn by the project's ``init_uniform_``, and their sha256."""
    from harness.methods.dynamicvit import PredictorLG, ScorePredictors, init_uniform_, state_sha256

    predictors = ScorePredictors([PredictorLG(192) for _ in PRUNING_LOC], [])
    init_uniform_(predictors, seed)
    return predictors.state_dict(), state_sha256(predictors)


def official_model(dyvit, state_dict: dict, rho: float, predictors: dict) -> nn.Module:
    """The official DynamicViT at DeiT-T's shape, the checkpoint and the predictors loaded."""
    model = dyvit.VisionTransformerDiffPruning(
        patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4, qkv_bias=True, num_classes=NUM_CLASSES,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), pruning_loc=PRUNING_LOC, token_ratio=[rho, rho ** 2, rho ** 3],
        distill=True)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if unexpected or any(not k.startswith("score_predictor.") for k in missing):
        raise SystemExit(f"checkpoint does not map: missing {missing}, unexpected {unexpected}")
    model.score_predictor.load_state_dict(predictors, strict=True)
    return model.eval()


def run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Logits, and the tokens leaving each block and the pruning after it (the next block's input; the
    last block's output): DynamicViT prunes between blocks, which the harness counts in the block before."""
    entering: list[int] = []
    hooks = [blk.register_forward_pre_hook(lambda _m, args: entering.append(args[0].shape[1])) for blk in model.blocks]
    hooks.append(model.norm.register_forward_pre_hook(lambda _m, args: entering.append(args[0].shape[1])))
    try:
        with torch.inference_mode():
            logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    return logits, entering[1:]


def make_case(dyvit, state_dict: dict, x: torch.Tensor, rho: float, predictors: dict, sha: str) -> tuple[np.ndarray, dict]:
    """One case's logits, run twice (the second must equal the first bit for bit), and its description."""
    model = official_model(dyvit, state_dict, rho, predictors)
    logits, leaving = run(model, x)
    again, _ = run(model, x)
    if not torch.equal(logits, again):
        raise SystemExit(f"the official forward is not deterministic at rho {rho}")
    spec = {"method": "dynamicvit", "official": "raoyongming/DynamicViT models/dyvit.py", "knob": {"rho": rho},
            "pruning_loc": PRUNING_LOC, "token_ratio": [rho, rho ** 2, rho ** 3],
            "predictor_init": {"function": "harness.methods.dynamicvit.init_uniform_", "seed": PREDICTOR_SEED,
                               "sha256": sha},
            "tokens_per_block_observed": leaving, "argmax": logits.argmax(-1).tolist(),
            "how": f"models/dyvit.VisionTransformerDiffPruning({ARCH} shape, pruning_loc={PRUNING_LOC}, "
                   f"token_ratio=[{rho}, {rho}**2, {rho}**3]); checkpoint strict=False + score_predictor from "
                   "predictor_init; eval(); model(x) under inference_mode"}
    return logits.numpy().astype(np.float32), spec


TRAINING = {"rho": 0.7, "images": 8, "seed": 5}  # one training forward, its Gumbel draws from torch.manual_seed(seed)


def training_case(dyvit, losses, state_dict: dict, x: torch.Tensor, predictors: dict, sha: str) -> tuple[dict, dict]:
    """The official TRAINING forward (masks, not pruning) of the first images after ``torch.manual_seed``, and
    its loss less the cross entropy: DistillDiffPruningLoss_dynamic as main.py builds it for DeiT, with the
    official VisionTransformerTeacher (the same checkpoint) as the teacher."""
    rho, n = TRAINING["rho"], TRAINING["images"]
    model = official_model(dyvit, state_dict, rho, predictors).train()
    teacher = dyvit.VisionTransformerTeacher(
        patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4, qkv_bias=True, num_classes=NUM_CLASSES,
        norm_layer=partial(nn.LayerNorm, eps=1e-6))
    teacher.load_state_dict(state_dict, strict=True)
    criterion = losses.DistillDiffPruningLoss_dynamic(
        teacher.eval(), torch.nn.CrossEntropyLoss(), clf_weight=1.0, keep_ratio=[rho, rho ** 2, rho ** 3],
        mse_token=True, ratio_weight=2.0, distill_weight=0.5, print_mode=False)
    labels = torch.arange(n) % NUM_CLASSES
    torch.manual_seed(TRAINING["seed"])
    with torch.no_grad():
        outputs = model(x[:n])
        loss, _ = criterion(x[:n], outputs, labels)
        extra = loss - torch.nn.functional.cross_entropy(outputs[0], labels)
    masks = torch.stack(outputs[3]).to(torch.uint8).numpy()
    spec = {**TRAINING, "labels": "arange(images) % 10", "predictor_init": {"seed": PREDICTOR_SEED, "sha256": sha},
            "loss_less_cross_entropy": float(extra),
            "how": "model.train(); torch.manual_seed(seed); model(x[:images]) -> (logits, tokens, mask, masks); "
                   "DistillDiffPruningLoss_dynamic(teacher, CrossEntropyLoss(), clf_weight=1.0, keep_ratio=[rho, rho**2, "
                   "rho**3], mse_token=True, ratio_weight=2.0, distill_weight=0.5) minus the cross entropy"}
    return {"training_logits": outputs[0].numpy().astype(np.float32), "training_masks": masks}, spec


def sanity_identity(dyvit, state_dict: dict, x: torch.Tensor) -> float:
    """Max |logits| difference between the official model with no pruning location and timm's own model."""
    import timm

    reference = timm.create_model(ARCH, num_classes=NUM_CLASSES)
    reference.load_state_dict(state_dict)
    with torch.inference_mode():
        expected = reference.eval()(x)
    model = dyvit.VisionTransformerDiffPruning(
        patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4, qkv_bias=True, num_classes=NUM_CLASSES,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), pruning_loc=[], token_ratio=[], distill=True)
    model.load_state_dict(state_dict, strict=True)
    logits, _ = run(model.eval(), x)
    return float((logits - expected).abs().max())


def metadata(root: Path, commit: str, sanity: float, cases: dict, training: dict) -> dict:
    return {
        "model": MODEL, "arch": ARCH, "num_classes": NUM_CLASSES, "checkpoint": f"shared/{CHECKPOINT}",
        "checkpoint_sha256": hashlib.sha256((root / CHECKPOINT).read_bytes()).hexdigest(), "inputs_from": INPUTS_FROM,
        **run_provenance(),
        "official": {"dynamicvit": {"repo": REPO, "commit": commit, "compat": COMPAT}},
        "sanity_no_selection_max_abs_diff_vs_timm": sanity,
        "tokens_note": "tokens_per_block_observed[i] = tokens leaving block i and the pruning before block i + 1 "
                       "(forward pre-hooks on blocks[i + 1] and on the final norm): the official code prunes between "
                       "blocks, before blocks 3 / 6 / 9, which the harness does at the end of blocks 2 / 5 / 8",
        "reproduce": "python scripts/dynamicvit_golden.py --official-root <DynamicViT export> --commit <sha>; every "
                     "case is run twice with bit-identical logits",
        "cases": cases,
        "training": training,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    official_arguments(parser, "raoyongming/DynamicViT")
    parser.add_argument("--out", type=Path, default=GOLDEN, help="output stem (.npz and .json are written)")
    args = parser.parse_args(argv)
    if not (args.official_root / "models" / "dyvit.py").is_file():
        print(f"error: {args.official_root}/models/dyvit.py not found: pass the DynamicViT repository root",
              file=sys.stderr)
        return 2
    commit = commit_of(args.official_root, args.commit)
    from harness.paths import data_root
    from safetensors.torch import load_file

    root = args.data_root or data_root()
    with import_shims(), on_path(args.official_root, ("models", "utils", "losses")):
        import losses  # the official modules, from --official-root
        from models import dyvit
    state_dict, x = load_file(root / CHECKPOINT), load_inputs(root)
    predictors, sha = predictor_state(PREDICTOR_SEED)
    arrays, cases = {}, {}
    for name, rho in CASES.items():
        arrays[name], cases[name] = make_case(dyvit, state_dict, x, rho, predictors, sha)
        print(f"{name}: tokens {cases[name]['tokens_per_block_observed']}")
    training_arrays, training = training_case(dyvit, losses, state_dict, x, predictors, sha)
    sanity = sanity_identity(dyvit, state_dict, x)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out.with_suffix(".npz"), **arrays, **training_arrays)
    args.out.with_suffix(".json").write_text(json.dumps(metadata(root, commit, sanity, cases, training), indent=1) + "\n")
    print(f"wrote {args.out}.npz/.json (no-selection vs timm: {sanity:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
