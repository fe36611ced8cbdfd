"""Shared fixtures. Tests run on CPU in seconds with random-weight timm models."""
from __future__ import annotations

import pytest
import torch

from harness.paths import PROJECT_ROOT

SHARED = PROJECT_ROOT.parent / "shared"


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
        pytest.skip("../shared is not present")
    return SHARED
