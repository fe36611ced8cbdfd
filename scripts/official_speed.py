"""Official code vs the project: forward time of each method's authors' implementation and ours.

    python scripts/official_speed.py --official-root /path/to/checkouts --rounds 7 --batch 8

Same weights (the reference DeiT-T CIFAR-10 checkpoint, or any timm DeiT named with --model), the
same batch of inputs, the same knob and dtype, timed interleaved in one process: every round runs
each method's official model and the project's once, in alternating order, so that a machine's
drift hits both. The table gives official ms / project ms per round (above 1: ours is faster),
its median and interquartile range, and the largest logit difference between the two models on
that batch (a check that the same method is timed, not a fidelity test: tests/test_fidelity.py is).

The official code is read from ``--official-root``, one checkout per repository under the names
below (``git clone`` of each; never vendored here); each repository's commit is read from its
checkout and printed, with the compatibility shims this script applies to run it on current timm
(the same shims the golden logits under the data root's ``fidelity/`` were made with).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import types
from argparse import Namespace
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from harness.measurement import measure  # noqa: E402
from harness.sweep.cell import prepare_cell  # noqa: E402
from harness.loading.models import load_checkpoint, resolve_model  # noqa: E402
from harness.paths import data_root  # noqa: E402
from harness.registry import make_method  # noqa: E402
from scripts.official_code import git_head, on_path  # noqa: E402


@dataclass(frozen=True)
class Case:
    """One method: its official repository (a folder under --official-root), how the official model is
    built, and the project's method, options and knob value for the same setting."""

    method: str
    repo: str
    folder: str
    build: Callable[[Path, "ModelSpecLike", dict], nn.Module]
    knob: float
    options: dict
    setting: str
    shims: tuple[str, ...]


ModelSpecLike = object  # harness.loading.models.ModelSpec; kept loose so the table of cases reads first


# ----------------------------------------------------------------------------- import helpers

@contextlib.contextmanager
def timm_registry_untouched():
    """timm 1.x overwrites a registered name; the repositories register deit_tiny_patch16_224 & co again."""
    import timm.models._registry as registry
    import timm.models.registry as alias

    saved = registry.register_model, alias.register_model
    registry.register_model = alias.register_model = lambda fn: fn
    try:
        yield
    finally:
        registry.register_model, alias.register_model = saved


def empty_packages(root: Path, *names: str) -> None:
    """Package modules whose ``__init__`` is not run (it imports language-model patches we do not need)."""
    for name in names:
        module = types.ModuleType(name)
        module.__path__ = [str(root.joinpath(*name.split(".")))]
        sys.modules[name] = module


def timm_model(spec, state: dict) -> nn.Module:
    """timm's own model for ``spec`` with ``state`` loaded: what the ToMe / DiffRate / PiToMe / PPT patches take."""
    import timm

    model = timm.create_model(spec.arch, num_classes=spec.num_classes)
    model.load_state_dict(state)
    return model.eval()


def first(out):
    """Some official forwards return (logits, flops)."""
    return out[0] if isinstance(out, tuple) else out


# ----------------------------------------------------------------------------- the official models

def build_tome(root: Path, spec, state: dict) -> nn.Module:
    with on_path(root, ("tome",)):
        import tome
        model = timm_model(spec, state)
        tome.patch.timm(model, trace_source=False, prop_attn=True)
    model.r = 13
    return model


def build_evit(root: Path, spec, state: dict) -> nn.Module:
    sys.modules.setdefault("torchprofile", types.SimpleNamespace(profile_macs=None))
    with on_path(root, ("evit", "helpers")), timm_registry_untouched():
        import evit
        keep = tuple(0.7 if i in (3, 6, 9) else 1.0 for i in range(12))
        model = evit.EViT(num_classes=spec.num_classes, keep_rate=keep, fuse_token=True, **_deit_dims(spec))
    model.load_state_dict(state)
    return model.eval()


