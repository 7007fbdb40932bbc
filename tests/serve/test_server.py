"""The HTTP server, exercised with a real HTTP client (http.client) over 127.0.0.1."""

from __future__ import annotations

import base64
import http.client
import io
import json
import threading

import pytest
import torch
from PIL import Image

from slimmable.serve import PredictionServer, check_loopback


def _request(server, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _post_json(server, obj, path="/predict"):
    return _request(server, "POST", path, json.dumps(obj), {"Content-Type": "application/json"})


def _image(fmt="PNG", size=(40, 30)) -> bytes:
    img = Image.new("RGB", size)
    img.putdata([((7 * i) % 256, (3 * i) % 256, (11 * i) % 256) for i in range(size[0] * size[1])])
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _tensor(seed=0, batch=None):
    shape = (3, 32, 32) if batch is None else (batch, 3, 32, 32)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_health_and_info(server, runner):
    assert _request(server, "GET", "/health") == (200, {"status": "ok"})
    status, info = _request(server, "GET", "/info")
    assert status == 200
    assert info["widths"] == [0.35, 0.5, 0.75, 1.0] and info["input_shape"] == [3, 32, 32]
    assert set(info["calibrated_latency_ms"]["1"]) == {"0.35", "0.5", "0.75", "1"}
    assert info["memory_bytes"]["dense_total"] > 0 and info["labels"] == 10


def test_tensor_at_a_width_matches_the_runner(server, runner):
    x = _tensor()
    status, body = _post_json(server, {"tensor": x.tolist(), "width": 0.5, "top_k": 3})
    assert status == 200, body
    assert body["width"] == 0.5 and body["batch_size"] == 1 and body["budget_ms"] is None
    assert body["inference_ms"] > 0 and body["total_ms"] >= body["inference_ms"]
    (pred,) = body["predictions"]
    probs = torch.softmax(runner(x.unsqueeze(0), width=0.5), dim=1)[0]
    top = probs.topk(3)
    assert pred["class_index"] == int(top.indices[0]) and pred["label"] == f"class{pred['class_index']}"
    assert [e["index"] for e in pred["top_k"]] == top.indices.tolist()
    assert [e["prob"] for e in pred["top_k"]] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_batched_tensor(server):
    status, body = _post_json(server, {"tensor": _tensor(1, batch=3).tolist(), "width": 1.0})
    assert status == 200 and body["batch_size"] == body["forward_batch_size"] == 3 and len(body["predictions"]) == 3
    assert all(len(p["top_k"]) == 5 for p in body["predictions"])


def test_png_body_with_a_budget(server, runner):
    budget = 1000.0
    status, body = _request(server, "POST", f"/predict?budget_ms={budget}", _image(), {"Content-Type": "image/png"})
    assert status == 200, body
    assert body["width"] == 1.0 and body["budget_ms"] == budget and isinstance(body["budget_met"], bool)
    assert body["predicted_ms"] is not None and body["predicted_queue_ms"] is not None and body["queue_ms"] >= 0


def test_jpeg_multipart_and_base64(server):
    boundary = "slimmableTestBoundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="width"\r\n\r\n0.75\r\n'.encode(),
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n".encode()
        + _image("JPEG")
        + b"\r\n",
        f"--{boundary}--\r\n".encode(),
    ]
    status, body = _request(
        server, "POST", "/predict", b"".join(parts), {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert status == 200, body
    assert body["width"] == 0.75
    status, body = _post_json(server, {"image_base64": base64.b64encode(_image()).decode(), "width": 0.35})
    assert status == 200 and body["width"] == 0.35


@pytest.mark.parametrize(
    ("kind", "payload", "status", "message"),
    [
        ("json", {"tensor": None, "width": 0.3}, 400, "widths are (0.35, 0.5, 0.75, 1)"),
        ("json", {"tensor": None, "budget_ms": 0.0001}, 400, "below the fastest width"),
        ("json", {"tensor": None, "width": 0.5, "budget_ms": 10}, 400, "not both"),
        ("json", {"tensor": None, "width": "wide"}, 400, "width must be a number"),
        ("json", {"tensor": [[0.0] * 32] * 32, "width": 0.5}, 400, "has shape (32, 32)"),
        ("json", {"tensor": [[[1.0, 2.0], [3.0]]], "width": 0.5}, 400, "not a rectangular"),
        ("json", {"width": 0.5}, 400, "needs a 'tensor'"),
        ("json", {"image_base64": "***", "width": 0.5}, 400, "not valid base64"),
        ("raw", b"this is not an image", 400, "not a readable image"),
        ("raw", b"", 400, "empty"),
        ("truncated", None, 400, "not a readable image"),
        ("badjson", b"{not json", 400, "not valid JSON"),
        ("text", b"hello", 415, "unsupported Content-Type"),
    ],
)
def test_bad_requests_get_clear_4xx(server, kind, payload, status, message):
    if kind == "json":
        if "tensor" in payload and payload["tensor"] is None:
            payload = dict(payload, tensor=_tensor().tolist())
        got, body = _post_json(server, payload)
    elif kind == "raw":
        got, body = _request(server, "POST", "/predict?width=0.5", payload, {"Content-Type": "image/jpeg"})
    elif kind == "truncated":
        data = _image("PNG")[:60]
        got, body = _request(server, "POST", "/predict", data, {"Content-Type": "image/png"})
    elif kind == "badjson":
        got, body = _request(server, "POST", "/predict", payload, {"Content-Type": "application/json"})
    else:
        got, body = _request(server, "POST", "/predict", payload, {"Content-Type": "text/plain"})
    assert got == status, body
    assert message in body["error"] and body["status"] == status
    # the server keeps serving
    assert _request(server, "GET", "/health")[0] == 200


def test_unknown_routes(server):
    assert _request(server, "GET", "/nope")[0] == 404
    status, body = _request(server, "POST", "/classify", b"{}", {"Content-Type": "application/json"})
    assert status == 404 and "POST /predict" in body["error"]


def test_too_large_body(runner):
    with PredictionServer(runner, "127.0.0.1", 0, max_body_bytes=1000) as srv:
        status, body = _request(srv, "POST", "/predict", b"\x89PNG" + bytes(5000), {"Content-Type": "image/png"})
        assert status == 413 and "more than the 1000 allowed" in body["error"]
        assert _request(srv, "GET", "/health")[0] == 200


def test_keep_alive_connection_serves_good_after_bad(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        for width, expected in ((0.3, 400), (0.5, 200), (7, 400), (1.0, 200)):
            body = json.dumps({"tensor": _tensor().tolist(), "width": width})
            conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == expected
            json.loads(resp.read())
    finally:
        conn.close()


def test_concurrent_clients_get_consistent_answers(server):
    x = _tensor(3)
    expected = {}
    for w in (0.35, 0.5, 0.75, 1.0):
        expected[w] = _post_json(server, {"tensor": x.tolist(), "width": w})[1]["predictions"]
    failures: list[str] = []

    def client(w: float) -> None:
        for _ in range(4):
            status, body = _post_json(server, {"tensor": x.tolist(), "width": w})
            if status != 200 or body["width"] != w or body["predictions"] != expected[w]:
                failures.append(f"width {w}: {status} {body}")

    threads = [threading.Thread(target=client, args=(w,)) for w in expected for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert failures == []


def test_only_loopback_addresses(runner):
    assert check_loopback("127.0.0.1") == "127.0.0.1"
    assert check_loopback("localhost") == "127.0.0.1"
    assert check_loopback("::1") == "::1"
    for host in ("0.0.0.0", "192.168.1.10", "::", "example.com"):
        with pytest.raises(ValueError, match="loopback"):
            check_loopback(host)
        with pytest.raises(ValueError, match="loopback"):
            PredictionServer(runner, host, 0)


def test_clean_shutdown(runner):
    srv = PredictionServer(runner, "127.0.0.1", 0).start()
    port = srv.port
    assert _request(srv, "GET", "/health")[0] == 200
    thread = srv._thread
    srv.stop()
    assert thread is not None and not thread.is_alive()
    with pytest.raises(OSError):
        http.client.HTTPConnection("127.0.0.1", port, timeout=5).request("GET", "/health")
