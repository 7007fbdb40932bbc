"""Issue 16: the server holds a burst of connections, bounds decoding memory, times out stalled connections."""

from __future__ import annotations

import http.client
import json
import socket
import struct
import threading
import time
import zlib

import pytest
import torch

from slimmable.serve import PredictionServer
from slimmable.serve._decode import MAX_IMAGE_PIXELS, Budget, Busy


def _png_zeros(width: int, height: int) -> bytes:
    """An all-black RGB PNG, compressed row by row (a 7000x7000 one is ~143 KB and decodes to 147 MB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * width)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class _PeakRss:
    """Samples this process's RSS every few milliseconds (the server runs in this process)."""

    def __init__(self) -> None:
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.003)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _post(port: int, body: bytes, ctype: str, timeout: float = 60) -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/predict?width=0.35", body=body, headers={"Content-Type": ctype})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), json.loads(resp.read())
    finally:
        conn.close()


def _concurrently(n: int, fn) -> list:
    """Run ``fn(i)`` in ``n`` threads released at once; returns results or the exceptions raised."""
    barrier = threading.Barrier(n)
    out: list = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = fn(i)
        except Exception as err:  # collected: the test counts them
            out[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_burst_of_200_connections_gets_no_resets(server: PredictionServer) -> None:
    assert server.request_queue_size == 256
    body = json.dumps({"tensor": torch.zeros(3, 32, 32).tolist()}).encode()
    results = _concurrently(200, lambda i: _post(server.port, body, "application/json")[0])
    errors = [r for r in results if not isinstance(r, int)]
    assert not errors, f"{len(errors)} of 200 failed, e.g. {errors[:3]}"
    assert results == [200] * 200


def test_png_flood_is_bounded_in_memory(runner) -> None:
    png = _png_zeros(7000, 7000)
    assert len(png) < 200_000 and MAX_IMAGE_PIXELS >= 7000 * 7000
    with PredictionServer(runner, "127.0.0.1", 0) as srv:  # the defaults: 100 M decoded pixels in flight
        assert srv.pixel_budget.capacity == 2 * MAX_IMAGE_PIXELS
        base = _rss_bytes()
        with _PeakRss() as rss:
            results = _concurrently(16, lambda i: _post(srv.port, png, "image/png"))
        assert srv.pixel_budget.in_use == 0 and srv.pixel_budget.peak <= 2 * 7000 * 7000
    errors = [r for r in results if not isinstance(r, tuple)]
    assert not errors, errors[:3]
    statuses = sorted(r[0] for r in results)
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 1 and 503 in statuses
    busy = next(r for r in results if r[0] == 503)
    assert busy[1]["Retry-After"] == "1" and "decoded pixels in flight" in busy[2]["error"]
    grown = rss.peak - base
    # two images in flight at most, 147 MB each decoded (~0.4 GB measured); unbounded, 16 took 3.2 GB here
    assert grown < 700e6, f"RSS grew by {grown / 1e6:.0f} MB"


def test_budget_admits_one_oversized_request_alone() -> None:
    b = Budget(10, "units")
    assert b.try_reserve(25)  # alone: larger than the capacity, still served (the per-image limit bounds it)
    assert not b.try_reserve(1)
    b.release(25)
    with b.reserve(6), pytest.raises(Busy, match="bound of 10 units in flight"):
        b.reserve(5)
    assert b.in_use == 0


def test_stalled_connections_time_out(runner) -> None:
    with PredictionServer(runner, "127.0.0.1", 0, request_timeout=0.5) as srv:
        # idle after connecting: closed by the server
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            t0 = time.monotonic()
            assert s.recv(100) == b""
            assert time.monotonic() - t0 < 5
        # a body that stops arriving: 408, then closed
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
            answer = b""
            while chunk := s.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5 s" in answer
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()


def test_deeply_nested_json_is_a_400(server: PredictionServer) -> None:
    for depth in (100_000, 600):
        body = ("[" * depth + "]" * depth).encode()
        status, _, answer = _post(server.port, b'{"tensor": ' + body + b"}", "application/json")
        assert status == 400, answer
        assert "nested too deeply" in answer["error"] or "'tensor'" in answer["error"]