def _deit_dims(spec) -> dict:
    dims = {"deit_tiny_patch16_224": (192, 3), "deit_small_patch16_224": (384, 6), "deit_base_patch16_224": (768, 12)}
    embed_dim, heads = dims[spec.arch]
    return {"patch_size": 16, "embed_dim": embed_dim, "depth": 12, "num_heads": heads}


DIFFRATE_KEYS = {"deit_tiny_patch16_224": "ViT-T-DeiT", "deit_small_patch16_224": "ViT-S-DeiT"}


def diffrate_schedule(root: Path, spec) -> tuple[list[int], list[int]]:
    """The published kept counts at 0.7 of DeiT-T's GFLOPs (2.3 for DeiT-S), from the repository's own file."""
    key = DIFFRATE_KEYS[spec.arch]
    entry = json.loads((root / "compression_rate.json").read_text())[key]["0.7" if "T" in key else "2.3"]
    return json.loads(entry["prune_kept_num"]), json.loads(entry["merge_kept_num"])


def build_diffrate(root: Path, spec, state: dict) -> nn.Module:
    with on_path(root, ("DiffRate",)):
        empty_packages(root, "DiffRate", "DiffRate.patch")
        deit = importlib.import_module("DiffRate.patch.deit")
        model = timm_model(spec, state)
        deit.apply_patch(model)
    for blk in model.blocks:
        blk.drop_path = nn.Identity()  # DiffRateBlock calls self.drop_path (timm 0.x); Identity at eval anyway
    model.set_kept_num(*diffrate_schedule(root, spec))
    return model


def _timm0412(model: nn.Module) -> nn.Module:
    """Put back the timm 0.4.12 forward the PiToMe repository's patches are written against."""
    from timm.models.vision_transformer import VisionTransformer

    class Timm0412VisionTransformer(VisionTransformer):
        def forward(self, x):
            return self.head(self.forward_features(x))

    model.__class__ = Timm0412VisionTransformer
    model.dist_token, model.pre_logits, model.head_dist = None, nn.Identity(), None
    return model


def build_pitome_family(algo: str, root: Path, spec, state: dict) -> nn.Module:
    with on_path(root, ("algo",)):
        importlib.import_module("algo")
        empty_packages(root, f"algo.{algo}", f"algo.{algo}.patch")
        deit = importlib.import_module(f"algo.{algo}.patch.deit")
        model = _timm0412(timm_model(spec, state))
        with contextlib.redirect_stdout(None):  # apply_patch prints 'using <algo>'
            deit.apply_patch(model)
    model.ratio = 0.9
    return model


def build_mctf(root: Path, spec, state: dict) -> nn.Module:
    with on_path(root, ("models", "utils")), timm_registry_untouched():
        deit = importlib.import_module("models.deit")
        build = {"deit_tiny_patch16_224": deit.deit_tiny, "deit_small_patch16_224": deit.deit_small}[spec.arch]
        model = build(pretrained=False, num_classes=spec.num_classes, drop_rate=0.0, drop_path_rate=0.0,
                      use_mctf=True, mctf_type=[16, 0, 0, 1, 1, 1, 20, 40, 1, 1, 0], task_type=[1, 0, 0, 0],
                      activate_layer=list(range(1, 12)))
    model.load_state_dict(state)
    model.eval()
    forward = model.forward
    model.forward = lambda x: forward(x, r_eval=16)  # engine.evaluate's call
    return model


def build_ppt(root: Path, spec, state: dict) -> nn.Module:
    with on_path(root, ("ppt_deit", "tome")):
        import ppt_deit
        model = timm_model(spec, state)
        ppt_deit.apply_patch(model, trace_source=False, prop_attn=True, pp_loc_list=[3, 6, 9], threshold=7e-5)
    model.r, model.epoch = 50, 0
    return model


def build_atc(root: Path, spec, state: dict) -> nn.Module:
    found = importlib.util.spec_from_file_location("atc_official", root / "ATC_setup" / "models" / "atc.py")
    module = importlib.util.module_from_spec(found)
    found.loader.exec_module(module)
    args = Namespace(reduction_ratio=[0.7], reduction_loc=[3, 6, 9], linkage="average", proportional_attn=True)
    with contextlib.redirect_stdout(None):  # its __init__ prints the cluster counts
        model = module.AgglomerativeClusteringVisionTransformer(
            mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=spec.num_classes,
            args=args, **_deit_dims(spec))
    model.load_state_dict(state)
    return model.eval()


