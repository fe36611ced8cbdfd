"""Golden logits of the official MCTF, PPT, PiToMe and ToFu code under CPU bf16 autocast, eager attention.

Runs the authors' repositories, as the user checked them out (never vendored), on the 40 images of
the shared golden file and writes the logits (only) plus their provenance:

    python scripts/make_bf16_golden.py --official-root /tmp/official
        # /tmp/official/MCTF: mlvlab/MCTF @ 2004da0c, /tmp/official/PPT: xjwu1024/PPT @ 706bcdd4,
        # /tmp/official/PiToMe: hchautran/PiToMe @ 550b5dee (ToFu's reference is in it)

The output, ``tests/fixtures/golden/deit_tiny_cifar10_bf16_golden.{npz,json}``, is read by
``tests/test_fidelity.py``: each case names its dtype, autocast and attention kernel, and the
project's method runs the same way. The official code runs as the fp32 golden file's provenance
describes (``fidelity/deit_tiny_cifar10_newmethods_golden.json``, "official"), with the same
compatibility shims, only inside ``torch.autocast("cpu", dtype=torch.bfloat16)``; the unpatched
timm model runs with ``fused_attn = False`` (timm's explicit softmax(q k^T) v, the kernel the
official PPT / MCTF attention is written as).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts.official_code, run as a file too
from scripts.official_code import git_head, on_path  # noqa: E402

MODEL, ARCH, NUM_CLASSES = "deit_tiny_cifar10", "deit_tiny_patch16_224", 10
INPUTS = "fidelity/deit_tiny_cifar10_golden.npz"
CHECKPOINT = "models/deit_tiny_cifar10.safetensors"
STEM = "deit_tiny_cifar10_bf16_golden"
RUN = {"device": "cpu", "dtype": "bf16", "autocast": "torch.autocast('cpu', dtype=torch.bfloat16)",
       "attention": "eager", "mode": "model.eval(), torch.inference_mode()", "batch": "all 40 images in one batch"}
MCTF_TYPE = [16, 0, 0, 1, 1, 1, 20, 40, 1, 1, 0]


def fail(message: str) -> None:
    print(f"make_bf16_golden: {message}", file=sys.stderr)
    raise SystemExit(2)


def inputs(data_root: Path) -> torch.Tensor:
    """The shared file's images, normalised as its .json says: ``(u8 / 255 - mean) / std`` in fp32, NCHW."""
    with np.load(data_root / INPUTS) as g:
        u8, mean, std = g["images_uint8"], g["mean"], g["std"]
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255
    return (x - torch.from_numpy(mean).view(1, 3, 1, 1)) / torch.from_numpy(std).view(1, 3, 1, 1)


def state_dict(data_root: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(data_root / CHECKPOINT))


def timm_model(weights: dict) -> torch.nn.Module:
    import timm

    model = timm.create_model(ARCH, num_classes=NUM_CLASSES)
    model.load_state_dict(weights)
    for blk in model.blocks:
        blk.attn.fused_attn = False  # eager: timm's explicit softmax(q k^T) v
    return model.eval()


def mctf_model(root: Path, weights: dict) -> torch.nn.Module:
    """mlvlab/MCTF's ``models.deit.deit_tiny`` with the evaluation defaults, timm weights (strict)."""
    import warnings

    import timm.models.registry as registry

    register = registry.register_model
    registry.register_model = lambda fn: fn  # keep its deit_* out of timm's registry
    try:
        with warnings.catch_warnings(), on_path(root, ("models", "utils")):
            warnings.simplefilter("ignore", FutureWarning)
            deit = importlib.import_module("models.deit")
            model = deit.deit_tiny(pretrained=False, num_classes=NUM_CLASSES, drop_rate=0.0, drop_path_rate=0.0,
                                   use_mctf=True, mctf_type=MCTF_TYPE, task_type=[1, 0, 0, 0],
                                   activate_layer=list(range(1, 12)))
    finally:
        registry.register_model = register
    model.load_state_dict(weights, strict=True)
    return model.eval()


def ppt_model(root: Path, weights: dict) -> torch.nn.Module:
    """xjwu1024/PPT's ``ppt_deit.apply_patch`` on timm's model, the README's knob, r = 50."""
    with on_path(root, ("ppt_deit", "tome")):
        ppt_deit = importlib.import_module("ppt_deit")
    model = timm_model(weights)
    ppt_deit.apply_patch(model, trace_source=False, prop_attn=True, pp_loc_list=[3, 6, 9], threshold=7e-5)
    model.r = 50
    return model.eval()


