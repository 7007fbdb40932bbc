"""``slimmable serve`` smoke test: start the command as a process, query it over 127.0.0.1, stop it with SIGINT."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from slimmable.cli.main import main


def test_serve_command_starts_answers_and_stops(tmp_path):
    cmd = [
        sys.executable, "-m", "slimmable.cli.main", "serve", "--model", "slim_mobilenet_v1", "--num-classes", "10",
        "--small-input", "--port", "0", "--calibration-seconds", "0.3", "--threads", "1",
        "--latency-cache", str(tmp_path / "lat.json"), "--retain-freed-memory",
    ]  # fmt: skip
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
        url = None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"at http://127\.0\.0\.1:(\d+)", line)
            if m:
                url = int(m.group(1))
                break
        assert url is not None, "".join(lines)
        text = "".join(lines)
        assert "RANDOM WEIGHTS" in text and "calibrated latency" in text
        assert "allocator: freed memory is retained" in text or "allocator: not glibc" in text
        conn = http.client.HTTPConnection("127.0.0.1", url, timeout=30)
        conn.request("GET", "/info")
        info = json.loads(conn.getresponse().read())
        assert info["model"] == "slim_mobilenet_v1" and info["widths"] == [0.25, 0.5, 0.75, 1.0]
        body = json.dumps({"tensor": [[[0.0] * 32] * 32] * 3, "budget_ms": 1e4})
        conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["width"] == 1.0
        conn.close()
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # say where it hangs
            proc.send_signal(signal.SIGABRT)
            rest = proc.communicate(timeout=30)[0]
            pytest.fail(f"serve did not stop within 30 s of SIGINT; its output and threads:\n{rest[-8000:]}")
        assert rc == 0
        assert (tmp_path / "lat.json").is_file()
        if "freed memory is retained" in text:  # latencies measured under each allocator are cached apart
            assert "malloc=retained" in (tmp_path / "lat.json").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


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
        }
        for extra, message in cases.items():
            t0 = time.monotonic()
            assert main(["serve", "--model", "slim_mobilenet_v1", *extra]) == 2
            captured = capsys.readouterr()
            assert message in captured.err and "Traceback" not in captured.err
            assert "calibrated" not in captured.out and time.monotonic() - t0 < 5  # before loading and calibrating
