"""A ``--triton-backend python`` repository served by the real Triton server: the one ``nvidia-pytriton`` bundles
(``pip install nvidia-pytriton``; skipped without it). Every width through ``tritonclient.http`` equals the slimmable
model; the router honours ``width`` and ``latency_budget_ms`` and refuses unknown widths.

The bundled server is started by :class:`slimmable.export.triton_local.LocalTriton`. The models' Python is this
one, or the one ``SLIMMABLE_TRITON_PYTHON`` names: nvidia-pytriton 0.7.0's stub is built against numpy 1.x
(pytriton requires numpy<2), and with numpy 2 every model answers "output tensor shape does not match size of
output", so an environment with numpy 2 needs a separate one for the models::

    python3.11 -m venv triton-env && triton-env/bin/pip install 'numpy<2' onnxruntime
    SLIMMABLE_TRITON_PYTHON=triton-env/bin/python pytest tests/export/test_export_triton_server.py -s

Run with ``-s`` to see the start-up time and latencies it measures.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fake_data import served_classifier

from slimmable.export import export_triton
from slimmable.export.triton_local import PIP_HINT, LocalTriton, TritonUnavailable
from slimmable.export.triton_repo import read_route
from slimmable.nn import use_width

pytestmark = pytest.mark.slow

WIDTHS = (0.25, 0.5, 1.0)
START_TIMEOUT_S = 240


def _model() -> torch.nn.Module:
    return served_classifier(WIDTHS)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The repository, written and served: ``model``, ``repo``, ``client`` (``tritonclient.http``), ``timings``."""
    httpclient = pytest.importorskip("tritonclient.http")
    if importlib.util.find_spec("pytriton") is None:  # before the 10 s export
        pytest.skip(f"the Triton server of nvidia-pytriton is not installed: {PIP_HINT}")
    work = tmp_path_factory.mktemp("triton")
    model = _model()
    t0 = time.perf_counter()
    repo = export_triton(model, work / "repo", name="mnv1", input_size=32, triton_backend="python", latency_runs=20)
    export_s = time.perf_counter() - t0
    server = LocalTriton(repo.path, python=os.environ.get("SLIMMABLE_TRITON_PYTHON"), start_timeout_s=START_TIMEOUT_S)
    try:
        server.start()
    except TritonUnavailable as err:
        pytest.skip(str(err))
    client = httpclient.InferenceServerClient(server.url)
    try:
        timings = {"export_s": export_s, "start_s": server.start_s}
        yield SimpleNamespace(model=model, repo=repo, client=client, timings=timings)
        print(f"\nbundled Triton: {', '.join(f'{k} {v:.2f}' for k, v in timings.items())}")
    finally:
        client.close()
        server.stop()


def _slim_out(model, width, x):
    with torch.no_grad(), use_width(model, width):
        return model(x)


def _infer(client, name, x, version="", parameters=None):
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x.numpy())
    result = client.infer(name, [inp], model_version=version, parameters=parameters)
    return torch.from_numpy(np.array(result.as_numpy("logits"))), result.get_response()


def _median_ms(fn, runs=20):
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def test_the_server_lists_a_version_per_width(served):
    client = served.client
    meta = client.get_model_metadata("mnv1")
    assert sorted(meta["versions"], key=int) == ["25", "50", "100"]
    assert [i["name"] for i in meta["inputs"]] == ["input"] and [o["name"] for o in meta["outputs"]] == ["logits"]
    assert client.is_model_ready("mnv1_router")


def test_every_width_equals_the_slimmable_model(served):
    model, repo, client, timings = served.model, served.repo, served.client, served.timings
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for version, w in repo.versions.items():
        got, _ = _infer(client, "mnv1", x, version=str(version))
        torch.testing.assert_close(got, _slim_out(model, w, x), atol=1e-4, rtol=0)
        x1 = x[:1]
        timings[f"v{version}_ms"] = _median_ms(lambda v=version, x1=x1: _infer(client, "mnv1", x1, str(v)))


def test_the_router_runs_the_requested_width(served):
    model, client, timings = served.model, served.client, served.timings
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for w in WIDTHS:
        for value in (w, str(w)):  # a number, and the string form
            got, response = _infer(client, "mnv1_router", x, parameters={"width": value})
            torch.testing.assert_close(got, _slim_out(model, w, x), atol=1e-4, rtol=0)
            params = response.get("parameters")
            if params:  # a Triton whose Python backend returns response parameters
                assert params["width"] == f"{w:g}" and int(params["version"]) == round(w * 100)
    got, _ = _infer(client, "mnv1_router", x)  # neither parameter: the widest
    torch.testing.assert_close(got, _slim_out(model, 1.0, x), atol=1e-4, rtol=0)
    x1 = x[:1]
    timings["router_w0.5_ms"] = _median_ms(lambda: _infer(client, "mnv1_router", x1, parameters={"width": 0.5}))


def test_the_router_fits_a_latency_budget(served):
    model, repo, client = served.model, served.repo, served.client
    route = read_route(repo.path, "mnv1")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    outs = {w: _slim_out(model, w, x) for w in WIDTHS}

    def ran(budget):  # the width whose output came back (the router's choice: the response may not say)
        got, response = _infer(client, "mnv1_router", x, parameters={"latency_budget_ms": budget})
        w = min(WIDTHS, key=lambda w: (got - outs[w]).abs().max().item())
        torch.testing.assert_close(got, outs[w], atol=1e-4, rtol=0)
        params = response.get("parameters")
        assert not params or params["width"] == f"{w:g}"
        return w

    # the load-aware policy predicts the export's latencies times the ratio it observed through Triton (requests
    # ran before this test), so a budget that is exactly a width's measured latency may run a narrower width
    for e in route["versions"]:
        assert ran(e["latency_ms"]) <= e["width"]
    assert ran(1e6) == 1.0
    assert ran(route["versions"][0]["latency_ms"]) == 0.25  # nothing fits below the fastest: the narrowest
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x.numpy())
    result = client.infer("mnv1_router", [inp], parameters={"width": 0.5})
    assert result.as_numpy("width").tolist() == [[0.5]]  # the router's own output: the width each item ran at


def test_the_router_refuses_an_unknown_width(served):
    client = served.client
    from tritonclient.utils import InferenceServerException

    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(InferenceServerException, match=r"mnv1 has no width 0.3; its widths 0.25, 0.5, 1 \(versions"):
        _infer(client, "mnv1_router", x, parameters={"width": 0.3})
    with pytest.raises(InferenceServerException, match="latency_budget_ms 0.0001 is below the fastest width"):
        _infer(client, "mnv1_router", x, parameters={"latency_budget_ms": 0.0001})
