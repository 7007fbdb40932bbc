"""Shared fixtures: the official reference files and a device chosen by SLIMMABLE_TEST_DEVICE."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def official_dir() -> Path:
    """``../shared/official`` beside the checkout (override with SLIMMABLE_OFFICIAL_DIR)."""
    env = os.environ.get("SLIMMABLE_OFFICIAL_DIR")
    return Path(env) if env else REPO.parent / "shared" / "official"


@pytest.fixture(scope="session")
def official() -> Path:
    d = official_dir()
    if not (d / "README.md").exists():
        if os.environ.get("CI"):
            pytest.fail(f"official reference files not found at {d}; CI must provide ../shared/official")
        pytest.skip(f"official reference files not found at {d} (set SLIMMABLE_OFFICIAL_DIR)")
    return d


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device(os.environ.get("SLIMMABLE_TEST_DEVICE", "cpu"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# One intra-op thread: the suite's tensors are small, and two OpenMP threads on a shared 2-core machine can stall
# for seconds per call when another process holds a core. Tests that measure threading set it themselves.
torch.set_num_threads(1)
