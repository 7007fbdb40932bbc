"""The Open Inference Protocol (KServe V2 / Triton HTTP) routes of the server, exercised with tritonclient (the
reference V2 client) and raw HTTP over 127.0.0.1: metadata, readiness, inference at every width by version and by
parameter, JSON and binary tensors, budgets, and errors."""

from __future__ import annotations

import http.client
import json

import numpy as np
import pytest
import torch

import slimmable
from slimmable.runtime import SlimmableRunner
from slimmable.serve import BadRequest, PredictionServer
from slimmable.serve.v2 import version_of
from slimmable.tasks import DetectionTask

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is the V2 test client (dev extra)")
from tritonclient.utils import InferenceServerException  # noqa: E402

NAME = "slim_mobilenet_v1"
WIDTHS = (0.25, 0.5, 0.75, 1.0)


def _randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """BN statistics and affine parameters as a trained model has them (fresh ones make the logits ~1e-20, which
    any two models would match)."""
    gen = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and mod.running_var is not None:
            n = mod.num_features
            mod.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
            mod.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            if mod.weight is not None:
                mod.weight.data.copy_(0.8 + 0.4 * torch.rand(n, generator=gen))
                mod.bias.data.copy_(0.1 * torch.randn(n, generator=gen))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = slimmable.create_model(NAME, small_input=True, num_classes=10).eval()
    _randomize_bn(m)
    return m


@pytest.fixture(scope="module")
def server(model):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: one intra-op thread
    runner = SlimmableRunner(model, input_size=32, calibration_s=0.3)
    with PredictionServer(runner, "127.0.0.1", 0) as srv:
        yield srv
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def client(server):
    c = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}", network_timeout=60.0)
    yield c
    c.close()


def _x(batch: int = 2, seed: int = 0, shape=(3, 32, 32)) -> np.ndarray:
    return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed)).numpy()


def _input(x: np.ndarray, binary: bool = True, name: str = "input", datatype: str = "FP32"):
    inp = httpclient.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.copy())  # tritonclient's arrays are read-only views of the response


def _reference(model: torch.nn.Module, x: np.ndarray, width: float) -> torch.Tensor:
    slimmable.set_width(model, width)
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    return out["out"] if isinstance(out, dict) else out


def _raw(server, method: str, path: str, body: bytes | None = None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), resp.read()
    finally:
        conn.close()


