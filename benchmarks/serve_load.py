"""Load test of ``slimmable serve`` on loopback: N concurrent clients with mixed latency budgets.

The server (a :class:`~slimmable.serve.PredictionServer` around a calibrated
:class:`~slimmable.runtime.SlimmableRunner`) runs in this process on 127.0.0.1 at an ephemeral port; the clients
are threads with keep-alive ``http.client`` connections sending JPEG images. Bounded in time (``--seconds``) and
in requests (``--max-requests``); nothing leaves the loopback interface.

Each request asks for a latency budget drawn from the calibrated latencies (tight: just above the fastest width;
one per width: 1.3x its latency; loose: 3x the widest), or, for ``--width-fraction`` of requests, an explicit
width. Reported: throughput, p50/p99 client latency and server inference time per width used, errors (must be
0), how often the server's measured inference time met the budget, and how often the whole round trip did.

Burst mode (``--burst N``): N clients connect at once (released by a barrier), each sends one request and reads
the answer; reported: answered (200), refused by a server bound (503 + Retry-After), other statuses, connection
errors by type (resets must be 0), and the peak RSS of this process, which hosts the server. ``--burst-png-side
7000`` sends an all-black PNG of that side instead of a JPEG (143 KB that decode to 147 MB: the memory bound);
``--backlog`` sets the listen queue (socketserver's old default was 5).

Usage:
    python benchmarks/serve_load.py [--seconds 30] [--clients 4] [--model slim_mobilenet_v2] [--input-size 224]
        [--retain-freed-memory] [--json benchmarks/results/serve_load.json]
    python benchmarks/serve_load.py --burst 200 [--burst-png-side 7000] [--backlog 256]
        [--json benchmarks/results/serve_burst.json]
"""

from __future__ import annotations

import argparse
import collections
import http.client
import io
import json
import os
import platform
import random
import socket
import struct
import threading
import time
import zlib

import numpy as np
import torch
from _bench import machine_info, write_json
from PIL import Image

import slimmable
from slimmable.runtime import SlimmableRunner, freed_memory_retained, retain_freed_memory
from slimmable.serve import PredictionServer


