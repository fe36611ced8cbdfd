"""Packaging: the built-in configuration, where the data root is found, and a run that leaves the checkout alone.

The wheel itself (built, installed in a fresh venv, run from another directory) is checked by
``.ci/run``: building one takes longer than a test should.
"""
from __future__ import annotations

import shutil
import subprocess
import tomllib

import pytest

from harness import paths
from harness.cli import main
from harness.sweep.config import load_config
from harness.paths import DEFAULT_CONFIG, PROJECT_ROOT, data_root, default_config


def test_built_in_defaults_are_the_checkouts_benchmark_toml():
    """``harness/default_benchmark.toml`` (shipped in the wheel) cannot drift from ``benchmark.toml``."""
    assert DEFAULT_CONFIG.read_bytes() == (PROJECT_ROOT / "benchmark.toml").read_bytes()
    assert load_config(DEFAULT_CONFIG).suites == load_config(PROJECT_ROOT / "benchmark.toml").suites


def test_wheel_ships_the_defaults_and_the_methods_inside_harness():
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    assert "default_benchmark.toml" in project["tool"]["setuptools"]["package-data"]["harness"]
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["harness", "harness.*"]
    assert (PROJECT_ROOT / "harness" / "methods").resolve() == (PROJECT_ROOT / "methods").resolve()
    assert set(project["project"]["optional-dependencies"]) == {"test", "bench", "slurm"}
    runtime = " ".join(project["project"]["dependencies"])
    assert not any(extra in runtime for extra in ("pytest", "asv", "submitit"))


def test_config_from_the_working_directory_else_built_in(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_config() == DEFAULT_CONFIG
    (tmp_path / "benchmark.toml").write_text('[run]\nsuite = "mine"\n')
    assert default_config().resolve() == (tmp_path / "benchmark.toml").resolve()


def test_data_root_flag_then_environment_then_working_directory(tmp_path, monkeypatch):
    work, flag, env = tmp_path / "a" / "work", tmp_path / "flag", tmp_path / "env"
    for folder in (work, flag, env, tmp_path / "a" / "shared"):
        folder.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setattr(paths, "checkout_root", lambda: None)  # as an installed copy
    monkeypatch.delenv(paths.ENV_DATA_ROOT, raising=False)
    assert data_root() == tmp_path / "a" / "shared"  # ../shared
    (work / "shared").mkdir()
    assert data_root() == work / "shared"  # ./shared first
    monkeypatch.setenv(paths.ENV_DATA_ROOT, str(env))
    assert data_root() == env
    assert data_root(str(flag)) == flag


def test_no_data_root_names_where_it_looked(tmp_path, monkeypatch):
    from harness.errors import HarnessError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(paths, "checkout_root", lambda: None)
    monkeypatch.delenv(paths.ENV_DATA_ROOT, raising=False)
    with pytest.raises(HarnessError, match="--data-root"):
        data_root()


def _git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, check=True, timeout=60).stdout


@pytest.mark.slow
def test_run_with_results_elsewhere_leaves_the_checkout_unchanged(tmp_path, monkeypatch, capsys):
    if shutil.which("git") is None or not (PROJECT_ROOT / ".git").exists():
        pytest.skip("not a git checkout (or no git): nothing to compare")
    before = _git_status()
    monkeypatch.chdir(PROJECT_ROOT)  # relative defaults (results, reports) would land in the checkout
    code = main(["run", "--models", "deit_tiny_patch16_224", "--weights", "random", "--data", "synthetic",
                 "--methods", "none,tome", "--budgets", "0.7", "--device", "cpu", "--limit", "4", "--repeats", "1",
                 "--throughput-batch-size", "2", "--results", str(tmp_path / "x")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "x" / "reports").is_dir()  # the report was written, beside the results
    assert _git_status() == before

