"""``slimmable serve`` smoke tests (a classifier and a detector): start the command as a process, query it over
127.0.0.1, stop it with SIGINT."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import torch
from pycocotools import mask as mask_utils

import slimmable
from slimmable.checkpoint import model_checkpoint, save_checkpoint
from slimmable.cli.main import main


@contextlib.contextmanager
def _serving(args: list[str]) -> Iterator[tuple[int, str]]:
    """Run ``slimmable serve ARGS`` as a process; yield its port and start-up output; stop it with SIGINT (rc 0)."""
    cmd = [sys.executable, "-m", "slimmable.cli.main", "serve", "--port", "0", "--threads", "1", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")  # SIGABRT prints every thread's stack
    # A shell runs background jobs (`bash .ci/run &`) with SIGINT ignored and children inherit that, so Python would
    # install no Ctrl-C handler: give the server the default disposition of a foreground process.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        lines = []
        deadline = time.monotonic() + 120
        port = None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"at http://127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        assert port is not None, "".join(lines)
        yield port, "".join(lines)
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # say where it hangs
            proc.send_signal(signal.SIGABRT)
            rest = proc.communicate(timeout=30)[0]
            pytest.fail(f"serve did not stop within 30 s of SIGINT; its output and threads:\n{rest[-8000:]}")
        assert rc == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def _get(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def _post_json(port: int, payload: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/predict", json.dumps(payload), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_serve_command_starts_answers_and_stops(tmp_path):
    args = [
        "--model", "slim_mobilenet_v1", "--num-classes", "10", "--small-input", "--calibration-seconds", "0.3",
        "--latency-cache", str(tmp_path / "lat.json"), "--retain-freed-memory", "--name", "mnet",
    ]  # fmt: skip
    with _serving(args) as (port, text):
        assert "RANDOM WEIGHTS" in text and "calibrated latency" in text and "V2 protocol as model 'mnet'" in text
        assert "allocator: freed memory is retained" in text or "allocator: not glibc" in text
        info = _get(port, "/info")
        assert info["model"] == "slim_mobilenet_v1" and info["widths"] == [0.25, 0.5, 0.75, 1.0]
        status, answer = _post_json(port, {"tensor": [[[0.0] * 32] * 32] * 3, "budget_ms": 1e4})
        assert status == 200 and answer["width"] == 1.0
        meta = _get(port, "/v2/models/mnet")  # --name names the model in the V2 routes
        assert meta["name"] == "mnet" and meta["versions"] == ["25", "50", "75", "100"]
    assert (tmp_path / "lat.json").is_file()
    if "freed memory is retained" in text:  # latencies measured under each allocator are cached apart
        assert "malloc=retained" in (tmp_path / "lat.json").read_text()


def test_serve_command_serves_a_detector_checkpoint(tmp_path):
    """A Mask R-CNN checkpoint served by the command answers boxes, labels, scores and RLE masks at each width,
    the same detections the checkpoint's model gives in this process."""
    torch.manual_seed(0)
    model = slimmable.create_model(
        "slim_maskrcnn_resnet18_fpn", widths=(0.5, 1.0), num_classes=3, box_score_thresh=0.0,
        box_detections_per_img=5, rpn_post_nms_top_n_test=20,
    ).eval()  # fmt: skip
    ckpt = save_checkpoint(tmp_path / "det.pt", model_checkpoint(model))
    image = torch.rand(1, 64, 80, generator=torch.Generator().manual_seed(1))
    labels = tmp_path / "labels.txt"
    labels.write_text("background\nshirt\nshoe\n")
    args = ["--checkpoint", str(ckpt), "--calibration-seconds", "0.3", "--latency-cache", "none"]
    with _serving([*args, "--labels", str(labels)]) as (port, text):
        assert "calibrated latency" in text and "RANDOM WEIGHTS" not in text
        info = _get(port, "/info")
        assert info["task"] == "detection" and info["widths"] == [0.5, 1.0]
        for w in (0.5, 1.0):
            status, answer = _post_json(port, {"tensor": image.tolist(), "width": w})
            assert status == 200 and answer["width"] == w, answer
            (dets,) = answer["detections"]
            slimmable.set_width(model, w)
            with torch.no_grad():
                (ref,) = model([image])
            assert len(dets) == len(ref["boxes"]) == 5
            got = torch.tensor([d["box"] for d in dets])
            torch.testing.assert_close(got, ref["boxes"], atol=2e-3, rtol=0)  # rounded to 3 decimals; BN folded
            assert [d["label"] for d in dets] == ref["labels"].tolist()
            assert all(d["label_name"] == ["background", "shirt", "shoe"][d["label"]] for d in dets)
            for d, m in zip(dets, ref["masks"]):
                decoded = mask_utils.decode({"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode()})
                assert decoded.shape == (64, 80)
                assert (decoded != (m[0] > 0.5).numpy()).mean() < 0.01


def test_serve_refuses_non_loopback_hosts(capsys):
    assert main(["serve", "--model", "slim_mobilenet_v1", "--host", "0.0.0.0"]) == 2
    assert "loopback" in capsys.readouterr().err


@pytest.mark.parametrize("host", ["10.0.0.1", "::"])
def test_serve_refuses_other_addresses(capsys, host):
    assert main(["serve", "--model", "slim_mobilenet_v1", "--host", host]) == 2


def test_serve_refuses_bad_numbers_and_a_taken_port_before_loading(capsys):
    import socket
    import time

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cases = {
            ("--port", str(port)): f"cannot listen on 127.0.0.1:{port}: Address already in use; pick another --port",
            ("--port", "70000"): "--port 70000 is not a TCP port; give 1-65535, or 0",
            ("--threads", "-3"): "--threads -3 must be >= 1",
            ("--request-timeout", "0"): "--request-timeout 0.0 must be a positive number",
            ("--name", "a/b"): "--name 'a/b' must be a non-empty name without '/'",
        }
        for extra, message in cases.items():
            t0 = time.monotonic()
            assert main(["serve", "--model", "slim_mobilenet_v1", *extra]) == 2
            captured = capsys.readouterr()
            assert message in captured.err and "Traceback" not in captured.err
            assert "calibrated" not in captured.out and time.monotonic() - t0 < 5  # before loading and calibrating