def pitome_repo_model(root: Path, weights: dict, algo: str, ratio: float) -> torch.nn.Module:
    """hchautran/PiToMe's ``algo.<algo>.patch.deit.apply_patch`` on timm's model with timm 0.4.12's
    forward put back (the fp32 golden file's shim), ``model.ratio = ratio``."""
    import types

    from timm.models.vision_transformer import VisionTransformer

    class Timm0412VisionTransformer(VisionTransformer):
        def forward(self, x):  # timm 0.4.12's forward for a model without distillation token
            return self.head(self.forward_features(x))

    with on_path(root, ("algo",)):
        importlib.import_module("algo")  # constants only
        # the package __init__ files import the BERT / BLIP / CLIP patches (transformers, lavis): not run
        for package in (f"algo.{algo}", f"algo.{algo}.patch"):
            module = types.ModuleType(package)
            module.__path__ = [str(root / package.replace(".", "/"))]
            sys.modules[package] = module
        deit = importlib.import_module(f"algo.{algo}.patch.deit")
    model = timm_model(weights)
    model.__class__ = Timm0412VisionTransformer
    model.dist_token, model.pre_logits, model.head_dist = None, torch.nn.Identity(), None
    deit.apply_patch(model)
    model.ratio = ratio
    return model.eval()


def run(model: torch.nn.Module, x: torch.Tensor, **kwargs) -> tuple[np.ndarray, list[int]]:
    """Logits (fp32 copy of the bf16 output) and the tokens leaving each block (forward hooks)."""
    leaving: list[int] = []
    hooks = [blk.register_forward_hook(lambda _m, _i, out: leaving.append(out.shape[1])) for blk in model.blocks]
    try:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    if isinstance(logits, tuple):  # PiToMe's patched forward returns (logits, flops)
        logits = logits[0]
    return logits.float().numpy(), leaving


def commit(root: Path, given: str | None) -> str:
    """The checkout's commit: ``given`` (an export, ``git archive``, has no .git), else git's HEAD."""
    found = given or git_head(root)
    if found is None:
        fail(f"{root} is not a git checkout: pass the commit you exported (--mctf-commit / --ppt-commit)")
    return found


CASES = {
    "none": ({"method": "none", "code": "timm (unpatched), fused_attn=False"}, None),
    "mctf_r16": ({"method": "mctf", "official": "mlvlab/MCTF", "knob": {"r": 16}, "mctf_type": MCTF_TYPE,
                  "activate_layer": list(range(1, 12)), "how": "models.deit.deit_tiny(use_mctf=True, ...); "
                  "load_state_dict(strict=True); model(x, r_eval=16)"}, "MCTF"),
    "ppt_r50_thr7e-05": ({"method": "ppt", "official": "xjwu1024/PPT",
                          "knob": {"r": 50, "threshold": 7e-05, "pp_loc_list": [3, 6, 9]},
                          "how": "ppt_deit.apply_patch(model, trace_source=False, prop_attn=True, pp_loc_list=[3, 6, 9], "
                                 "threshold=7e-05); model.r = 50; model(x)"}, "PPT"),
    "pitome_ratio0.9": ({"method": "pitome", "official": "hchautran/PiToMe", "knob": {"ratio": 0.9},
                         "how": "Timm0412 shim; algo.pitome.patch.deit.apply_patch(model); model.ratio = 0.9; "
                                "logits, flops = model(x)"}, "PiToMe"),
    "tofu_ratio0.9": ({"method": "tofu", "official": "hchautran/PiToMe", "knob": {"ratio": 0.9},
                       "how": "Timm0412 shim; algo.tofu.patch.deit.apply_patch(model); model.ratio = 0.9; "
                              "logits, flops = model(x)"}, "PiToMe"),
}


def build(case: str, root: Path, weights: dict) -> tuple[torch.nn.Module, dict]:
    if case == "mctf_r16":
        return mctf_model(root / "MCTF", weights), {"r_eval": 16}
    if case == "ppt_r50_thr7e-05":
        return ppt_model(root / "PPT", weights), {}
    if case in ("pitome_ratio0.9", "tofu_ratio0.9"):
        return pitome_repo_model(root / "PiToMe", weights, case.split("_")[0], 0.9), {}
    return timm_model(weights), {}


