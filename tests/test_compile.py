"""Speed that survives modern kernels: every registered method compiles as one graph, and no
reducer syncs with the host (issue 17).

Token counts per block are fixed by the knob, so a reducer's shapes follow from the schedule
alone: gathers use ``topk`` / ``argsort`` slices, never ``nonzero`` or boolean masks, and nothing
reads a tensor's value back to Python. ``torch.compile(fullgraph=True)`` fails on any graph break,
which catches both; the lint below names the line before anyone compiles.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import timm
import torch

from harness.sweep.budget import parse_budget, resolve
from harness.paths import PROJECT_ROOT
from harness.registry import make_method, method_names
from harness.schedule import Schedule, analytic_gmacs, arch_spec
from harness.seam import set_prop_attn_impl

BUDGET = "0.7"
DEPTH = 4


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", depth=DEPTH, num_classes=10).eval()


def _diffrate_schedules(arch, path: Path) -> dict:
    """A compression_rate.json with a few kept-count lists for the small test model, keyed by GMACs."""
    from harness.methods.diffrate import tokens_after

    entries = {}
    for step in (10, 25, 40, 55):
        prune = [arch.tokens_in] + [arch.tokens_in - step * i for i in range(1, DEPTH)]
        merge = [arch.tokens_in] + [arch.tokens_in - step * i - step // 2 for i in range(1, DEPTH)]
        gmacs = analytic_gmacs(arch, Schedule(arch.tokens_in, tokens_after(arch.tokens_in, prune, merge)))
        entries[f"{gmacs:.4f}"] = {"prune_kept_num": json.dumps(prune), "merge_kept_num": json.dumps(merge)}
    path.write_text(json.dumps({"ViT-T-DeiT": entries}))
    return {"schedules": str(path), "model_key": "ViT-T-DeiT"}


# Methods that cannot solve a budget from their defaults alone (a search) get options that can.
OPTIONS = {"diffrate": _diffrate_schedules}


def _patched(name: str, tmp_path: Path) -> torch.nn.Module:
    model = _model()
    arch = arch_spec(model)
    options = OPTIONS[name](arch, tmp_path / "schedules.json") if name in OPTIONS else {}
    method = make_method(name, {name: options})
    value = resolve(method, arch, parse_budget(BUDGET)).knob_value
    method.patch(model, value, arch)
    return model


def _compiled_matches_eager(model: torch.nn.Module, x: torch.Tensor) -> list[int]:
    """Compile ``model`` as one graph, check it against eager; the tokens each block left."""
    import torch._dynamo

    torch._dynamo.reset()
    state = getattr(model, "_seam_state", None)
    if state is not None:
        state.recording = True
    with torch.no_grad():
        eager = model(x)
        observed = list(state.observed) if state is not None else []
        compiled = torch.compile(model, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    if state is not None:
        assert state.observed == observed  # the compiled forward reduced as the eager one did
    return observed


@pytest.mark.slow
@pytest.mark.parametrize("name", method_names())
def test_every_method_compiles_as_one_graph(name, tmp_path):
    model = _patched(name, tmp_path)
    observed = _compiled_matches_eager(model, torch.randn(2, 3, 224, 224))
    if name != "none":
        assert observed[-1] < 197  # a real budget: tokens did leave


@pytest.mark.parametrize("follower", ["random@evit", "random@tome"])
def test_followers_compile_as_one_graph(follower, tmp_path):
    model = _patched(follower, tmp_path)
    assert _compiled_matches_eager(model, torch.randn(2, 3, 224, 224))[-1] < 197


@pytest.mark.parametrize("name", ["tome", "diffrate"])
def test_folded_proportional_attention_compiles_as_one_graph(name, tmp_path):
    # flex cannot (tests/test_prop_attn.py says why and what it does instead)
    model = _patched(name, tmp_path)
    set_prop_attn_impl(model, "fold")
    _compiled_matches_eager(model, torch.randn(2, 3, 224, 224))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["evit", "random"])
def test_inductor_compiles_the_once_breaking_methods(name, tmp_path):
    import torch._dynamo

    model = _patched(name, tmp_path)
    x = torch.randn(2, 3, 224, 224)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- the host-sync lint

# Calls whose result size or value is only known once the device is done.
SYNC_CALLS = {"nonzero", "item", "tolist", "masked_select", "argwhere", "unique", "unique_consecutive", "Generator",
              "cpu", "numpy"}
# Methods that make a boolean tensor: indexing with one is a data-dependent shape.
MASK_CALLS = {"bool", "logical_and", "logical_or", "logical_not", "logical_xor", "isfinite", "isnan", "isinf", "isin",
              "eq", "ne", "lt", "le", "gt", "ge"}
# Tensor methods whose value, handed to int() / float() / bool() or an ``if``, is read back to Python.
VALUE_CALLS = {"sum", "mean", "max", "min", "any", "all", "detach", "norm", "prod", "argmax", "argmin", "count_nonzero"}

# Code outside the inference forward, where a sync is the point or harmless: (file, function) -> why.
OFF_THE_FORWARD = {
    ("methods/diffrate/search.py", "_value"): "reads a search count's value (the search, not inference)",
    ("methods/diffrate/search.py", "Rates._mask_tokens"): "the search's masked forward reads its kept count (not inference)",
    ("methods/diffrate/search.py", "_search_step"): "the search reports its loss",
    ("methods/diffrate/search.py", "search_rates"): "the search shuffles its data with a seeded generator",
    ("methods/atc.py", "_agglomerate"): "ATC's number of clustering rounds depends on the keys: one host read per "
                                        "round (tens per reduction block), inside the custom op harness::atc_labels, "
                                        "which a compiled model calls as one node of its one graph",
    ("methods/dynamicvit.py", "DynamicViT.reducers"): "seeds its predictors' initialisation (patch time, not inference)",
    ("methods/dynamicvit.py", "init_uniform_"): "the golden check's seeded predictor weights (not inference)",
    ("methods/dynamicvit.py", "state_sha256"): "hashes the golden check's predictor weights (not inference)",
}
LINTED = sorted(str(p.relative_to(PROJECT_ROOT)) for p in [*(PROJECT_ROOT / "methods").rglob("*.py"),
                                                               *(PROJECT_ROOT / "harness" / "seam").glob("*.py")])


def _call_name(node: ast.AST) -> str:
    if isinstance(node, ast.Call):
        func = node.func
        return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return ""


def _method_name(node: ast.AST) -> str:
    """``name`` of a call ``obj.name(...)``; '' for a plain function such as the builtin ``max``."""
    return node.func.attr if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else ""


def _is_mask(node: ast.AST, masks: set[str]) -> bool:
    """An expression that reliably is a boolean tensor: a comparison, ``~``, ``&`` / ``|`` of masks,
    a call such as ``.bool()`` / ``torch.isfinite``, or a name the function bound to one of those."""
    if isinstance(node, ast.Compare) or isinstance(node, ast.Name) and node.id in masks:
        return True
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Invert):
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitAnd, ast.BitOr, ast.BitXor)):
        return _is_mask(node.left, masks) or _is_mask(node.right, masks)
    return _method_name(node) in MASK_CALLS


def _mask_names(func: ast.AST) -> set[str]:
    """Names ``func`` binds to a mask expression (``keep = scores > t``)."""
    names: set[str] = set()
    for node in ast.walk(func):
        if isinstance(node, ast.Assign) and _is_mask(node.value, names):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def _reads_a_value(node: ast.AST) -> bool:
    return any(_method_name(n) in VALUE_CALLS for n in ast.walk(node))


def _syncs(node: ast.AST, masks: set[str]) -> list[str]:
    """What in ``node`` itself (not its children) syncs with the host."""
    name = _call_name(node)
    if name in SYNC_CALLS:
        return [f"{name}()"]
    if name == "where" and len(node.args) == 1:
        return ["where(cond)"]
    if name in ("int", "float", "bool") and isinstance(node.func, ast.Name) and node.args and _reads_a_value(node.args[0]):
        return [f"{name}(tensor)"]
    if isinstance(node, (ast.If, ast.While, ast.Assert)) and _reads_a_value(node.test):
        return ["tensor truth value"]
    if isinstance(node, ast.Subscript):
        parts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if any(_is_mask(p, masks) for p in parts):
            return ["boolean-mask indexing"]
    return []


def find_host_syncs(source: str) -> list[tuple[str, int, str]]:
    """(function, line, what) for each host sync in ``source``, functions named ``Class.method``;
    a closure counts as part of the function that makes it."""
    found = []

    def visit(node: ast.AST, scope: str, masks: set[str], in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{scope}.{child.name}".lstrip("."), masks, in_function)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = scope if in_function else f"{scope}.{child.name}".lstrip(".")
                visit(child, inner, (masks if in_function else set()) | _mask_names(child), True)
            else:
                found.extend((scope, child.lineno, what) for what in _syncs(child, masks))
                visit(child, scope, masks, in_function)

    visit(ast.parse(source), "", set(), False)
    return found


PLANTED = '''
def select(x, scores, k):
    keep = scores > scores.mean()
    a = x[keep]
    b = x[:, scores.topk(k).indices]
    c = (scores > 0).nonzero()
    n = int(scores.sum())
    if (scores > 0).any():
        d = x[~keep, 1:]
    e = torch.where(keep)
    f = x[scores.isfinite() & keep]
    g = scores.max().item()
    return torch.where(keep, x, 0), x[:, :k], x[x.argsort()[:, :k]]

class R:
    def reducer(self):
        def reduce(x):
            g = torch.Generator().manual_seed(0)
            return x.tolist()
        return reduce
'''


def test_the_lint_flags_planted_host_syncs_and_only_those():
    found = find_host_syncs(PLANTED)
    assert [(line, what) for _, line, what in found] == [
        (4, "boolean-mask indexing"), (6, "nonzero()"), (7, "int(tensor)"), (8, "tensor truth value"),
        (9, "boolean-mask indexing"), (10, "where(cond)"), (11, "boolean-mask indexing"), (12, "item()"),
        (18, "Generator()"), (19, "tolist()"),
    ]
    assert {f for f, _, _ in found} == {"select", "R.reducer"}  # closures count as their maker


@pytest.mark.parametrize("path", LINTED)
def test_no_host_sync_in_the_forward_path(path):
    found = find_host_syncs((PROJECT_ROOT / path).read_text())
    bad = [f"{path}:{line} {func}: {what}" for func, line, what in found if (path, func) not in OFF_THE_FORWARD]
    assert not bad, "host syncs in the forward path:\n" + "\n".join(bad)


def test_off_the_forward_exceptions_are_still_needed():
    # an exception whose sync is gone must go too, or it would hide a new one
    for (path, func), why in OFF_THE_FORWARD.items():
        found = find_host_syncs((PROJECT_ROOT / path).read_text())
        assert any(f == func for f, _, _ in found), f"{path} {func} no longer syncs: drop it from OFF_THE_FORWARD"
