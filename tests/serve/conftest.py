"""Fixtures for the server tests: a calibrated runner and a server on 127.0.0.1 at an ephemeral port."""

from __future__ import annotations

import pytest
import torch

import slimmable
from slimmable.runtime import SlimmableRunner
from slimmable.serve import PredictionServer


@pytest.fixture(scope="module")
def runner():
    # One intra-op thread: two OpenMP threads competing with another process on a shared 2-core machine stall.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = slimmable.create_model("slim_mobilenet_v2", num_classes=10, small_input=True).eval()
    r = SlimmableRunner(model, input_size=32, calibration_s=0.5)
    yield r
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def server(runner):
    srv = PredictionServer(runner, "127.0.0.1", 0, labels=[f"class{i}" for i in range(10)])
    srv.start()
    yield srv
    srv.stop()