def provenance(root: Path, data_root: Path, commits: dict) -> dict:
    import safetensors
    import timm

    from harness.measurement.fidelity import cpu_kernel_path

    sha = hashlib.sha256((data_root / CHECKPOINT).read_bytes()).hexdigest()
    return {
        "model": MODEL, "arch": ARCH, "num_classes": NUM_CLASSES, "checkpoint_sha256": sha, "inputs_from": INPUTS,
        "run": {**RUN, "threads": torch.get_num_threads(), "kernel_path": cpu_kernel_path()},
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__,
                     "numpy": np.__version__, "safetensors": safetensors.__version__},
        "official": {
            "mctf": {"repo": "https://github.com/mlvlab/MCTF", "commit": commit(root / "MCTF", commits["mctf"]),
                     "compat": "as fidelity/deit_tiny_cifar10_newmethods_golden.json 'official.mctf': no edit to "
                               "the repository's files; models.deit imported with timm's register_model a no-op; "
                               "deit_tiny(...) called directly; timm weights strict=True; model(x, r_eval=16)"},
            "pitome": {"repo": "https://github.com/hchautran/PiToMe", "commit": commit(root / "PiToMe", commits["pitome"]),
                       "compat": "as fidelity/deit_tiny_cifar10_newmethods_golden.json 'official.pitome': no edit; "
                                 "algo/__init__.py runs, algo/<method>/__init__.py and algo/<method>/patch/__init__.py "
                                 "are empty modules (they import transformers / lavis); timm 0.4.12's forward put back "
                                 "(Timm0412VisionTransformer, dist_token=None, pre_logits=Identity, head_dist=None); "
                                 "PiToMe / ToFu attention is their own explicit softmax(q k^T scale); logits = "
                                 "model(x)[0] (return_flop=True)"},
            "ppt": {"repo": "https://github.com/xjwu1024/PPT", "commit": commit(root / "PPT", commits["ppt"]),
                    "compat": "as fidelity/deit_tiny_cifar10_newmethods_golden.json 'official.ppt': no edit; only "
                              "ppt_deit.py and its own tome.py imported; apply_patch on timm 1.x's VisionTransformer, "
                              "whose blocks had fused_attn=False set first (PPTAttention is explicit anyway)"},
        },
        "reproduce": "python scripts/make_bf16_golden.py --official-root DIR (DIR/MCTF, DIR/PPT, DIR/PiToMe: the checkouts)",
    }


def file_stem(capability: str) -> str:
    """The output's stem: the plain name on the CPU's own path, the capability added where the env
    ``ATEN_CPU_CAPABILITY`` lowered it: each bf16 golden file holds on its own kernel path only."""
    return STEM.replace("_golden", f"_{capability.lower()}_golden") if os.environ.get("ATEN_CPU_CAPABILITY") else STEM


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-root", type=Path, required=True,
                        help="folder holding the checkouts MCTF/ (mlvlab/MCTF), PPT/ (xjwu1024/PPT), PiToMe/ (hchautran/PiToMe)")
    parser.add_argument("--data-root", type=Path, default=None, help="the shared data folder (default: the harness's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/fixtures/golden")
    parser.add_argument("--mctf-commit", help="MCTF's commit, where the checkout is an export without .git")
    parser.add_argument("--ppt-commit", help="PPT's commit, where the checkout is an export without .git")
    parser.add_argument("--pitome-commit", help="PiToMe's commit, where the checkout is an export without .git")
    args = parser.parse_args(argv)
    for sub, probe in (("MCTF", "models/deit.py"), ("PPT", "ppt_deit.py"), ("PiToMe", "algo/pitome/patch/deit.py")):
        if not (args.official_root / sub / probe).is_file():
            fail(f"no {sub}/{probe} under {args.official_root}")
    if args.data_root is None:
        from harness.errors import HarnessError
        from harness.paths import data_root
        try:
            args.data_root = data_root()
        except HarnessError as exc:
            fail(str(exc))
    if not (args.data_root / INPUTS).is_file() or not (args.data_root / CHECKPOINT).is_file():
        fail(f"{args.data_root} lacks {INPUTS} or {CHECKPOINT}")
    torch.set_num_threads(2)
    x, weights = inputs(args.data_root), state_dict(args.data_root)
    commits = {"mctf": args.mctf_commit, "ppt": args.ppt_commit, "pitome": args.pitome_commit}
    meta, arrays = provenance(args.official_root, args.data_root, commits), {}
    meta["cases"] = {}
    for case, (spec, _repo) in CASES.items():
        model, kwargs = build(case, args.official_root, weights)
        logits, leaving = run(model, x, **kwargs)
        again, _ = run(build(case, args.official_root, weights)[0], x, **kwargs)
        arrays[case] = logits
        meta["cases"][case] = {**spec, "dtype": "bf16", "attention": "eager", "tokens_per_block_observed": leaving,
                               "argmax": logits.argmax(-1).tolist(), "rerun_bit_identical": bool((logits == again).all())}
        print(f"{case}: tokens {leaving}, rerun identical {meta['cases'][case]['rerun_bit_identical']}")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = file_stem(meta["run"]["kernel_path"]["aten_cpu_capability"])
    np.savez_compressed(args.out / f"{stem}.npz", **arrays)
    (args.out / f"{stem}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {args.out / stem}.npz / .json")


if __name__ == "__main__":
    main()
