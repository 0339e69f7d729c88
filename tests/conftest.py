"""Shared test helpers: where the golden fixtures live, the test device."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# The tests compare vectors with fp32 goldens at tight tolerances, on every CPU: the default
# dtype is fp32 unless BINDSEARCH_DTYPE says otherwise (on a CPU with native bf16 "auto" would
# pick bf16). tests/test_dtype*.py ask for "auto" explicitly and force the probe's answer.
os.environ.setdefault("BINDSEARCH_DTYPE", "fp32")


def shared_dir() -> Path:
    """``../shared`` next to the repo (CI lays it there), or ``BINDSEARCH_SHARED``."""
    return Path(os.environ.get("BINDSEARCH_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    path = shared_dir() / "fixtures"
    if not path.is_dir():
        pytest.fail(f"golden fixtures not found at {path} (set BINDSEARCH_SHARED)")
    return path


@pytest.fixture(scope="session")
def parity_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "imagebind-parity"


@pytest.fixture(scope="session")
def test_device() -> torch.device:
    """Tests run on CPU unless BINDSEARCH_TEST_DEVICE says otherwise (timm's TORCH_DEVICE)."""
    return torch.device(os.environ.get("BINDSEARCH_TEST_DEVICE", "cpu"))
