"""``slimmable serve --engine ray``: the checks that need no Ray (the missing-extra error, argument checks, options),
and a slow smoke test of the command on a local Ray (skipped without ``pip install 'slimmable[ray]'``): the answers
at every width and within a budget equal the slimmable model's, and a burst of requests runs in shared passes."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fake_data import served_classifier

from slimmable.checkpoint import model_checkpoint, save_checkpoint
from slimmable.cli.main import main
from slimmable.nn import use_width
from slimmable.serve import ray_serve

WIDTHS = (0.25, 0.5, 1.0)
NO_RAY = "Ray Serve is not installed (pip install 'slimmable[ray]'); the Ray engine's smoke test needs it"


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray as if not installed: importing it raises ImportError (whether or not this environment has it)."""
    for name in list(sys.modules):
        if name == "ray" or name.startswith("ray."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)


def test_without_ray_the_command_names_the_extra_before_loading(no_ray, capsys) -> None:
    with pytest.raises(ImportError, match=r"pip install 'slimmable\[ray\]'"):
        ray_serve.require_ray()
    t0 = time.monotonic()
    args = ["serve", "--model", "slim_mobilenet_v1", "--engine", "ray", "--port", str(_free_port())]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "slimmable serve: error: --engine ray needs Ray Serve, which is not installed: pip install 'slimmable[ray]'"
    )
    assert time.monotonic() - t0 < 5  # before the model is built


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--replicas", "2"], "--replicas: for --engine ray only; drop it (or pass --engine ray)"),
        (
            ["--ray-address", "auto", "--ray-max-batch", "4"],
            "--ray-address, --ray-max-batch: for --engine ray only; drop them (or pass --engine ray)",
        ),
        (["--engine", "ray", "--max-concurrency", "2"], "--max-concurrency: for --engine builtin only"),
        (["--engine", "ray", "--request-timeout", "5"], "--request-timeout: for --engine builtin only"),
        (["--engine", "ray", "--port", "0"], "--port 0 does not apply to --engine ray"),
    ],
)
def test_options_of_the_other_engine_are_refused(capsys, extra, message) -> None:
    assert main(["serve", "--model", "slim_mobilenet_v1", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--replicas", "0"], "--replicas: 0 must be >= 1"),
        (["--replicas", "two"], "--replicas: 'two' is not an integer"),
        (["--replica-cpus", "0"], "--replica-cpus: 0 must be a finite number > 0"),
        (["--ray-max-batch", "-1"], "--ray-max-batch: -1 must be >= 1"),
        (["--ray-batch-wait-ms", "-5"], "--ray-batch-wait-ms: -5 must be a finite number >= 0"),
    ],
)
def test_bad_numbers_are_refused_by_the_parser(capsys, extra, message) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--model", "slim_mobilenet_v1", "--engine", "ray", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_options_check_their_numbers_and_calibrate_the_batch_size() -> None:
    options = ray_serve.RayServeOptions(max_batch_size=6, runner={"widths": WIDTHS, "batch_sizes": (1,)})
    assert options.ongoing_requests == 12  # a batch forms while the one before runs
    assert options.runner_kwargs() == {"widths": WIDTHS, "batch_sizes": (1,), "max_concurrency": 1}
    assert ray_serve.RayServeOptions(max_batch_size=4).runner_kwargs()["batch_sizes"] == [1, 4]
    with pytest.raises(ValueError, match=r"replicas=0, batch_wait_ms=-1.0: replicas, .* must be positive ints"):
        ray_serve.RayServeOptions(replicas=0, batch_wait_ms=-1.0)
    with pytest.raises(ValueError, match="replica_cpus=True"):
        ray_serve.RayServeOptions(replica_cpus=True)


# ---------------------------------------------------------------------------------------------------- on a local Ray


def _model() -> torch.nn.Module:
    return served_classifier(WIDTHS)


def _reference(model: torch.nn.Module, x: torch.Tensor, width: float) -> torch.Tensor:
    with torch.no_grad(), use_width(model, width):
        return model(x)