def build_gtp(root: Path, spec, state: dict) -> nn.Module:
    from scripts.gtp_golden import cuda_to_is_noop  # the golden script's shim: the spatial graph stays on the CPU

    on_cpu = DEVICE.type == "cpu"  # on a GPU the official code moves its spatial graph to CUDA itself
    with on_path(root, ("models_v3",)), timm_registry_untouched(), cuda_to_is_noop() if on_cpu else nullcontext():
        import models_v3
        model = models_v3.GraphPropagationTransformer(
            mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=spec.num_classes,
            selection="MixedAttnMax", propagation="GraphProp", sparsity=1.0, num_prop=9, num_neighbours=8,
            alpha=0.1, token_scale=True, graph_type="Mixed", **_deit_dims(spec))
    model.load_state_dict(state, strict=True)
    return model.eval()


def build_dynamicvit(root: Path, spec, state: dict) -> nn.Module:
    """The official DynamicViT at rho 0.7 with the project's predictor weights (the same seeded init)."""
    from harness.schedule import arch_spec
    from scripts.dynamicvit_golden import import_shims

    project = timm_model(spec, state)
    make_method("dynamicvit").patch(project, 0.7, arch_spec(project))  # its predictors, seeded as a cell's
    with import_shims(), on_path(root, ("models", "utils", "losses")), timm_registry_untouched():
        from models import dyvit
        model = dyvit.VisionTransformerDiffPruning(
            mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=spec.num_classes,
            pruning_loc=[3, 6, 9], token_ratio=[0.7, 0.7 ** 2, 0.7 ** 3], distill=True, **_deit_dims(spec))
    model.load_state_dict(state, strict=False)  # the predictors are not in the checkpoint
    model.score_predictor.load_state_dict(project.score_predictor.state_dict(), strict=True)
    return model.eval()


