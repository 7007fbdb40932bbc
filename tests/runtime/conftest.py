"""Fixtures for the runner tests: one intra-op thread, a small slimmable MobileNet v2."""

from __future__ import annotations

import pytest
import torch

import slimmable


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: two OpenMP threads competing with another process on a shared 2-core machine can
    stall for seconds; latency-driven tests need steady timings."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return slimmable.create_model("slim_mobilenet_v2", num_classes=10, small_input=True).eval()
