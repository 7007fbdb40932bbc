"""Budgets through the server under load: ``/predict``'s ``budget_ms`` and V2's ``latency_budget_ms`` go through the
runner's load-aware width policy, and the answers say the width chosen, the predicted and measured latency and the
predicted queueing delay. A fake clock and a known latency table make the choices exact; a forward hook holds the
first request until the others have queued behind it."""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest
import torch

import slimmable
from slimmable.runtime import SlimmableRunner
from slimmable.serve import PredictionServer

#: ms per width at batch 1, large enough that the real milliseconds spent reading a request do not change a choice
TABLE = {1: {0.35: 100.0, 0.5: 200.0, 0.75: 300.0, 1.0: 400.0}}


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.t += seconds


@pytest.fixture(scope="module")
def gated():
    """A server whose runner takes TABLE's latency on a fake clock, width 1.0 waiting for the gate first."""
    torch.manual_seed(0)
    model = slimmable.create_model("slim_mobilenet_v2", num_classes=10, small_input=True).eval()
    clock, gate = FakeClock(), threading.Event()
    gate.set()
    runner = SlimmableRunner(model, input_size=32, calibrate=False, clock=clock, max_concurrency=1)
    runner.load_latencies(TABLE)
    # the queue rule alone: four requests within the fake second at 100-400 ms each would also trip the rate limit
    # (tested on its own in tests/runtime/test_policy.py)
    runner.policy.utilization = None

    def hook(w):
        def run(*_):
            if w == 1.0:
                assert gate.wait(30), "the test never opened the gate"
            clock.advance(TABLE[1][w] / 1e3)

        return run

    for w in runner.widths:
        runner.module(w).register_forward_hook(hook(w))
    with PredictionServer(runner, "127.0.0.1", 0) as srv:
        srv.v2.output_specs()  # found now: it runs a forward pass, which would move the fake clock mid-test
        yield srv, gate


def _post(srv, path, obj):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    try:
        conn.request("POST", path, json.dumps(obj), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _tensor():
    return torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(0))


def _predict(srv, **params):
    return _post(srv, "/predict", {"tensor": _tensor().tolist(), **params})


def _v2(srv, **params):
    x = _tensor().unsqueeze(0)
    inp = {"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.reshape(-1).tolist()}
    return _post(srv, "/v2/models/slim_mobilenet_v2/infer", {"inputs": [inp], "parameters": params})


def _wait_for(predicate, what):
    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def test_answers_report_the_choice_and_the_queue(gated):
    srv, _ = gated
    status, body = _predict(srv, budget_ms=750)
    assert status == 200, body
    assert body["width"] == 1.0 and body["predicted_ms"] == 400.0 and body["inference_ms"] == pytest.approx(400.0)
    assert body["predicted_queue_ms"] == 0.0 and body["queue_ms"] == 0.0 and body["budget_met"] is True
    status, body = _v2(srv, latency_budget_ms=750)
    assert status == 200, body
    params = body["parameters"]
    assert params["width"] == 1.0 and params["predicted_ms"] == 400.0 and params["latency_ms"] == pytest.approx(400.0)
    assert params["predicted_queue_ms"] == 0.0 and params["queue_ms"] == 0.0 and params["budget_met"] is True


def test_requests_behind_others_get_narrower_widths(gated):
    srv, gate = gated
    policy = srv.runner.policy
    gate.clear()
    answers: dict = {}

    def send(key, fn, **params):
        t = threading.Thread(target=lambda: answers.__setitem__(key, fn(srv, **params)))
        t.start()
        return t

    threads = [send("A", _predict, width=1.0)]  # holds the only slot until the gate opens
    _wait_for(lambda: policy.stats()["running"] == 1, "A to start")
    # B: 400 ms ahead, 350 left of 750 -> 0.75; C (V2): 400 + 300 ahead, 250 left of 950 -> 0.5;
    # D: 400 + 300 + 200 ahead of 500 -> nothing fits, the narrowest runs
    for n, (key, fn, params) in enumerate(
        [
            ("B", _predict, {"budget_ms": 750}),
            ("C", _v2, {"latency_budget_ms": 950}),
            ("D", _predict, {"budget_ms": 500}),
        ],
        start=1,
    ):
        threads.append(send(key, fn, **params))
        _wait_for(lambda n=n: policy.stats()["waiting"] == n, f"{key} to queue")
    gate.set()
    for t in threads:
        t.join(timeout=60)
    assert all(status == 200 for status, _ in answers.values()), answers
    b, c, d = answers["B"][1], answers["C"][1]["parameters"], answers["D"][1]
    assert (b["width"], c["width"], d["width"]) == (0.75, 0.5, 0.35)
    assert answers["C"][1]["model_version"] == "50"
    assert (b["predicted_queue_ms"], c["predicted_queue_ms"], d["predicted_queue_ms"]) == (400.0, 700.0, 900.0)
    assert (b["predicted_ms"], c["predicted_ms"], d["predicted_ms"]) == (300.0, 200.0, 100.0)
    assert all(r["queue_ms"] >= 400.0 - 1e-6 for r in (b, c, d))  # each waited for A at least
    assert d["budget_met"] is False  # served anyway, at the narrowest width
    status, alone = _predict(srv, budget_ms=750)
    assert status == 200 and alone["width"] == 1.0 and alone["predicted_queue_ms"] == 0.0