NO_EDIT = "no edit to the repository's files"
REGISTRY = "timm's register_model is a no-op while the repository's model file is imported (timm 1.x would overwrite deit_*)"
CASES = [
    Case("tome", "facebookresearch/ToMe", "ToMe", build_tome, 13, {}, "r=13, proportional attention",
         (NO_EDIT, "tome.patch.timm runs unchanged on timm 1.x")),
    Case("evit", "youweiliang/evit", "evit", build_evit, 0.7, {}, "keep rate 0.7 at blocks 3, 6, 9, fused token",
         (NO_EDIT, "evit.EViT(...) built directly (its _create_evit uses timm 0.4's builder)", REGISTRY,
          "a stub torchprofile module (helpers.py imports it for MAC counting only)")),
    Case("diffrate", "OpenGVLab/DiffRate", "DiffRate", build_diffrate, 0.0, {},
         "the published ViT-T-DeiT 0.7 G kept counts (ViT-S-DeiT 2.3 G on DeiT-S)",
         (NO_EDIT, "DiffRate/__init__.py and patch/__init__.py not run (they import caformer -> timm 0.x)",
          "blk.drop_path = Identity (DiffRateBlock calls timm 0.x's drop_path)", "logits = output[0]")),
    Case("pitome", "hchautran/PiToMe", "PiToMe", partial(build_pitome_family, "pitome"), 0.9, {}, "ratio 0.9",
         (NO_EDIT, "algo/<m>/__init__.py and patch/__init__.py not run (BERT/BLIP/CLIP imports)",
          "timm 0.4.12's VisionTransformer.forward put back (model.__class__ shim; dist_token, pre_logits, head_dist)",
          "logits = output[0]")),
    Case("tofu", "hchautran/PiToMe", "PiToMe", partial(build_pitome_family, "tofu"), 0.9, {}, "ratio 0.9",
         ("as pitome",)),
    Case("dct", "hchautran/PiToMe", "PiToMe", partial(build_pitome_family, "dct"), 0.9, {}, "ratio 0.9",
         ("as pitome; the official rounds tokens to fp16 after every block, the project's default does not",)),
    Case("mctf", "mlvlab/MCTF", "MCTF", build_mctf, 16, {}, "r=16, one-step-ahead attention, the README's taus",
         (NO_EDIT, "models.deit.deit_tiny / deit_small built directly", REGISTRY, "model(x, r_eval=16)")),
    Case("ppt", "xjwu1024/PPT", "PPT", build_ppt, 50, {"threshold": 7e-5, "pp_loc_list": [3, 6, 9]},
         "r=50, threshold 7e-5 at blocks 3, 6, 9", (NO_EDIT, "only ppt_deit.py and its own tome.py imported")),
    Case("atc", "JoakimHaurum/ATC", "ATC", build_atc, 0.7, {}, "keep rate 0.7, average linkage, proportional attention",
         (NO_EDIT, "only ATC_setup/models/atc.py imported (needs scikit-learn)")),
    Case("dynamicvit", "raoyongming/DynamicViT", "DynamicViT", build_dynamicvit, 0.7, {},
         "rho 0.7 before blocks 3, 6, 9, the same (untrained, seeded) predictor weights in both",
         (NO_EDIT, "VisionTransformerDiffPruning built directly at the model's shape", REGISTRY,
          "torch._six and tensorboardX stand-ins while utils.py is imported (scripts/dynamicvit_golden.py)")),
    Case("gtp", "Ackesnal/GTP-ViT", "GTP-ViT", build_gtp, 9, {},
         "num_prop=9 (0.7 of the GMACs), MixedAttnMax, Mixed graph, alpha 0.1, token scales",
         (NO_EDIT, "GraphPropagationTransformer built directly at the model's shape", REGISTRY,
          "Tensor.to('cuda') a no-op while it is built (its spatial graph is moved to CUDA)",
          "run in a temporary working directory (propagate() appends to ./missing on every call)")),
]


# ----------------------------------------------------------------------------- the project's models

def project_model(case: Case, spec, state: dict, official_root: Path, workdir: Path) -> nn.Module:
    """The project's method at the case's setting, prepared the way every cell is."""
    options, knob = dict(case.options), case.knob
    if case.method == "diffrate":  # the same kept counts, through the method's public schedules option
        from harness.methods.diffrate import tokens_after
        from harness.schedule import Schedule, analytic_gmacs, arch_spec

        prune, merge = diffrate_schedule(official_root / case.folder, spec)
        arch = arch_spec(timm_model(spec, state))
        full = analytic_gmacs(arch, Schedule.full(arch))
        knob = analytic_gmacs(arch, Schedule(arch.tokens_in, tokens_after(arch.tokens_in, prune, merge))) / full
        path = workdir / "compression_rate.json"
        key = DIFFRATE_KEYS[spec.arch]
        path.write_text(json.dumps({key: {f"{knob * full:.4f}": {"prune_kept_num": json.dumps(prune),
                                                                "merge_kept_num": json.dumps(merge)}}}))
        options = {"schedules": str(path), "model_key": key}
    method = make_method(case.method, {case.method: options})
    return prepare_cell(spec, method, knob_value=knob, state_dict=state).model


# ----------------------------------------------------------------------------- timing

def commit_of(folder: Path) -> str:
    return git_head(folder) or "unknown (not a git checkout)"


# wall: elapsed time; cpu: this process's CPU time (with --threads 1, robust to other jobs on a shared machine)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]
DEVICE = torch.device("cpu")  # --device: where both models and the batch live


def _seconds(model: nn.Module, x: torch.Tensor) -> float:
    start = clock()
    first(model(x))
    if DEVICE.type == "cuda":  # kernels run asynchronously: the time is the GPU's when they are done
        torch.cuda.synchronize(DEVICE)
    return clock() - start