def test_server_metadata_and_health(client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "slimmable" and meta["version"] == slimmable.__version__
    assert "binary_tensor_data" in meta["extensions"]


def test_model_metadata_and_readiness(client) -> None:
    meta = client.get_model_metadata(NAME)
    assert meta["name"] == NAME and meta["platform"] == "pytorch_slimmable"
    assert meta["versions"] == ["25", "50", "75", "100"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert meta["parameters"]["widths"] == {"25": 0.25, "50": 0.5, "75": 0.75, "100": 1.0}
    assert meta["parameters"]["task"] == "classification" and meta["parameters"]["default_version"] == "100"
    assert client.get_model_metadata(NAME, "75")["parameters"]["width"] == 0.75
    assert client.is_model_ready(NAME) and all(client.is_model_ready(NAME, v) for v in meta["versions"])
    assert not client.is_model_ready(NAME, "30") and not client.is_model_ready("resnet50")
    with pytest.raises(InferenceServerException, match="unknown model 'resnet50'") as err:
        client.get_model_metadata("resnet50")
    assert err.value.status() == "404"
    assert [version_of(w) for w in (0.125, 0.35, 1.0)] == ["12.5", "35", "100"]


def test_infer_at_each_width_by_version_and_by_parameter(client, model) -> None:
    x = _x()
    for width in WIDTHS:
        ref = _reference(model, x, width)
        version = version_of(width)
        # binary input, binary output (tritonclient's defaults), the width chosen by the version
        res = client.infer(NAME, [_input(x)], model_version=version, request_id=f"req-{version}")
        response = res.get_response()
        assert response["model_name"] == NAME and response["model_version"] == version
        assert response["id"] == f"req-{version}" and response["parameters"]["width"] == width
        assert response["parameters"]["latency_ms"] > 0 and response["parameters"]["forward_batch_size"] == 2
        assert response["outputs"][0]["parameters"]["binary_data_size"] == 2 * 10 * 4
        torch.testing.assert_close(_tensor(res.as_numpy("logits")), ref, rtol=1e-4, atol=1e-5)
        # JSON input, JSON output, the width chosen by parameters.width
        out = httpclient.InferRequestedOutput("logits", binary_data=False)
        res = client.infer(NAME, [_input(x, binary=False)], outputs=[out], parameters={"width": width})
        (entry,) = res.get_response()["outputs"]
        assert "data" in entry and entry["shape"] == [2, 10] and entry["datatype"] == "FP32"
        assert res.get_response()["model_version"] == version
        torch.testing.assert_close(_tensor(res.as_numpy("logits")), ref, rtol=1e-4, atol=1e-5)


def test_json_and_binary_mixed(client, model, server) -> None:
    x = _x(1, seed=4)
    ref = _reference(model, x, 0.5)
    # binary input, JSON output
    out = httpclient.InferRequestedOutput("logits", binary_data=False)
    res = client.infer(NAME, [_input(x)], model_version="50", outputs=[out])
    assert "data" in res.get_response()["outputs"][0]
    torch.testing.assert_close(_tensor(res.as_numpy("logits")), ref, rtol=1e-4, atol=1e-5)
    # JSON input (nested, as the spec allows), binary output asked for by the request's binary_data_output
    body = json.dumps(
        {
            "inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": x.tolist()}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("POST", f"/v2/models/{NAME}/versions/50/infer", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        header_length = int(resp.getheader("Inference-Header-Content-Length"))
        data = resp.read()
    finally:
        conn.close()
    header = json.loads(data[:header_length])
    (entry,) = header["outputs"]
    assert entry["parameters"]["binary_data_size"] == len(data) - header_length == 40 and "data" not in entry
    got = torch.from_numpy(np.frombuffer(data[header_length:], dtype="<f4").reshape(1, 10).copy())
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_default_width_and_latency_budget(client, server) -> None:
    runner = server.runner
    res = client.infer(NAME, [_input(_x(1))])
    assert res.get_response()["model_version"] == "100" and "latency_budget_ms" not in res.get_response()["parameters"]
    saved = {b: {w: runner.base_latency(w, b) for w in runner.widths} for b in runner.batch_sizes}
    try:
        # a known table (and no drift), slow enough that the real time spent reading the request (which the budget
        # counts from arrival) does not change the choice
        runner.load_latencies({1: {0.25: 100.0, 0.5: 200.0, 0.75: 300.0, 1.0: 400.0}})
        res = client.infer(NAME, [_input(_x(1))], parameters={"latency_budget_ms": 250})
        params = res.get_response()["parameters"]
        assert res.get_response()["model_version"] == "50" and params["width"] == 0.5
        assert params["latency_budget_ms"] == 250 and params["predicted_ms"] == 200.0
        assert params["predicted_queue_ms"] == 0.0 and params["queue_ms"] >= 0.0
        assert isinstance(params["budget_met"], bool)
        with pytest.raises(InferenceServerException, match="below the fastest width") as err:
            client.infer(NAME, [_input(_x(1))], parameters={"latency_budget_ms": 50})
        assert err.value.status() == "400"
    finally:
        runner.load_latencies(saved)


@pytest.mark.parametrize(
    ("case", "status", "message"),
    [
        ("unknown model", "404", "unknown model 'mobilenet'; this server serves 'slim_mobilenet_v1'"),
        ("unknown version", "404", "has no version '30'; its versions are 25, 50, 75, 100"),
        ("wrong shape", "400", "has shape [2, 3, 28, 28]; this model takes [-1, 3, 32, 32]"),
        ("wrong datatype", "400", "has datatype 'FP64'; this model takes FP32"),
        ("unknown input", "400", "unknown input 'image'; model 'slim_mobilenet_v1' takes one input, 'input'"),
        ("version and width", "400", "version 50 runs width 0.5 but parameters.width is 0.25"),
        ("width and budget", "400", "either parameters.width or parameters.latency_budget_ms, not both"),
        ("version and budget", "400", "version 25 pins width 0.25, and parameters.latency_budget_ms picks"),
        ("unknown width", "400", "width 0.3 is not served by this runner"),
        ("unknown output", "400", "unknown output 'probs'; the model's outputs are logits"),
        ("classification", "400", "classification extension"),
    ],
)
def test_errors_raise_with_the_message(client, case, status, message) -> None:
    x, kwargs = _x(), {}
    inputs = [_input(x)]
    if case == "unknown model":
        kwargs["model_name"] = "mobilenet"
    elif case == "unknown version":
        kwargs["model_version"] = "30"
    elif case == "wrong shape":
        inputs = [_input(_x(shape=(3, 28, 28)))]
    elif case == "wrong datatype":
        inputs = [_input(x.astype(np.float64), datatype="FP64")]
    elif case == "unknown input":
        inputs = [_input(x, name="image")]
    elif case == "version and width":
        kwargs.update(model_version="50", parameters={"width": 0.25})
    elif case == "width and budget":
        kwargs["parameters"] = {"width": 0.25, "latency_budget_ms": 100}
    elif case == "version and budget":
        kwargs.update(model_version="25", parameters={"latency_budget_ms": 100})
    elif case == "unknown width":
        kwargs["parameters"] = {"width": 0.3}
    elif case == "unknown output":
        kwargs["outputs"] = [httpclient.InferRequestedOutput("probs")]
    elif case == "classification":
        kwargs["outputs"] = [httpclient.InferRequestedOutput("logits", class_count=3)]
    with pytest.raises(InferenceServerException) as err:
        client.infer(kwargs.pop("model_name", NAME), inputs, **kwargs)
    assert err.value.status() == status and message in err.value.message()
    assert client.is_server_live()  # the server keeps serving


def test_raw_http_error_bodies(server) -> None:
    good = {"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.0] * 3072}
    path = f"/v2/models/{NAME}/infer"
    status, ctype, body = _raw(server, "POST", path, json.dumps({"inputs": [dict(good, shape=[1, 3, 32])]}).encode())
    assert (status, ctype) == (400, "application/json")
    assert json.loads(body) == {"error": "input 'input' has shape [1, 3, 32]; this model takes [-1, 3, 32, 32] (-1: "
                                "a batch of 1 or more; resize the images to the served input size)"}  # fmt: skip
    status, _, body = _raw(server, "GET", "/v2/models/nope/ready")
    assert status == 404 and "unknown model 'nope'" in json.loads(body)["error"]
    status, _, body = _raw(server, "GET", "/v2/repository/index")
    assert status == 404 and "the V2 routes are GET /v2" in json.loads(body)["error"]
    status, _, body = _raw(server, "POST", path, b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]
    # binary framing: the header length and the inputs' binary_data_size must match the body
    head = json.dumps({"inputs": [{**good, "data": None, "parameters": {"binary_data_size": 3072 * 4}}]})
    head = head.replace(', "data": null', "").encode()
    blob = np.zeros(3072, dtype="<f4").tobytes()
    hdr = {"Inference-Header-Content-Length": str(len(head))}
    status, _, body = _raw(server, "POST", path, head + blob[:-4], hdr)
    assert status == 400 and "needs 12288 bytes of binary data but the body has 12284" in json.loads(body)["error"]
    status, _, body = _raw(server, "POST", path, head + blob + b"xx", hdr)
    assert status == 400 and "binary_data_size add up to 12288" in json.loads(body)["error"]
    status, ctype, body = _raw(server, "POST", path, head + blob, hdr)
    assert status == 200 and ctype == "application/json" and json.loads(body)["outputs"][0]["shape"] == [1, 10]
    status, _, body = _raw(server, "POST", path, head + blob, {**hdr, "Content-Encoding": "gzip"})
    assert status == 415 and "send the body uncompressed" in json.loads(body)["error"]
    status, _, body = _raw(
        server, "POST", path, json.dumps({"inputs": [good], "parameters": {"budget_ms": 5}}).encode()
    )
    assert status == 400 and "'latency_budget_ms'" in json.loads(body)["error"]
    # the server's own routes are unchanged
    assert _raw(server, "GET", "/health")[:2] == (200, "application/json")


def test_bounds_give_413_and_the_name_is_configurable(server) -> None:
    runner = server.runner
    with PredictionServer(runner, "127.0.0.1", 0, max_body_bytes=40_000, max_batch=2, model_name="mnet") as srv:
        c = httpclient.InferenceServerClient(f"127.0.0.1:{srv.port}")
        try:
            assert c.get_model_metadata("mnet")["name"] == "mnet" and c.is_model_ready("mnet")
            with pytest.raises(InferenceServerException, match="holds a batch of 3; at most 2 per request") as err:
                c.infer("mnet", [_input(_x(3))])  # 36 KiB of binary data: within the body bound
            assert err.value.status() == "413"
            with pytest.raises(InferenceServerException, match="more than the 40000 allowed") as err:
                c.infer("mnet", [_input(_x(2), binary=False)])  # 6144 numbers as JSON text
            assert err.value.status() == "413"
            assert c.is_server_live()
        finally:
            c.close()
    with pytest.raises(ValueError, match="cannot be a V2 model name"):
        PredictionServer(runner, "127.0.0.1", 0, model_name="a/b")


# ---------------------------------------------------------------------------------------------- segmentation


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    m = slimmable.create_model("slim_lraspp_mobilenet_v2", widths=(0.5, 1.0), num_classes=4, in_chans=1).eval()
    _randomize_bn(m, seed=1)
    return m


@pytest.fixture(scope="module")
def seg_server(segmenter):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    runner = SlimmableRunner(segmenter, input_size=48, calibration_s=0.2)
    with PredictionServer(runner, "127.0.0.1", 0, model_name="seg") as srv:
        yield srv
    torch.set_num_threads(n)


def test_segmenter_over_v2(seg_server, segmenter) -> None:
    c = httpclient.InferenceServerClient(f"127.0.0.1:{seg_server.port}", network_timeout=60.0)
    try:
        meta = c.get_model_metadata("seg")
        assert meta["versions"] == ["50", "100"] and meta["parameters"]["task"] == "segmentation"
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 48, 48]}]
        assert meta["outputs"] == [
            {"name": "out", "datatype": "FP32", "shape": [-1, 4, 48, 48]},
            {"name": "class_map", "datatype": "INT64", "shape": [-1, 48, 48]},
        ]
        x = torch.rand((2, 1, 48, 48), generator=torch.Generator().manual_seed(2)).numpy()
        for width, version in ((0.5, "50"), (1.0, "100")):
            ref = _reference(segmenter, x, width)
            res = c.infer("seg", [_input(x)], model_version=version)
            logits = _tensor(res.as_numpy("out"))
            torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-5)
            class_map = _tensor(res.as_numpy("class_map"))
            assert class_map.dtype == torch.int64 and class_map.shape == (2, 48, 48)
            assert torch.equal(class_map, logits.argmax(dim=1))
            assert (class_map != ref.argmax(dim=1)).float().mean() < 0.01  # float rounding may flip a tie
            # only the class map, as JSON, the width by parameter
            out = httpclient.InferRequestedOutput("class_map", binary_data=False)
            res = c.infer("seg", [_input(x, binary=False)], outputs=[out], parameters={"width": width})
            assert [o["name"] for o in res.get_response()["outputs"]] == ["class_map"]
            assert torch.equal(_tensor(res.as_numpy("class_map")), class_map)
    finally:
        c.close()


def test_detectors_are_refused_over_v2() -> None:
    with pytest.raises(BadRequest, match="detectors are not supported over the V2 inference protocol yet") as err:
        DetectionTask().v2_outputs(torch.nn.Identity(), [{"boxes": torch.zeros(0, 4)}])
    assert err.value.status == 400
