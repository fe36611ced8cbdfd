"""A method from an outside package, registered through the ``harness.methods`` entry-point group.

The package is the template plugin (``docs/template_method.py``) in a temporary directory, declared
the way ``docs/adding-a-method.md`` tells users to declare it. It is not pip-installed: a
``*.dist-info`` folder with the entry points that its pyproject declares makes it visible to
``importlib.metadata`` once the directory is on ``PYTHONPATH``. Whatever registers the plugin runs in
a subprocess, so this test process's registry never sees it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from harness.paths import PROJECT_ROOT

TEMPLATE = PROJECT_ROOT / "docs" / "template_method.py"
PLUGIN = "keynorm"
# the outsider's method that docs/adding-a-method.md walks through (section 7), shipped in the same package
WALKTHROUGH = PROJECT_ROOT / "docs" / "blockshift_method.py"
OUTSIDER = "blockshift"

PYPROJECT = """\
[project]
name = "harness-keynorm"
version = "0.1.0"
dependencies = ["vit-token-harness"]

[project.entry-points."harness.methods"]
keynorm = "harness_keynorm.keynorm"
blockshift = "harness_keynorm.blockshift"
broken = "harness_keynorm.does_not_exist"
"""


def _install_without_pip(source: Path, site: Path) -> None:
    """Make the package at ``source`` importable from ``site`` with its entry points visible.

    What ``pip install`` would leave behind, reduced to what ``importlib.metadata`` reads: the
    package itself and ``<name>-<version>.dist-info/{METADATA,entry_points.txt}``.
    """
    project = tomllib.loads((source / "pyproject.toml").read_text())["project"]
    (site / "harness_keynorm").symlink_to(source / "harness_keynorm", target_is_directory=True)
    dist = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    groups = project["entry-points"]
    (dist / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in eps.items()) for group, eps in groups.items()))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A directory that, on PYTHONPATH, provides the outside package ``harness-keynorm``."""
    source = tmp_path_factory.mktemp("harness-keynorm")
    (source / "pyproject.toml").write_text(PYPROJECT)
    (source / "harness_keynorm").mkdir()
    (source / "harness_keynorm" / "__init__.py").write_text("")
    (source / "harness_keynorm" / "keynorm.py").write_text(TEMPLATE.read_text())
    (source / "harness_keynorm" / "blockshift.py").write_text(WALKTHROUGH.read_text())
    site = tmp_path_factory.mktemp("site")
    _install_without_pip(source, site)
    return site


def _run(argv: list[str], site: Path, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_plugin_is_not_registered_here():
    from harness.registry import method_names

    assert PLUGIN not in method_names()  # the template lives outside methods/; only its package registers it
    assert OUTSIDER not in method_names()


# what docs/adding-a-method.md documents for plugins to import; anything else of the harness is internal
DOCUMENTED_MODULES = {"harness.registry", "harness.schedule", "harness.seam"}


@pytest.mark.parametrize("path", [TEMPLATE, WALKTHROUGH], ids=["template", "walkthrough"])
def test_plugins_use_only_the_documented_api(path):
    """No import of another method or of harness internals, no forward hook on the model's modules."""
    import ast

    imported = {node.module for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("harness")}
    assert imported <= DOCUMENTED_MODULES, imported - DOCUMENTED_MODULES
    assert "register_forward" not in path.read_text() and "harness.methods" not in imported


def test_template_selection_by_hand(monkeypatch):
    """The template's pure functions on a hand-made metric, without registering it here."""
    import harness.registry

    monkeypatch.setattr(harness.registry, "register_method", lambda cls: cls)
    spec = importlib.util.spec_from_file_location("keynorm_template_under_test", TEMPLATE)
    template = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, template)  # a dataclass reads its module's names
    spec.loader.exec_module(template)
    # token 0 is the class token (norm 0, never a candidate); the others have norms 3, 1, 4, 1.5, 5
    metric = torch.tensor([[[0.0, 0.0], [3, 0], [0, 1], [4, 0], [0, 1.5], [3, 4]]])
    assert template.smallest_norm_drop(metric, 2, num_prefix=1).tolist() == [[1, 3, 5]]
    assert template.clamp_r(10, num_tokens=6, num_prefix=1) == 4  # the last non-prefix token stays
    assert template.clamp_r(3, num_tokens=6, num_prefix=1) == 3


def test_ls_lists_the_outside_method_and_survives_a_broken_one(site, tmp_path):
    proc = _run(["-m", "harness", "ls", "methods"], site, tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = next((ln for ln in proc.stdout.splitlines() if ln.split()[:1] == [PLUGIN]), None)
    assert line is not None, proc.stdout
    assert "knob r " in line and "smallest key norm" in line
    assert any(ln.split()[:1] == [OUTSIDER] for ln in proc.stdout.splitlines()), proc.stdout
    assert "tome" in proc.stdout  # the built-in methods are still there
    assert "could not load method plugin broken" in proc.stderr


@pytest.mark.slow
def test_outside_method_runs_a_cell(site, tmp_path):
    results = tmp_path / "results"
    config = tmp_path / "benchmark.toml"
    config.write_text(f"""
[run]
results_dir = "{results}"
reports_dir = "{tmp_path / 'reports'}"
throughput_repeats = 1
throughput_warmup = 0
throughput_batch_size = 2
throughput_latency = false
flops = false
[suites.default]
models = ["tiny"]
methods = ["{PLUGIN}"]
budgets = ["0.7"]
[models.tiny]
timm = "deit_tiny_patch16_224"
weights = "random"
data = "synthetic"
""")
    argv = ["-m", "harness", "run", "--config", str(config), "--methods", PLUGIN, "--budgets", "0.7",
            "--limit", "8", "--device", "cpu", "--results", str(results), "--no-report"]
    proc = _run(argv, site, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = (results / "records").glob("*.json")
    record = json.loads(path.read_text())
    assert record["status"] == "ok", record.get("error")
    assert record["method"] == PLUGIN and record["method_version"] == "1"
    assert abs(record["gmacs_ratio"] - 0.7) < 0.02
    tokens = record["tokens_per_block"]
    assert len(tokens) == 12 and tokens[0] < 197 and tokens == sorted(tokens, reverse=True)


@pytest.mark.slow
def test_outside_method_passes_the_contract_tests(site):
    """The registry-parametrized contract tests pick the plugin up with no change to them."""
    argv = ["-m", "pytest", "-q", "-p", "no:cacheprovider", str(PROJECT_ROOT / "tests" / "test_contract.py"),
            "-k", f"{PLUGIN} or {OUTSIDER}"]
    proc = _run(argv, site, PROJECT_ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    passed = re.search(r"(\d+) passed", proc.stdout)
    # each: described, identity, observed x 2 budgets, monotone, random@<it>
    assert passed and int(passed.group(1)) >= 12, proc.stdout[-3000:]
