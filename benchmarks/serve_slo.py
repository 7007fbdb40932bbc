"""The payoff of slimmable serving under load: SLO attainment and accuracy, adaptive width against fixed widths.

A :class:`~slimmable.serve.PredictionServer` around a calibrated :class:`~slimmable.runtime.SlimmableRunner` runs in
a **child process** (so that the load generator's Python does not take the server's GIL); it serves two ports, one
runner with the load-aware width policy (``policy="load_aware"``, the default of ``slimmable serve``) and one with
the static policy (``policy="static"``), both with the same calibrated latency table, ``max_concurrency`` (default
1: requests queue) and ``max_decodes`` as ``slimmable serve`` sets them. This process is the load generator.

Model: by default the main job's network, ``slim_resnet18`` built from the recipe ``fmnist_slim_resnet18`` (widths
0.0625/0.125/0.1875/0.25, 10 classes, 1 input channel, small-input stem of stride 2), random weights. A request
carries ``--images`` (128) 28x28 images, as binary tensor data over the Open Inference Protocol on loopback
(``--protocol v2``, default) or as a JSON tensor to ``/predict`` (``--protocol predict``). At one image per request
this network's forward pass (0.4-0.8 ms) is smaller than the HTTP round trip, and the widths hardly differ in what
a request costs; at 128 they differ 4.5x (3.6 vs 16 ms). Each width's accuracy is the main job's measured test
top-1 (see :data:`MAIN_JOB_ACCURACY`). ``--model/--widths/--input-size/--accuracies`` run another model.

Steps:

1. Calibrate the runner (its latency table) in the server process.
2. Idle round trip: one client, closed loop, per width: the client-measured round trip, the server's own time
   (``total_ms``: arrival to answer) and their difference, the client/transport overhead.
3. Capacity: ``--capacity-clients`` closed-loop clients per width, the answered requests per second. The load
   levels are fractions of the full width's (``--capacity measured``, default) or of ``1000 / its calibrated
   batch-1 latency`` (``--capacity calibrated``: the forward pass alone, no HTTP).
4. The SLO: ``--slo-factor`` (3) times the full width's calibrated latency of a request (``--slo-basis
   calibrated``, default) or its idle round trip at the client (``--slo-basis round_trip``), or ``--slo-ms``.
   Measured end to end at the client, from the request's scheduled send time to its answer.
   The margin that budgets leave for the client and the transport (``--margin open_loop``, default): the 99th
   percentile of (client latency from the scheduled send time - the server's ``total_ms``) over an open-loop run
   of ``--margin-seconds`` at ``--margin-level`` (0.2) of the capacity at the full width, i.e. measured at low load
   in the traffic the runs send. ``--margin closed_loop``: the idle closed-loop overhead's 90th percentile (step 2),
   which keeps the CPU busy between requests and has no send lag, and so is smaller; ``--margin-ms`` sets it.
5. At each load level, open-loop Poisson arrivals (times drawn in advance, the same at every mode of a level), each
   request sent at its time by a pool of ``--senders`` threads with keep-alive connections, for ``--seconds``,
   against each server mode: every fixed width (V2 ``parameters.width``), the adaptive policy
   (``parameters.latency_budget_ms`` = B, the SLO minus the margin; the load-aware policy with its utilisation
   limit ``--utilization``), the static policy (same budget, static runner), and at ``--other-levels`` the adaptive
   policy through the other protocol (``/predict?budget_ms=B`` with a JSON tensor). The modes of a level run in an
   order rotated from level to level; before each run the server forgets its drift, queue corrections and recent
   arrivals.

A slow server does not slow the arrivals: a request is handed to the sender pool at its time; when every sender
is waiting for an answer, it waits for one (the server's backlog, counted in its latency), and a request that
waited more than ``--drop-after-ms`` (default 10x the SLO) before a sender was free is dropped (a miss). Each
request's lag (send minus scheduled time) is recorded; the client is said not to keep up when the lag of requests
that found an idle sender has a 99th percentile over 1 ms.

Reported per level and mode: offered and achieved throughput, SLO attainment (answered within the SLO over all
scheduled requests: drops and errors are misses; ``attainment_from_send`` counts from the actual send instead, the
client's own lag left out), p50/p99 latency of the answered requests, the widths used, mean
accuracy (over answered requests, of their width's accuracy). The verdict per level: the adaptive policy's
attainment >= the best fixed width's (highest attainment, ties to the more accurate) and its mean accuracy >= that
width's accuracy.

Usage:
    python benchmarks/serve_slo.py [--seconds 12] [--levels 0.2,0.5,0.8,1.0,1.2,1.5,2.0] [--slo-factor 3]
        [--max-concurrency 1] [--threads 1] [--json benchmarks/results/serve_slo.json]
    python benchmarks/serve_slo.py --quick --json /tmp/serve_slo.json   # a few seconds: 2 widths, 2 levels
    python benchmarks/serve_slo.py --model slim_mobilenet_v2 --input-size 224 --accuracies 65.4,69.5,73.0,72.1
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import math
import os
import platform
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

#: the main job's measured test top-1 (%) per width of slim ResNet-18 on Fashion-MNIST (10,000 test images)
MAIN_JOB_ACCURACY = {0.0625: 90.96, 0.125: 92.07, 0.1875: 92.58, 0.25: 92.65}
MAIN_JOB_SOURCE = (
    "benchmarks/RESULTS.md, 'Fashion-MNIST: the main job', run 'quiet' (fresh clone of commit e7afe27, "
    "CI=true bash run.sh; recipe fmnist_slim_resnet18): test top-1 on the 10,000 Fashion-MNIST test images"
)
RECIPE = "fmnist_slim_resnet18"
SUPERSERVE = (
    "SuperServe (Khare et al., NSDI 2025, arXiv 2312.16733) reports 4.67% higher accuracy at the same SLO attainment, "
    "or 2.85x the SLO attainment at the same accuracy, against serving fixed models"
)
_TAG = "@@ "  # the server child's protocol lines on its stdout


# ---------------------------------------------------------------------------------------------- the server process


def _emit(obj: dict[str, Any]) -> None:
    print(_TAG + json.dumps(obj), flush=True)


def build_model(spec: dict[str, Any]) -> tuple[str, dict[str, Any], Any]:
    """``(name, kwargs, model)``: the served model (random weights from ``spec["seed"]``), the same in every process."""
    import torch

    import slimmable

    torch.manual_seed(spec["seed"])
    if spec["recipe"]:
        from slimmable.config import load_recipe
        from slimmable.tasks.base import model_kwargs_from_config

        cfg = load_recipe(spec["recipe"])
        name, kwargs = cfg.model.name, model_kwargs_from_config(cfg, num_classes=10, in_chans=1)  # Fashion-MNIST
    else:
        name, kwargs = spec["model"], {}
    return name, kwargs, slimmable.create_model(name, **kwargs).eval()


def server_child(spec: dict[str, Any]) -> None:
    """The server process: build and calibrate, serve both policies, answer ``reset``/``stats``/``quit`` on stdin."""
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    from _bench import machine_info

    from slimmable.export._io import INPUT_NAME
    from slimmable.runtime import SlimmableRunner
    from slimmable.serve import PredictionServer

    name, kwargs, model = build_model(spec)
    mc = spec["max_concurrency"] or None
    t0 = time.perf_counter()
    n = spec["images"]
    runner = SlimmableRunner(
        model, spec["widths"], input_size=spec["input_size"], max_concurrency=mc, batch_sizes=(n,),
        calibration_s=spec["calibration_seconds"], policy="load_aware", cache_path=None,
    )  # fmt: skip
    table = {w: runner.base_latency(w, n) for w in runner.widths}
    static = SlimmableRunner(
        model, runner.widths, input_size=spec["input_size"], max_concurrency=mc, batch_sizes=(n,), calibrate=False,
        policy="static",
    )  # fmt: skip
    static.load_latencies({n: table})  # the same table: the policies differ, not their estimates
    startup_s = time.perf_counter() - t0
    runner.policy.utilization = spec["utilization"]
    runners = {"load_aware": runner, "static": static}
    # as `slimmable serve` builds it: max_decodes = max_concurrency
    servers = {
        k: PredictionServer(r, "127.0.0.1", 0, max_decodes=mc, max_batch=max(32, n)).start() for k, r in runners.items()
    }
    mem = runner.memory_bytes()
    _emit({
        "ready": True,
        "ports": {k: s.port for k, s in servers.items()},
        "model": name,
        "model_kwargs": {k: v if isinstance(v, (int, float, str, bool)) else list(v) for k, v in kwargs.items()},
        "widths": list(runner.widths),
        "input_shape": list(runner.input_shape),
        "calibrated_latency_ms": {f"{w:g}": table[w] for w in runner.widths},
        "calibration_seconds": runner.calibration_seconds,
        "runner_startup_s": startup_s,
        "v2_model": servers["load_aware"].v2.name,
        "v2_input": INPUT_NAME,
        "machine": {**machine_info(), "platform": platform.platform()},
        "server_threads": torch.get_num_threads(),
        "switch_interval_s": sys.getswitchinterval(),
        "memory_mb": {"dense_total": mem["dense_total"] / 1e6, "source_weight_set": mem["source_weight_set"] / 1e6},
    })  # fmt: skip
    try:
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "reset":  # each run starts from the calibrated estimates
                for r in runners.values():
                    r.reset_drift()
                    r.policy.reset_correction()
                _emit({"ok": True})
            elif cmd == "stats":
                _emit({k: {"drift": round(r.drift, 4), **r.policy.stats()} for k, r in runners.items()})
            elif cmd == "quit":
                break
    finally:
        for s in servers.values():
            s.stop()


class ServerProcess:
    """The server child: start it, wait for its ports, send it commands."""

    def __init__(self, spec: dict[str, Any]) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--server-child", json.dumps(spec)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.info = self._read()
        if not self.info.get("ready"):
            raise RuntimeError(f"the server process did not start: {self.info}")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(_TAG):
                return json.loads(line[len(_TAG) :])
            print("  [server] " + line.rstrip(), flush=True)
        raise RuntimeError(f"the server process ended (exit code {self.proc.wait()})")

    def command(self, cmd: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------------------------- requests


def _connect(port: int, timeout: float) -> http.client.HTTPConnection:
    # TCP_NODELAY: http.client writes headers and body separately; Nagle would hold the body for the delayed ACK.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


class Mode:
    """A server mode: where requests go and what they ask for. ``bodies`` cycle over the inputs."""

    def __init__(
        self, name: str, port: int, path: str, bodies: list[bytes], v2: bool, headers: list[dict[str, str]],
        width: float | None = None,
    ) -> None:  # fmt: skip
        self.name, self.port, self.path, self.bodies, self.v2, self.headers = name, port, path, bodies, v2, headers
        self.width = width  # the width a Triton version runs (its answers do not say)

    def request(self, i: int) -> tuple[bytes, dict[str, str]]:
        """The body and headers of the ``i``-th request (cycling over the inputs)."""
        k = i % len(self.bodies)
        return self.bodies[k], self.headers[k]

    def parse(self, data: dict[str, Any]) -> tuple[float, float | None, float | None, float | None, bool | None]:
        """``(width, server total_ms, queue_ms, inference_ms, budget_met)`` of an answer."""
        if self.v2:
            p = data.get("parameters") or {}
            if self.width is not None:  # a Triton version
                width = self.width
            elif "width" in p:
                width = float(p["width"])
            else:  # Triton's router: its width output (its Python backend returns no response parameters)
                width = float(next(o for o in data["outputs"] if o["name"] == "width")["data"][0])
            return width, p.get("total_ms"), p.get("queue_ms"), p.get("latency_ms"), p.get("budget_met")
        return (
            float(data["width"]), data.get("total_ms"), data.get("queue_ms"), data.get("inference_ms"),
            data.get("budget_met"),
        )  # fmt: skip


_HEADERS = {"Content-Type": "application/json"}


def make_inputs(shape: list[int], images: int, n: int, seed: int) -> list[np.ndarray]:
    """``n`` request inputs of ``images`` items of ``shape`` each (float32, rounded so JSON and binary agree)."""
    rng = np.random.default_rng(seed)
    return [np.round(rng.standard_normal([images, *shape]), 4).astype(np.float32) for _ in range(n)]


def predict_mode(name: str, port: int, inputs: list[np.ndarray], query: str) -> Mode:
    """``/predict`` with the images as a JSON nested list (the server's own API)."""
    bodies = [json.dumps({"tensor": x.tolist(), "top_k": 1}).encode() for x in inputs]
    return Mode(name, port, f"/predict?{query}", bodies, v2=False, headers=[_HEADERS] * len(bodies))


def v2_mode(
    name: str, port: int, inputs: list[np.ndarray], model: str, input_name: str, params: dict,
    version: int | None = None, width: float | None = None,
) -> Mode:  # fmt: skip
    """Open Inference Protocol infer with the images as binary tensor data (the extension Triton clients use)."""
    bodies, headers = [], []
    for x in inputs:
        blob = x.astype("<f4").tobytes()
        entry = {"name": input_name, "shape": list(x.shape), "datatype": "FP32",
                 "parameters": {"binary_data_size": len(blob)}}  # fmt: skip
        head = json.dumps({"inputs": [entry], "parameters": params}).encode()
        bodies.append(head + blob)
        headers.append({"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))})
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version is not None else "") + "/infer"
    return Mode(name, port, path, bodies, v2=True, headers=headers, width=width)


def closed_loop(mode: Mode, clients: int, seconds: float, timeout: float) -> dict[str, Any]:
    """``clients`` threads sending back to back for ``seconds``: throughput, client and server times."""
    records: list[tuple[float, float, float]] = []
    errors = [0]
    deadline = time.perf_counter() + seconds

    def loop(k: int) -> None:
        conn = _connect(mode.port, timeout)
        i = k
        try:
            while time.perf_counter() < deadline:
                body, headers = mode.request(i)
                i += clients
                t0 = time.perf_counter()
                try:
                    conn.request("POST", mode.path, body, headers)
                    resp = conn.getresponse()
                    raw = resp.read()
                    ms = 1e3 * (time.perf_counter() - t0)
                    if resp.status != 200:
                        errors[0] += 1
                        continue
                    w, total, _, _, _ = mode.parse(json.loads(raw))
                    records.append((ms, float(total or 0.0), w))
                except (OSError, http.client.HTTPException, ValueError):
                    errors[0] += 1
                    conn.close()
                    conn = _connect(mode.port, timeout)
        finally:
            conn.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    client = [r[0] for r in records]
    overhead = [r[0] - r[1] for r in records]
    return {
        "clients": clients,
        "seconds": wall,
        "requests": len(records),
        "errors": errors[0],
        "rps": len(records) / wall,
        "client_p50_ms": _pct(client, 50),
        "client_p90_ms": _pct(client, 90),
        "server_total_p50_ms": _pct([r[1] for r in records], 50),
        "overhead_p50_ms": _pct(overhead, 50),
        "overhead_p90_ms": _pct(overhead, 90),
    }


# ---------------------------------------------------------------------------------------------- open loop

# A request's record (a tuple): scheduled, sent, done (s from the run's start), status (int, "drop" or
# "error:Type"), width, server total_ms, queue_ms, inference_ms, budget_met, whether a sender was idle at dispatch.
Record = tuple


def poisson_arrivals(rate: float, seconds: float, seed: int) -> np.ndarray:
    """Arrival times (s) of a Poisson process of ``rate`` per second over ``seconds``, drawn in advance."""
    rng = np.random.default_rng(seed)
    n = int(rate * seconds * 1.5) + 20
    t = np.cumsum(rng.exponential(1.0 / rate, n))
    while t[-1] < seconds:
        t = np.concatenate([t, t[-1] + np.cumsum(rng.exponential(1.0 / rate, n))])
    return t[t < seconds]


def open_loop(mode: Mode, arrivals: np.ndarray, senders: int, drop_after_s: float, timeout: float) -> dict:
    """Send each request at its arrival time through a pool of ``senders`` keep-alive connections."""
    n = len(arrivals)
    results: list[Record | None] = [None] * n
    work: queue.SimpleQueue = queue.SimpleQueue()
    idle = [senders]
    lock = threading.Lock()
    conns = [_connect(mode.port, timeout) for _ in range(senders)]
    dispatch_lag = np.zeros(n)
    start = time.perf_counter() + 0.02

    def send(k: int) -> None:
        conn = conns[k]
        while True:
            item = work.get()
            if item is None:
                break
            i, had_idle = item
            with lock:
                idle[0] -= 1
            sched = float(arrivals[i])
            t_send = time.perf_counter() - start
            if t_send - sched > drop_after_s:
                results[i] = (sched, t_send, None, "drop", None, None, None, None, None, had_idle)
            else:
                try:
                    conn.request("POST", mode.path, *mode.request(i))
                    resp = conn.getresponse()
                    raw = resp.read()
                    t_done = time.perf_counter() - start
                    if resp.status == 200:
                        w, total, q, inf, met = mode.parse(json.loads(raw))
                        results[i] = (sched, t_send, t_done, 200, w, total, q, inf, met, had_idle)
                    else:
                        results[i] = (sched, t_send, t_done, resp.status, None, None, None, None, None, had_idle)
                except (OSError, http.client.HTTPException, ValueError, KeyError) as err:
                    t_done = time.perf_counter() - start
                    results[i] = (sched, t_send, t_done, f"error:{type(err).__name__}", None, None, None, None, None,
                                  had_idle)  # fmt: skip
                    conn.close()
                    conn = _connect(mode.port, timeout)
            with lock:
                idle[0] += 1
        conn.close()

    threads = [threading.Thread(target=send, args=(k,), daemon=True) for k in range(senders)]
    for t in threads:
        t.start()
    for i, t_arr in enumerate(arrivals):
        delay = start + t_arr - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        dispatch_lag[i] = time.perf_counter() - start - t_arr
        work.put((i, idle[0] - work.qsize() > 0))
    for _ in threads:
        work.put(None)
    for t in threads:
        t.join()
    end = time.perf_counter() - start
    return {"records": results, "dispatch_lag_s": dispatch_lag, "span_s": end}


def _pct(values, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def summarize(
    mode: Mode, level: float, rate: float, seconds: float, run: dict, slo_ms: float, acc: dict[float, float]
) -> dict[str, Any]:
    recs = run["records"]
    n = len(recs)
    ok = [r for r in recs if r[3] == 200]
    drops = sum(1 for r in recs if r[3] == "drop")
    errors = n - len(ok) - drops
    latency = [1e3 * (r[2] - r[0]) for r in ok]  # scheduled send to answer
    met = sum(1 for ms in latency if ms <= slo_ms)
    met_from_send = sum(1 for r in ok if 1e3 * (r[2] - r[1]) <= slo_ms)  # the client's own lag left out
    widths = collections.Counter(r[4] for r in ok)
    lag_idle = [1e3 * (r[1] - r[0]) for r in recs if r[9]]
    lag_busy = [1e3 * (r[1] - r[0]) for r in recs if not r[9]]
    last_done = max((r[2] for r in ok), default=seconds)
    server_total = [r[5] for r in ok if r[5] is not None]
    overhead = [1e3 * (r[2] - r[1]) - r[5] for r in ok if r[5] is not None]
    beyond = [1e3 * (r[2] - r[0]) - r[5] for r in ok if r[5] is not None]  # send lag + transport + client
    budgeted = [r for r in ok if r[8] is not None]
    return {
        "level": level,
        "mode": mode.name,
        "offered_rps": n / seconds,
        "target_rps": rate,
        "requests": n,
        "answered": len(ok),
        "dropped": drops,
        "errors": errors,
        "error_examples": sorted({str(r[3]) for r in recs if r[3] not in (200, "drop")})[:5],
        "achieved_rps": len(ok) / max(seconds, last_done),
        "slo_met": met,
        "attainment": met / n if n else None,
        "attainment_from_send": met_from_send / n if n else None,
        "p50_ms": _pct(latency, 50),
        "p99_ms": _pct(latency, 99),
        "width_shares": {f"{w:g}": c / len(ok) for w, c in sorted(widths.items())},
        "mean_accuracy": float(np.mean([acc[r[4]] for r in ok])) if ok else None,
        "server_total_p50_ms": _pct(server_total, 50),
        "server_total_p99_ms": _pct(server_total, 99),
        "server_queue_p50_ms": _pct([r[6] for r in ok if r[6] is not None], 50),
        "server_inference_p50_ms": _pct([r[7] for r in ok if r[7] is not None], 50),
        "client_overhead_p50_ms": _pct(overhead, 50),
        "beyond_server_p50_ms": _pct(beyond, 50),
        "beyond_server_p90_ms": _pct(beyond, 90),
        "server_budget_met": (sum(bool(r[8]) for r in budgeted) / len(budgeted)) if budgeted else None,
        "lag": {
            "dispatch_p50_ms": _pct(1e3 * run["dispatch_lag_s"], 50),
            "dispatch_p99_ms": _pct(1e3 * run["dispatch_lag_s"], 99),
            "dispatch_max_ms": _pct(1e3 * run["dispatch_lag_s"], 100),
            "send_idle_sender_p99_ms": _pct(lag_idle, 99),
            "send_idle_sender_max_ms": _pct(lag_idle, 100),
            "requests_waiting_for_a_sender": len(lag_busy),
            "send_busy_p99_ms": _pct(lag_busy, 99),
        },
        "span_s": run["span_s"],
    }


def verdict(rows: list[dict], fixed: list[str], adaptive: str = "adaptive") -> dict[str, Any]:
    """The issue's goal at one level: ``adaptive`` attains >= the best fixed width and is at least as accurate."""
    by = {r["mode"]: r for r in rows}
    cands = [by[m] for m in fixed if m in by]
    best = max(cands, key=lambda r: (r["slo_met"], r["mean_accuracy"] if r["mean_accuracy"] is not None else -1.0))
    a = by[adaptive]
    n = a["requests"]
    pa, pb = a["attainment"], best["attainment"]
    se = math.sqrt(max(pa * (1 - pa), 0.0) / max(n, 1) + max(pb * (1 - pb), 0.0) / max(best["requests"], 1))
    att_ok = a["slo_met"] * best["requests"] >= best["slo_met"] * a["requests"]  # same schedule: same requests
    acc_ok = (
        a["mean_accuracy"] is not None
        and (best["mean_accuracy"] is None or a["mean_accuracy"] >= best["mean_accuracy"] - 1e-9)
    )  # fmt: skip
    return {
        "level": a["level"],
        "mode": adaptive,
        "best_fixed": best["mode"],
        "best_fixed_attainment": pb,
        "best_fixed_accuracy": best["mean_accuracy"],
        "attainment": pa,
        "accuracy": a["mean_accuracy"],
        "attainment_diff": pa - pb,
        "attainment_diff_se": se,
        "accuracy_diff": None if a["mean_accuracy"] is None or best["mean_accuracy"] is None
        else a["mean_accuracy"] - best["mean_accuracy"],
        "attainment_ok": att_ok,
        "accuracy_ok": acc_ok,
        "goal_met": att_ok and acc_ok,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- main


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _write_json(path: str, data: Any) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, p)
    print(f"wrote {p}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server-child", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=f"a registered model (default: the recipe {RECIPE}'s slim_resnet18)")
    ap.add_argument("--widths", help="comma-separated widths to serve (default: the model's)")
    ap.add_argument("--input-size", type=int, help="input side (default 28 for the main job's model, else 224)")
    ap.add_argument("--accuracies", help="comma-separated accuracy (%%) per served width, ascending widths")
    ap.add_argument("--levels", default="0.2,0.5,0.8,1.0,1.2,1.5,2.0", help="offered load / full-width capacity")
    ap.add_argument("--images", type=int, default=128, help="images per request (default 128; --quick: 32)")
    ap.add_argument(
        "--protocol", choices=("v2", "predict"), default="v2",
        help="how every mode's requests are sent: the Open Inference Protocol with binary tensors (default) or "
        "/predict with JSON tensors",
    )  # fmt: skip
    ap.add_argument(
        "--other-levels", default="0.5,1.0,1.5,2.0",
        help="levels that also run the adaptive policy through the other protocol",
    )  # fmt: skip
    ap.add_argument("--seconds", type=float, default=12.0, help="arrivals per level and mode (default 12)")
    ap.add_argument("--senders", type=int, default=32, help="sender threads (keep-alive connections)")
    ap.add_argument("--slo-ms", type=float, help="the SLO in ms (default: --slo-factor x --slo-basis)")
    ap.add_argument("--slo-factor", type=float, default=3.0)
    ap.add_argument(
        "--slo-basis", choices=("calibrated", "round_trip"), default="calibrated",
        help="what --slo-factor multiplies: the full width's calibrated batch-1 forward pass (default) or its idle "
        "round trip at the client",
    )  # fmt: skip
    ap.add_argument(
        "--capacity", choices=("measured", "calibrated"), default="measured",
        help="what the levels are fractions of: the full width's closed-loop throughput through the server "
        "(default) or 1000 / its calibrated batch-1 latency",
    )  # fmt: skip
    ap.add_argument("--capacity-clients", type=int, default=4)
    ap.add_argument("--capacity-seconds", type=float, default=2.0, help="closed-loop seconds per width")
    ap.add_argument("--idle-seconds", type=float, default=1.0, help="idle round-trip seconds per width")
    ap.add_argument("--margin-ms", type=float, help="budget = SLO - margin ms (default: --margin's measurement)")
    ap.add_argument(
        "--margin", choices=("open_loop", "closed_loop"), default="open_loop",
        help="how the margin is measured at the full width: p99 of the client time beyond the server's in an "
        "open-loop run at --margin-level (default), or in the idle closed loop",
    )  # fmt: skip
    ap.add_argument("--margin-level", type=float, default=0.2)
    ap.add_argument("--margin-seconds", type=float, default=8.0)
    ap.add_argument("--drop-after-ms", type=float, help="drop a request not sent within this (default 10x SLO)")
    ap.add_argument("--max-concurrency", type=int, default=1, help="runner: forward passes at once (0: no limit)")
    ap.add_argument("--threads", type=int, default=1, help="server torch intra-op threads (default 1; 0: torch's)")
    ap.add_argument("--calibration-seconds", type=float, default=5.0)
    ap.add_argument(
        "--utilization", type=float, default=0.8,
        help="the load-aware policy's utilisation limit at the measured arrival rate (0: none, the queue alone)",
    )  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--triton", action="store_true",
        help="also serve the model's Triton repository (--triton-backend python) on the Triton bundled in "
        "nvidia-pytriton: each version and the router at --triton-levels",
    )  # fmt: skip
    ap.add_argument("--triton-levels", default="0.5,1.0,1.5,2.0")
    ap.add_argument(
        "--triton-python", default=os.environ.get("SLIMMABLE_TRITON_PYTHON"),
        help="the Python (numpy<2, onnxruntime) that runs the Triton models (default $SLIMMABLE_TRITON_PYTHON)",
    )  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="a few seconds: 2 widths, 2 levels, short runs")
    ap.add_argument("--json", default="benchmarks/results/serve_slo.json")
    args = ap.parse_args()
    if args.server_child:
        server_child(json.loads(args.server_child))
        return
    wall0 = time.perf_counter()
    if args.quick:
        args.widths = args.widths or ("0.0625,0.25" if args.model is None else None)
        args.levels, args.other_levels, args.seconds, args.images = "0.5,1.5", "1.5", 1.0, 32
        args.capacity_seconds, args.idle_seconds, args.calibration_seconds = 0.5, 0.3, 1.0
        args.margin_seconds = 0.5
        args.senders = min(args.senders, 16)
    levels = _floats(args.levels)
    other_levels = set(_floats(args.other_levels)) & set(levels)
    sys.setswitchinterval(0.0002)  # the dispatcher and the senders hand the GIL over quickly (default 5 ms)
    spec = {
        "recipe": None if args.model else RECIPE,
        "model": args.model,
        "widths": _floats(args.widths) if args.widths else None,
        "input_size": args.input_size or (28 if args.model is None else 224),
        "images": args.images,
        "utilization": args.utilization or None,
        "threads": args.threads,
        "max_concurrency": args.max_concurrency,
        "calibration_seconds": args.calibration_seconds,
        "seed": args.seed,
    }
    print(f"starting the server process ({'recipe ' + RECIPE if spec['recipe'] else args.model}) ...", flush=True)
    server = ServerProcess(spec)
    try:
        summary = run_benchmark(args, server, levels, other_levels, spec)
    finally:
        server.close()
    summary["wall_s"] = time.perf_counter() - wall0
    print(f"total wall time {summary['wall_s']:.0f} s")
    _write_json(args.json, summary)


def run_benchmark(
    args: argparse.Namespace, server: ServerProcess, levels: list[float], other_levels: set[float], spec: dict
) -> dict[str, Any]:
    info = server.info
    widths = [float(w) for w in info["widths"]]
    full = widths[-1]
    calibrated = {float(k): v for k, v in info["calibrated_latency_ms"].items()}
    if args.accuracies:
        accs = _floats(args.accuracies)
        if len(accs) != len(widths):
            raise SystemExit(f"--accuracies gives {len(accs)} values for {len(widths)} widths {widths}")
        acc, acc_source = dict(zip(widths, accs)), "--accuracies"
    elif spec["recipe"]:
        missing = [w for w in widths if w not in MAIN_JOB_ACCURACY]
        if missing:
            raise SystemExit(f"widths {missing} have no main-job accuracy; give --accuracies")
        acc, acc_source = {w: MAIN_JOB_ACCURACY[w] for w in widths}, MAIN_JOB_SOURCE
    else:
        raise SystemExit("--model needs --accuracies (one per served width)")
    print(f"server: {info['model']} widths {widths}, input {info['input_shape']}, {info['server_threads']} torch "
          f"thread(s), max_concurrency {args.max_concurrency}; CPU capability {info['machine']['cpu_capability']}, "
          f"torch {info['machine']['torch']}")  # fmt: skip
    print(f"calibrated latency of a request of {args.images} images (ms): "
          + ", ".join(f"{w:g}: {calibrated[w]:.3f}" for w in widths))  # fmt: skip
    ports = info["ports"]
    inputs = make_inputs(info["input_shape"], args.images, 8, args.seed)
    timeout = 60.0
    other = "predict" if args.protocol == "v2" else "v2"

    def mode(name: str, policy: str, protocol: str, width: float | None = None, budget: float | None = None) -> Mode:
        port = ports[policy]
        if protocol == "v2":
            params = {"width": width} if width is not None else {"latency_budget_ms": round(budget, 4)}
            return v2_mode(name, port, inputs, info["v2_model"], info["v2_input"], params)
        query = f"width={width:g}" if width is not None else f"budget_ms={budget:.4f}"
        return predict_mode(name, port, inputs, query)

    def fixed_mode(w: float, protocol: str = args.protocol) -> Mode:
        return mode(f"w={w:g}", "load_aware", protocol, width=w)

    # the idle round trip and the capacity, per width
    idle, capacity = {}, {}
    for w in widths:
        server.command("reset")
        idle[f"{w:g}"] = closed_loop(fixed_mode(w), 1, args.idle_seconds, timeout)
        capacity[f"{w:g}"] = closed_loop(fixed_mode(w), args.capacity_clients, args.capacity_seconds, timeout)
    idle_full = idle[f"{full:g}"]
    server.command("reset")
    idle_other = closed_loop(fixed_mode(full, other), 1, args.idle_seconds, timeout)
    print(f"{'width':>7} {'calibrated':>10} {'idle round trip p50':>19} {'server p50':>10} {'overhead p50/p90':>16} "
          f"{'closed-loop req/s':>17}")  # fmt: skip
    for w in widths:
        i, c = idle[f"{w:g}"], capacity[f"{w:g}"]
        print(f"{w:>7g} {calibrated[w]:>10.3f} {_fmt(i['client_p50_ms'], '.3f'):>19} "
              f"{_fmt(i['server_total_p50_ms'], '.3f'):>10} "
              f"{_fmt(i['overhead_p50_ms'], '.3f') + '/' + _fmt(i['overhead_p90_ms'], '.3f'):>16} "
              f"{c['rps']:>17.0f}")  # fmt: skip
    print(f"{other} at width {full:g}: idle round trip p50 {_fmt(idle_other['client_p50_ms'], '.3f')} ms")

    capacity_calibrated = 1e3 / calibrated[full]
    cap = capacity[f"{full:g}"]["rps"] if args.capacity == "measured" else capacity_calibrated
    if args.slo_ms:
        slo, slo_rule = args.slo_ms, "--slo-ms"
    elif args.slo_basis == "round_trip":
        slo = args.slo_factor * idle_full["client_p50_ms"]
        slo_rule = f"{args.slo_factor:g} x the full width's idle round trip p50 at the client"
    else:
        slo = args.slo_factor * calibrated[full]
        slo_rule = f"{args.slo_factor:g} x the full width's calibrated latency (a request of {args.images} images)"
    drop_after = args.drop_after_ms if args.drop_after_ms is not None else 10 * slo
    server.command("reset")
    arrivals = poisson_arrivals(args.margin_level * cap, args.margin_seconds, args.seed * 1000 + 999)
    run = open_loop(fixed_mode(full), arrivals, args.senders, drop_after / 1e3, timeout)
    beyond = [1e3 * (r[2] - r[0]) - r[5] for r in run["records"] if r[3] == 200 and r[5] is not None]
    margin_info = {
        "closed_loop_idle_p90_ms": idle_full["overhead_p90_ms"],
        "open_loop": {"level": args.margin_level, "seconds": args.margin_seconds, "requests": len(arrivals),
                      "p50_ms": _pct(beyond, 50), "p90_ms": _pct(beyond, 90), "p99_ms": _pct(beyond, 99)},
    }  # fmt: skip
    if args.margin_ms is not None:
        margin, margin_rule = args.margin_ms, "--margin-ms"
    elif args.margin == "open_loop":
        margin = margin_info["open_loop"]["p99_ms"]
        margin_rule = (f"p99 of the client latency beyond the server's total_ms, open loop at {args.margin_level:g} "
                       f"of capacity, full width")  # fmt: skip
    else:
        margin, margin_rule = idle_full["overhead_p90_ms"], "p90 of the idle closed-loop client overhead, full width"
    margin_info["rule"] = margin_rule
    budget = slo - margin
    floor = min(calibrated.values())
    budget_clamped = budget < floor
    if budget_clamped:
        print(f"WARNING: budget {budget:.3f} ms is below the narrowest width's calibrated latency; using {floor:.3f}")
        budget = floor
    print(f"SLO {slo:.3f} ms ({slo_rule}); budget {budget:.3f} ms (SLO - {margin:.3f} ms margin: {margin_rule}; "
          f"closed-loop idle p90 {idle_full['overhead_p90_ms']:.3f} ms); full-width capacity {cap:.0f} req/s "
          f"({args.capacity}; calibrated "
          f"{capacity_calibrated:.0f}); drop after {drop_after:.1f} ms")  # fmt: skip

    modes_common = [fixed_mode(w) for w in widths] + [
        mode("adaptive", "load_aware", args.protocol, budget=budget),
        mode("static", "static", args.protocol, budget=budget),
    ]
    other_adaptive = mode(f"adaptive_{other}", "load_aware", other, budget=budget)
    triton_levels = set(_floats(args.triton_levels)) & set(levels) if args.triton else set()
    triton, triton_modes, triton_info, triton_work = (None, [], None, None)
    if triton_levels:
        triton, triton_modes, triton_info, triton_work = start_triton(
            args, spec, widths, inputs, info["v2_input"], budget
        )
    n_runs = len(levels) * len(modes_common) + len(other_levels) + len(triton_levels) * len(triton_modes)
    print(f"{n_runs} runs of {args.seconds:g} s: about {n_runs * (args.seconds + 0.6) / 60:.1f} min", flush=True)
    rows: list[dict] = []
    try:
        for li, level in enumerate(levels):
            rate = level * cap
            arrivals = poisson_arrivals(rate, args.seconds, args.seed * 1000 + li)
            modes = modes_common + ([other_adaptive] if level in other_levels else [])
            modes += triton_modes if level in triton_levels else []
            k = li % len(modes)
            for m in modes[k:] + modes[:k]:
                rows.append(run_mode(m, level, rate, arrivals, server, args, drop_after, slo, acc, timeout))
    finally:
        if triton is not None:
            triton.stop()
            shutil.rmtree(triton_work, ignore_errors=True)

    fixed = [f"w={w:g}" for w in widths]
    verdicts, extra = [], []
    for level in levels:
        lr = [r for r in rows if r["level"] == level]
        verdicts.append(verdict(lr, fixed))
        extra.append(verdict(lr, fixed, "static"))
        if level in other_levels:
            extra.append(verdict(lr, fixed, f"adaptive_{other}"))
        if level in triton_levels:  # Triton's router against Triton's own fixed versions
            extra.append(verdict(lr, [f"triton w={w:g}" for w in widths], "triton adaptive"))
    lagging = [
        f"{r['level']:g}/{r['mode']}" for r in rows
        if (r["lag"]["send_idle_sender_p99_ms"] or 0.0) > 1.0 or (r["lag"]["dispatch_p99_ms"] or 0.0) > 1.0
    ]  # fmt: skip
    print_table(rows, levels, slo)
    print_verdicts(verdicts, extra)
    if lagging:
        print(f"the client did not keep up (send lag p99 > 1 ms with an idle sender) in: {', '.join(lagging)}")
    else:
        print("the client kept up: every run's send lag p99 (with an idle sender) and dispatch lag p99 <= 1 ms")
    met = sum(v["goal_met"] for v in verdicts)
    print(f"goal met at {met} of {len(verdicts)} levels. {SUPERSERVE}.")
    return {
        "benchmark": "serve_slo",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "quick": args.quick,
        "model": info["model"],
        "recipe": spec["recipe"],
        "model_kwargs": info["model_kwargs"],
        "widths": widths,
        "input_shape": info["input_shape"],
        "images_per_request": args.images,
        "protocol": args.protocol,
        "accuracy": {f"{w:g}": acc[w] for w in widths},
        "accuracy_source": acc_source,
        "machine": {
            **info["machine"],
            "server_threads": info["server_threads"],
            "load_avg_at_end": os.getloadavg(),
            "client": {"python": platform.python_version(), "switch_interval_s": sys.getswitchinterval()},
        },
        "server": {
            "process": "separate (child) process, PredictionServer + SlimmableRunner; this process generates load",
            "max_concurrency": args.max_concurrency,
            "utilization": args.utilization or None,
            "max_decodes": args.max_concurrency or None,
            "torch_threads": info["server_threads"],
            "policies": {"adaptive": "load_aware", "static": "static", f"adaptive_{other}": "load_aware"},
            "calibrated_latency_ms": info["calibrated_latency_ms"],
            "calibration_seconds": info["calibration_seconds"],
            "runner_startup_s": info["runner_startup_s"],
            "memory_mb": info["memory_mb"],
        },
        "idle": {"per_width": idle, f"{other}_full_width": idle_other},
        "capacity": {
            "basis": args.capacity,
            "rps": cap,
            "measured_closed_loop_rps": {k: v["rps"] for k, v in capacity.items()},
            "closed_loop": capacity,
            "calibrated_rps": capacity_calibrated,
        },
        "slo_ms": slo,
        "slo_rule": slo_rule,
        "margin_ms": margin,
        "margin": margin_info,
        "budget_ms": budget,
        "budget_clamped_to_narrowest": budget_clamped,
        "drop_after_ms": drop_after,
        "levels": levels,
        "other_protocol": other,
        "other_levels": sorted(other_levels),
        "triton_levels": sorted(triton_levels),
        "triton": triton_info,
        "seconds": args.seconds,
        "senders": args.senders,
        "arrivals": "open-loop Poisson, drawn in advance (the same times for every mode of a level)",
        "latency_measured": "at the client, from the request's scheduled send time to the end of its answer",
        "client_kept_up": not lagging,
        "client_lagging_runs": lagging,
        "runs": rows,
        "verdict": verdicts,
        "verdict_static_and_v2": extra,
        "goal_met_levels": met,
        "superserve": SUPERSERVE,
    }


def run_mode(
    m: Mode, level: float, rate: float, arrivals: np.ndarray, server: ServerProcess, args: argparse.Namespace,
    drop_after: float, slo: float, acc: dict[float, float], timeout: float,
) -> dict[str, Any]:  # fmt: skip
    """One open-loop run of ``arrivals`` against mode ``m``, summarised (our server forgets its corrections first;
    Triton's router keeps what it learnt)."""
    ours = not m.name.startswith("triton")
    if ours:
        server.command("reset")
    run = open_loop(m, arrivals, args.senders, drop_after / 1e3, timeout)
    row = summarize(m, level, rate, args.seconds, run, slo, acc)
    if ours:
        st = server.command("stats")
        row["server_state_after"] = st["static" if m.name == "static" else "load_aware"]
    print(f"  level {level:g} {m.name:>16}: {row['requests']:>6} req, attainment "
          f"{row['attainment']:.3f}, p50 {_fmt(row['p50_ms'], '.2f')} p99 {_fmt(row['p99_ms'], '.2f')} ms, "
          f"acc {_fmt(row['mean_accuracy'], '.2f')}, dropped {row['dropped']}, errors {row['errors']}, lag "
          f"p99 {_fmt(row['lag']['send_idle_sender_p99_ms'], '.2f')} ms", flush=True)  # fmt: skip
    return row


def start_triton(
    args: argparse.Namespace, spec: dict, widths: list[float], inputs: list[np.ndarray], input_name: str,
    budget: float,
) -> tuple[Any, list[Mode], dict[str, Any], Path]:  # fmt: skip
    """The same model as a Triton repository on the bundled Triton: the server, its modes (each version, and the
    router with the budget), what to record, and the folder holding the repository (removed after the runs)."""
    from slimmable.export import export_triton
    from slimmable.export.triton_local import LocalTriton

    _, _, model = build_model(spec)
    work = Path(tempfile.mkdtemp(prefix="serve-slo-triton-"))
    t0 = time.perf_counter()
    repo = export_triton(
        model, work / "repo", widths=widths, name="slo", input_size=spec["input_size"], triton_backend="python",
        max_batch_size=args.images, latency_runs=20,
    )  # fmt: skip
    export_s = time.perf_counter() - t0
    server = LocalTriton(repo.path, python=args.triton_python, threads=1)
    try:
        server.start()
    except Exception:
        shutil.rmtree(work, ignore_errors=True)
        raise
    print(f"Triton (bundled in nvidia-pytriton) ready in {server.start_s:.1f} s on {server.url}", flush=True)
    port = server.http_port
    modes = [
        v2_mode(f"triton w={w:g}", port, inputs, repo.model, input_name, {}, version=v, width=w)
        for v, w in repo.versions.items()
    ] + [v2_mode("triton adaptive", port, inputs, repo.router, input_name, {"latency_budget_ms": round(budget, 4)})]
    info = {
        "server": "tritonserver bundled in nvidia-pytriton, Python-backend models running each width's ONNX file "
        "with onnxruntime (1 thread), the router's load-aware policy (width_policy.py)",
        "models_python": str(args.triton_python or sys.executable),
        "export_s": export_s,
        "start_s": server.start_s,
        "export_latency_ms_batch_1": {f"{float(repo.versions[v]):g}": ms for v, ms in repo.latency_ms.items()},
    }
    return server, modes, info, work


def print_table(rows: list[dict], levels: list[float], slo: float) -> None:
    print(f"\nSLO {slo:.3f} ms end to end at the client")
    head = (f"{'level':>5} {'mode':>16} {'offered':>7} {'achieved':>8} {'attain':>6} {'p50 ms':>7} {'p99 ms':>8} "
            f"{'acc %':>6} {'drop':>5} {'err':>3}  widths used")  # fmt: skip
    print(head)
    for level in levels:
        for r in (r for r in rows if r["level"] == level):
            shares = " ".join(f"{w}:{100 * s:.0f}%" for w, s in r["width_shares"].items())
            print(f"{level:>5g} {r['mode']:>16} {r['offered_rps']:>7.0f} {r['achieved_rps']:>8.0f} "
                  f"{r['attainment']:>6.3f} {_fmt(r['p50_ms'], '.2f'):>7} {_fmt(r['p99_ms'], '.2f'):>8} "
                  f"{_fmt(r['mean_accuracy'], '.2f'):>6} {r['dropped']:>5} {r['errors']:>3}  {shares}")  # fmt: skip


def print_verdicts(verdicts: list[dict], extra: list[dict]) -> None:
    print("\nverdict: adaptive attainment >= the best fixed width's and mean accuracy >= its accuracy")
    print(f"{'level':>5} {'mode':>16} {'best fixed':>10} {'its attain':>10} {'its acc':>7} {'attain':>6} "
          f"{'diff +- se':>14} {'acc':>6} {'goal':>5}")  # fmt: skip
    for v in verdicts + extra:
        diff = f"{v['attainment_diff']:+.3f}+-{v['attainment_diff_se']:.3f}"
        print(f"{v['level']:>5g} {v['mode']:>16} {v['best_fixed']:>10} {v['best_fixed_attainment']:>10.3f} "
              f"{_fmt(v['best_fixed_accuracy'], '.2f'):>7} {v['attainment']:>6.3f} {diff:>14} "
              f"{_fmt(v['accuracy'], '.2f'):>6} {'yes' if v['goal_met'] else 'NO':>5}")  # fmt: skip


if __name__ == "__main__":
    main()