def _x(seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _call(port: int, method: str, path: str, payload: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        body = None if payload is None else json.dumps(payload)
        conn.request(method, path, body, {"Content-Type": "application/json"} if body else {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _infer(port: int, x: torch.Tensor, version: str | None = None, **params) -> tuple[int, dict]:
    path = "/v2/models/mnet" + (f"/versions/{version}" if version else "") + "/infer"
    entry = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.flatten().tolist()}
    return _call(port, "POST", path, {"inputs": [entry], "parameters": params})


def _logits(answer: dict) -> torch.Tensor:
    (out,) = answer["outputs"]
    return torch.tensor(out["data"]).reshape(out["shape"])


@pytest.mark.slow
def test_serve_on_a_local_ray_answers_every_width_a_budget_and_batches_a_burst(tmp_path) -> None:
    pytest.importorskip("ray.serve", reason=NO_RAY)
    t_start = time.monotonic()
    torch.manual_seed(0)
    model = _model()
    ckpt = save_checkpoint(tmp_path / "mnet.pt", model_checkpoint(model))
    port = _free_port()
    cmd = [
        sys.executable, "-m", "slimmable.cli.main", "serve", "--checkpoint", str(ckpt), "--engine", "ray",
        "--replicas", "2", "--port", str(port), "--threads", "1", "--input-size", "32", "--calibration-seconds", "0.5",
        "--latency-cache", "none", "--name", "mnet", "--ray-max-batch", "8", "--ray-batch-wait-ms", "50",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray of its own: 2 CPUs, 1 a replica
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    lines: list[str] = []
    ready = threading.Event()

    def drain() -> None:  # Ray's logs keep coming: read them all, or the pipe fills and the command blocks
        for line in proc.stdout:
            lines.append(line)
            if re.search(rf"serving slim_mobilenet_v1 at http://127\.0\.0\.1:{port} on Ray Serve", line):
                ready.set()
        ready.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        ready.wait(timeout=150)
        assert proc.poll() is None and any("on Ray Serve" in line for line in lines), "".join(lines[-80:])
        text = "".join(lines)
        assert "deploying 2 replica(s) of slim_mobilenet_v1 on a local Ray" in text
        assert "calibrated latency of one replica" in text and "batch 8 (ms)" in text
        t_ready = time.monotonic()

        status, info = _call(port, "GET", "/info")
        assert status == 200 and info["engine"] == "ray" and info["widths"] == list(WIDTHS)
        assert info["batching"] == {"max_batch_size": 8, "batch_wait_ms": 50.0}
        assert set(info["calibrated_latency_ms"]) == {"1", "8"}
        status, meta = _call(port, "GET", "/v2/models/mnet")
        assert status == 200 and meta["versions"] == ["25", "50", "100"]

        # every width, by V2 version and by /predict's width: the slimmable model's outputs
        x = _x(0, batch=2)
        for width in WIDTHS:
            ref = _reference(model, x, width)
            status, answer = _infer(port, x, version=f"{width * 100:g}")
            assert status == 200, answer
            assert answer["parameters"]["width"] == width
            torch.testing.assert_close(_logits(answer), ref, rtol=1e-4, atol=1e-4)
            status, answer = _call(port, "POST", "/predict", {"tensor": x[0].tolist(), "width": width, "top_k": 3})
            assert status == 200 and answer["width"] == width, answer
            top = torch.softmax(ref[:1], dim=1)[0].topk(3)
            (pred,) = answer["predictions"]
            assert [e["index"] for e in pred["top_k"]] == top.indices.tolist()
            assert [e["prob"] for e in pred["top_k"]] == pytest.approx(top.values.tolist(), abs=1e-4)

        # a budget: generous, the widest width; below the narrowest width's latency, a clear 400
        status, answer = _call(port, "POST", "/predict", {"tensor": x.tolist(), "budget_ms": 1e4})
        assert status == 200 and answer["width"] == 1.0 and answer["budget_met"] is True, answer
        assert answer["predicted_ms"] > 0 and answer["predicted_queue_ms"] is not None
        status, answer = _infer(port, x, latency_budget_ms=1e4)
        assert status == 200 and answer["parameters"]["width"] == 1.0 and answer["parameters"]["budget_met"]
        torch.testing.assert_close(_logits(answer), _reference(model, x, 1.0), rtol=1e-4, atol=1e-4)
        status, answer = _call(port, "POST", "/predict", {"tensor": x.tolist(), "budget_ms": 1e-4})
        assert status == 400 and "below the fastest width" in answer["error"]

        # a burst: requests share forward passes, and each still gets its own input's answer
        inputs = [_x(100 + i) for i in range(24)]
        with ThreadPoolExecutor(len(inputs)) as pool:
            answers = list(pool.map(lambda xi: _infer(port, xi, width=0.5), inputs))
        for xi, (status, answer) in zip(inputs, answers):
            assert status == 200 and answer["parameters"]["width"] == 0.5, answer
            torch.testing.assert_close(_logits(answer), _reference(model, xi, 0.5), rtol=1e-4, atol=1e-4)
        sizes = [answer["parameters"]["forward_batch_size"] for _, answer in answers]
        assert max(sizes) > 1, sizes
        t_done = time.monotonic()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("serve --engine ray did not stop within 60 s of SIGINT:\n" + "".join(lines[-80:]))
        reader.join(timeout=10)
    assert rc == 0, "".join(lines[-80:])
    assert any(line.startswith("stopping") for line in lines)
    print(
        f"\nstart-up {t_ready - t_start:.1f} s, requests {t_done - t_ready:.1f} s, stop "
        f"{time.monotonic() - t_done:.1f} s; forward batch sizes of the burst: {sorted(sizes)}"
    )