def make_jpegs(n: int, side: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((side, side), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _connect(port: int) -> http.client.HTTPConnection:
    # TCP_NODELAY: http.client sends headers and a body over 2000 bytes in two writes, and Nagle's algorithm would
    # hold the body until the server's delayed ACK (40 ms).
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def client(
    port: int, plans: tuple, images: list[bytes], deadline: float, budget_left, records: list, seed: int
) -> None:
    rng = random.Random(seed)
    conn = _connect(port)
    try:
        while time.monotonic() < deadline and budget_left():
            budgets, widths, width_fraction = plans
            kind, value = rng.choice(widths if rng.random() < width_fraction else budgets)
            query = f"budget_ms={value:.4f}" if kind != "width" else f"width={value:g}"
            body = rng.choice(images)
            t0 = time.perf_counter()
            try:
                conn.request("POST", f"/predict?{query}", body, {"Content-Type": "image/jpeg"})
                resp = conn.getresponse()
                data = json.loads(resp.read())
                status = resp.status
            except (OSError, http.client.HTTPException, ValueError) as err:
                records.append({"kind": kind, "value": value, "status": None, "error": repr(err)})
                conn.close()
                conn = _connect(port)
                continue
            client_ms = 1e3 * (time.perf_counter() - t0)
            rec = {"kind": kind, "value": value, "status": status, "client_ms": client_ms}
            if status == 200:
                rec.update(width=data["width"], inference_ms=data["inference_ms"], total_ms=data["total_ms"])
                rec["budget_met"] = data["budget_met"]
            else:
                rec["error"] = data.get("error")
            records.append(rec)
    finally:
        conn.close()


def png_zeros(side: int) -> bytes:
    """An all-black RGB PNG of ``side`` x ``side``, compressed row by row (7000: ~143 KB, 147 MB decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * side)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def burst(server: PredictionServer, n: int, body: bytes, ctype: str, width: float) -> dict:
    """``n`` clients at once, one request each; answers, statuses, connection errors and peak RSS (this process)."""
    barrier = threading.Barrier(n)
    results: list = [None] * n
    peak = [_status_kb("VmRSS")]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _status_kb("VmRSS"))
            time.sleep(0.002)

    def one(i: int) -> None:
        barrier.wait()
        t0 = time.perf_counter()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
            conn.request("POST", f"/predict?width={width:g}", body, {"Content-Type": ctype})
            resp = conn.getresponse()
            resp.read()
            results[i] = (resp.status, resp.getheader("Retry-After"), time.perf_counter() - t0)
            conn.close()
        except Exception as err:  # counted by type: resets, refusals, timeouts
            results[i] = (type(err).__name__, None, time.perf_counter() - t0)

    rss_before = _status_kb("VmRSS")
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    time.sleep(0.5)
    statuses = collections.Counter(r[0] for r in results)
    errors = {k: v for k, v in statuses.items() if isinstance(k, str)}
    return {
        "connections": n,
        "answered_200": statuses.get(200, 0),
        "busy_503": statuses.get(503, 0),
        "busy_503_with_retry_after": sum(1 for r in results if r[0] == 503 and r[1]),
        "other_statuses": {str(k): v for k, v in statuses.items() if isinstance(k, int) and k not in (200, 503)},
        "connection_errors": sum(errors.values()),
        "errors_by_type": errors,
        "resets": errors.get("ConnectionResetError", 0),
        "wall_s": wall,
        "client_p50_s": pct([r[2] for r in results], 50),
        "client_max_s": max(r[2] for r in results),
        "rss_before_mb": rss_before / 1024,
        "rss_peak_mb": peak[0] / 1024,
        "rss_after_mb": _status_kb("VmRSS") / 1024,
        "process_hwm_mb": _status_kb("VmHWM") / 1024,
        "pixel_budget_peak": server.pixel_budget.peak,
    }


def main_burst(args: argparse.Namespace, runner: SlimmableRunner, startup_s: float) -> None:
    if args.burst_png_side:
        body, ctype, what = png_zeros(args.burst_png_side), "image/png", f"{args.burst_png_side}px black PNG"
    else:
        body, ctype = make_jpegs(1, args.input_size + args.input_size // 7, args.seed)[0], "image/jpeg"
        what = f"{args.input_size + args.input_size // 7}px JPEG"
    with PredictionServer(runner, "127.0.0.1", 0, backlog=args.backlog) as server:
        result = burst(server, args.burst, body, ctype, runner.widths[0])
    summary = {
        "benchmark": "serve_load --burst",
        "model": args.model,
        "input_size": args.input_size,
        "request": f"{what} ({len(body)} bytes), width {runner.widths[0]:g}",
        "backlog": args.backlog,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "max_concurrency": args.max_concurrency,
        "machine": {**machine_info(), "platform": platform.platform(), "load_avg": os.getloadavg()},
        "runner_startup_s": startup_s,
        **result,
    }
    print(
        f"burst of {args.burst} connections ({what}, backlog {args.backlog}): {result['answered_200']} answered, "
        f"{result['busy_503']} busy (503), {result['connection_errors']} connection errors "
        f"({result['resets']} resets), {result['wall_s']:.1f} s; RSS {result['rss_before_mb']:.0f} -> peak "
        f"{result['rss_peak_mb']:.0f} -> {result['rss_after_mb']:.0f} MB"
    )
    write_json(args.json, summary)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="slim_mobilenet_v2")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-requests", type=int, default=100_000)
    ap.add_argument("--width-fraction", type=float, default=0.25, help="share of requests naming a width")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument(
        "--max-concurrency", type=int, default=1, help="runner: at most N forward passes at once (0: no limit)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retain-freed-memory", action="store_true", help="as `slimmable serve --retain-freed-memory`")
    ap.add_argument("--json", default="benchmarks/results/serve_load.json")
    ap.add_argument("--burst", type=int, metavar="N", help="burst mode: N connections at once, one request each")
    ap.add_argument("--burst-png-side", type=int, metavar="S", help="burst with an all-black SxS PNG (memory bound)")
    ap.add_argument("--backlog", type=int, default=256, help="server listen queue (default 256)")
    ap.add_argument("--calibration-seconds", type=float, default=5.0, help="runner calibration budget")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.retain_freed_memory and not retain_freed_memory():
        raise SystemExit("--retain-freed-memory: this C library is not glibc")
    torch.manual_seed(args.seed)
    model = slimmable.create_model(args.model).eval()
    t0 = time.perf_counter()
    runner = SlimmableRunner(
        model, input_size=args.input_size, max_concurrency=args.max_concurrency or None,
        calibration_s=args.calibration_seconds,
    )  # fmt: skip
    startup_s = time.perf_counter() - t0
    if args.burst:
        main_burst(args, runner, startup_s)
        return
    lat = {w: runner.base_latency(w, 1) for w in runner.widths}
    fastest = min(lat.values())
    budgets = [("tight", fastest * 1.05)] + [("fit", lat[w] * 1.3) for w in runner.widths]
    budgets.append(("loose", lat[runner.widths[-1]] * 3))
    plans = (budgets, [("width", w) for w in runner.widths], args.width_fraction)
    images = make_jpegs(8, args.input_size + args.input_size // 7, args.seed)
    records: list[dict] = []
    lock = threading.Lock()
    sent = [0]

    def budget_left() -> bool:
        with lock:
            sent[0] += 1
            return sent[0] <= args.max_requests

    with PredictionServer(runner, "127.0.0.1", 0) as server:
        deadline = time.monotonic() + args.seconds
        started = time.perf_counter()
        threads = [
            threading.Thread(
                target=client, args=(server.port, plans, images, deadline, budget_left, records, args.seed + i)
            )
            for i in range(args.clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        drift = runner.drift
    ok = [r for r in records if r["status"] == 200]
    errors = [r for r in records if r["status"] != 200]
    per_width = {}
    for w in runner.widths:
        rs = [r for r in ok if r["width"] == w]
        per_width[f"{w:g}"] = {
            "requests": len(rs),
            "client_p50_ms": pct([r["client_ms"] for r in rs], 50),
            "client_p99_ms": pct([r["client_ms"] for r in rs], 99),
            "inference_p50_ms": pct([r["inference_ms"] for r in rs], 50),
            "inference_p99_ms": pct([r["inference_ms"] for r in rs], 99),
            "calibrated_ms": lat[w],
        }
    budgeted = [r for r in ok if r["kind"] != "width"]
    met_inf = sum(bool(r["budget_met"]) for r in budgeted)
    met_e2e = sum(r["client_ms"] <= r["value"] for r in budgeted)
    per_budget = {}
    for name, value in budgets:
        rs = [r for r in budgeted if r["kind"] == name and abs(r["value"] - value) < 1e-9]
        key = f"{name} {value:.2f} ms"
        per_budget[key] = {
            "requests": len(rs),
            "widths": dict(sorted(collections.Counter(f"{r['width']:g}" for r in rs).items())),
            "inference_met": sum(bool(r["budget_met"]) for r in rs) / len(rs) if rs else None,
            "round_trip_met": sum(r["client_ms"] <= value for r in rs) / len(rs) if rs else None,
        }
    summary = {
        "benchmark": "serve_load",
        "model": args.model,
        "input_size": args.input_size,
        "clients": args.clients,
        "seconds": args.seconds,
        "threads": torch.get_num_threads(),
        "retain_freed_memory": freed_memory_retained(),  # the flag, or the environment variables
        "max_concurrency": args.max_concurrency,
        "machine": {**machine_info(), "platform": platform.platform(), "load_avg": os.getloadavg()},
        "runner_startup_s": startup_s,
        "requests": len(records),
        "ok": len(ok),
        "errors": len(errors),
        "error_examples": [r.get("error") for r in errors[:5]],
        "throughput_rps": len(ok) / wall,
        "wall_s": wall,
        "budget_requests": len(budgeted),
        "budget_met_inference": met_inf / len(budgeted) if budgeted else None,
        "budget_met_round_trip": met_e2e / len(budgeted) if budgeted else None,
        "final_drift": drift,
        "per_width": per_width,
        "per_budget": per_budget,
    }
    print(
        f"{args.model} {args.input_size}px, {args.clients} clients, {wall:.1f} s, {torch.get_num_threads()} threads: "
        f"{len(ok)} ok, {len(errors)} errors, {summary['throughput_rps']:.1f} req/s; final drift {drift:.2f}"
    )
    print(f"{'width':>5}  {'requests':>8}  {'client p50':>10}  {'client p99':>10}  {'infer p50':>9}  {'infer p99':>9}  "
          f"{'calibrated':>10}")  # fmt: skip
    for w, s in per_width.items():
        cells = [s["client_p50_ms"], s["client_p99_ms"], s["inference_p50_ms"], s["inference_p99_ms"]]
        txt = "  ".join(f"{c:10.2f}" if c is not None else f"{'-':>10}" for c in cells)
        print(f"{w:>5}  {s['requests']:>8}  {txt}  {s['calibrated_ms']:10.2f}")
    print(f"{'budget':>20}  {'requests':>8}  {'widths used':<40}  {'infer met':>9}  {'round trip met':>14}")
    for k, s in per_budget.items():
        im = "-" if s["inference_met"] is None else f"{100 * s['inference_met']:.1f}%"
        rt = "-" if s["round_trip_met"] is None else f"{100 * s['round_trip_met']:.1f}%"
        print(f"{k:>20}  {s['requests']:>8}  {json.dumps(s['widths']):<40}  {im:>9}  {rt:>14}")
    if budgeted:
        print(
            f"budget met: {100 * summary['budget_met_inference']:.1f}% by the server (from arrival: decode, queue, "
            "inference), "
            f"{100 * summary['budget_met_round_trip']:.1f}% by client round trip ({len(budgeted)} budgeted requests)"
        )
    write_json(args.json, summary)


if __name__ == "__main__":
    main()
