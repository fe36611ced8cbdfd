"""Shared fixtures. Tests run on CPU in seconds with random-weight timm models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from harness.paths import ENV_DATA_ROOT, PROJECT_ROOT

SHARED = Path(os.environ.get(ENV_DATA_ROOT) or PROJECT_ROOT.parent / "shared")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def shared():
    """The shared data root; tests that need real data skip cleanly without it."""
    if not (SHARED / "models").is_dir():
        pytest.skip(f"needs the shared data root: no {SHARED / 'models'} (set {ENV_DATA_ROOT})")
    return SHARED


@pytest.fixture(scope="session", autouse=True)
def _private_data_cache(tmp_path_factory):
    """Decoded-crop caches of this test session in a temporary folder, never the user's ~/.cache."""
    import os

    old = os.environ.get("HARNESS_CACHE_DIR")
    os.environ["HARNESS_CACHE_DIR"] = str(tmp_path_factory.mktemp("harness-cache"))
    yield
    if old is None:
        os.environ.pop("HARNESS_CACHE_DIR", None)
    else:
        os.environ["HARNESS_CACHE_DIR"] = old


_NEAR_TIES = pytest.StashKey[list]()


@pytest.fixture
def near_ties(request) -> list:
    """Near-tie images a golden-logit case accepted (tests/test_fidelity.py), printed after the run."""
    return request.config.stash.setdefault(_NEAR_TIES, [])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    accepted = config.stash.get(_NEAR_TIES, [])
    if accepted:
        terminalreporter.section("golden logits: near-tie images accepted (harness/measurement/fidelity.py)")
        for line in accepted:
            terminalreporter.write_line(line)