def interleaved(pairs: dict[str, tuple[nn.Module, nn.Module]], x: torch.Tensor,
                rounds: int) -> dict[str, list[tuple[float, float]]]:
    """Per method, (official seconds, project seconds) of each round; the two run in alternating order."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in pairs}
    for r in range(rounds):
        for name, (official, project) in pairs.items():
            if r % 2:
                t_project, t_official = _seconds(project, x), _seconds(official, x)
            else:
                t_official, t_project = _seconds(official, x), _seconds(project, x)
            times[name].append((t_official, t_project))
    return times


def summary_row(case: Case, times: list[tuple[float, float]], diff: float) -> str:
    ratios = [official / project for official, project in times]
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    official_ms, project_ms = (1000 * statistics.median(t) for t in zip(*times))
    return (f"| {case.method} | {case.setting} | {official_ms:.1f} | {project_ms:.1f} "
            f"| **{statistics.median(ratios):.2f}** | {q1:.2f}-{q3:.2f} | {diff:.1e} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official-root", type=Path, required=True,
                   help="folder holding one checkout per repository: " + ", ".join(sorted({c.folder for c in CASES})))
    p.add_argument("--model", default="deit_tiny_cifar10", help="the harness's model name (DeiT-T / DeiT-S)")
    p.add_argument("--methods", default=",".join(c.method for c in CASES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall time, or the process's CPU time (use with --threads 1 on a busy machine)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (cuda: wall time, synchronised)")
    args = p.parse_args(argv)
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(wanted) - {c.method for c in CASES})
    missing = sorted({c.folder for c in CASES if c.method in wanted and not (args.official_root / c.folder).is_dir()})
    if unknown or missing:
        print(f"error: unknown methods {unknown}" if unknown else
              f"error: no checkout of {', '.join(missing)} under {args.official_root}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    global clock, DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no GPU", file=sys.stderr)
        return 2
    clock = CLOCKS["wall" if DEVICE.type == "cuda" else args.clock]
    return run(args, [c for c in CASES if c.method in wanted])


def run(args, cases: list[Case]) -> int:
    torch.set_grad_enabled(False)
    spec = resolve_model(args.model, {}, data_root())
    state = load_checkpoint(spec)
    pairs, diffs = {}, {}
    args.official_root = args.official_root.resolve()
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp, measure.autocast(DEVICE, args.dtype):
        os.chdir(tmp)  # GTP-ViT's propagate() writes ./missing
        try:
            times = _timed(args, cases, spec, state, Path(tmp), pairs, diffs)
        finally:
            os.chdir(cwd)
    print(report(args, cases, times, diffs))
    return 0


def _timed(args, cases: list[Case], spec, state: dict, tmp: Path, pairs: dict, diffs: dict) -> dict:
    """Build both models of each case, note their logits' difference, then time them interleaved."""
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224).to(DEVICE)
    for case in cases:
        official = case.build(args.official_root / case.folder, spec, state).to(DEVICE)
        project = project_model(case, spec, state, args.official_root, tmp).to(DEVICE)
        diffs[case.method] = (first(official(x)).float() - first(project(x)).float()).abs().max().item()
        pairs[case.method] = (official, project)
    interleaved(pairs, x, 1)  # warm-up
    return interleaved(pairs, x, args.rounds)


def report(args, cases: list[Case], times: dict, diffs: dict) -> str:
    where = (f"GPU {torch.cuda.get_device_name(DEVICE)}, wall clock (synchronised)" if DEVICE.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads, {args.clock} clock")
    lines = [f"{args.model}, batch {args.batch}, {args.dtype}, {where}, torch {torch.__version__}, "
             f"{args.rounds} interleaved rounds", "",
             "| method | setting | official ms | project ms | official / project (median) | IQR | max abs logit diff |",
             "|---|---|---|---|---|---|---|"]
    lines += [summary_row(c, times[c.method], diffs[c.method]) for c in cases]
    lines += ["", "Official code:"]
    for repo, folder in dict.fromkeys((c.repo, c.folder) for c in cases):
        lines.append(f"- {repo} at {commit_of(args.official_root / folder)}")
    lines += ["", "Shims:"] + [f"- {c.method}: " + "; ".join(c.shims) for c in cases]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
