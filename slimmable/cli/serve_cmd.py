"""``slimmable serve``: an HTTP prediction server on loopback that switches width per request or latency budget."""

from __future__ import annotations

import argparse
import os
import signal
import socket
from pathlib import Path

import torch

from ..export import default_widths
from ..runtime import SlimmableRunner, retain_freed_memory
from ..serve import PredictionServer, check_loopback
from ..tasks import task_of
from ._common import format_table, parse_widths, positive_float, positive_int
from ._deploy import _load_model, add_model_args, describe_source


def _default_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "slimmable" / "latency.json")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="HTTP server on 127.0.0.1: predictions at a width or within a latency budget",
        description="Serve predictions over HTTP on a loopback address. POST /predict takes an image (raw bytes, "
        "multipart, or base64 in JSON) or a JSON tensor, plus width=W or budget_ms=B; the answer carries the top-k "
        "classes (a detector: boxes, labels, scores, masks as COCO RLE, keypoints), the width used and the time "
        "taken. GET /info shows the calibrated latency per width. The Open Inference Protocol (KServe V2, Triton's "
        "HTTP API, e.g. tritonclient.http) is served under /v2: one model version per width (the width x 100: "
        "version 50 runs width 0.5), or parameters width / latency_budget_ms.",
    )
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="loopback address to bind (127.0.0.1 or ::1; no others)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument(
        "--name",
        help="the model's name in the V2 routes, /v2/models/NAME (default: its registered name, e.g. "
        "slim_mobilenet_v2)",
    )
    p.add_argument("--serve-widths", help="comma-separated widths to serve (default: all, at most 8 for US models)")
    p.add_argument(
        "--input-size", type=positive_int, help="input side (default: checkpoint's, else 224; 32 with --small-input)"
    )
    p.add_argument("--batch-sizes", default="1", help="batch sizes to calibrate latency for (default 1)")
    p.add_argument(
        "--calibration-seconds", type=positive_float, default=5.0, help="calibration time budget (default 5)"
    )
    p.add_argument("--latency-cache", default=_default_cache(), help="latency cache file ('none' disables)")
    p.add_argument("--no-fold-bn", action="store_true", help="keep BatchNorm layers (default: folded)")
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=1,
        help="at most N forward passes at once, others queue (default 1: on CPU one pass already uses every "
        "intra-op thread, and overlapping passes oversubscribe the cores and break the calibrated latencies; 0: "
        "no limit)",
    )
    p.add_argument(
        "--width-policy",
        choices=("load_aware", "static"),
        default="load_aware",
        help="how a budget picks the width: load_aware (default) runs the widest width whose predicted completion, "
        "the wait behind the requests ahead included, fits the budget counted from arrival; static the widest whose "
        "own calibrated latency fits, whatever the queue",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="close a connection idle or stalled mid-request for S seconds (default 30)",
    )
    p.add_argument("--labels", metavar="FILE", help="class names, one per line")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument(
        "--retain-freed-memory",
        action="store_true",
        help="glibc keeps freed memory for reuse instead of faulting fresh pages in on every request (faster CPU "
        "inference; the process keeps its peak memory). See slimmable.runtime.retain_freed_memory",
    )
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace, host: str) -> None:
    """Refuse bad numbers and a taken port now, before the model is loaded and calibrated."""
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not a TCP port; give 1-65535, or 0 to pick a free one")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads} must be >= 1 (or leave it out for torch's default)")
    if args.max_concurrency < 0:
        raise ValueError(f"--max-concurrency {args.max_concurrency} must be >= 1, or 0 for no limit")
    if not args.request_timeout > 0:
        raise ValueError(f"--request-timeout {args.request_timeout} must be a positive number of seconds")
    if args.name is not None and (not args.name or "/" in args.name or args.name != args.name.strip()):
        raise ValueError(f"--name {args.name!r} must be a non-empty name without '/' or surrounding spaces")
    if args.port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind((host, args.port))
        except OSError as err:
            raise ValueError(
                f"cannot listen on {host}:{args.port}: {err.strerror}; pick another --port (0 picks a free one), or "
                "stop the process using it"
            ) from err


def run(args: argparse.Namespace) -> int:
    host = check_loopback(args.host)
    _check_args(args, host)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.retain_freed_memory:
        applied = retain_freed_memory()
        print("allocator: " + ("freed memory is retained" if applied else "not glibc, --retain-freed-memory ignored"))
    loaded = _load_model(args)
    pre = loaded.preprocess or {}
    size = args.input_size or pre.get("image_size") or (32 if args.small_input else 224)
    if task_of(loaded.model).resizes_inputs:  # calibrated at the side it resizes to, unless --input-size says
        size = args.input_size
    try:
        batch_sizes = tuple(int(b) for b in args.batch_sizes.split(",") if b.strip())
    except ValueError as err:
        raise ValueError(f"--batch-sizes {args.batch_sizes!r}: give comma-separated ints such as 1,8") from err
    labels = None
    if args.labels:
        labels = [line.strip() for line in Path(args.labels).read_text().splitlines() if line.strip()]
    print(describe_source(loaded))
    runner = SlimmableRunner(
        loaded.model,
        parse_widths(args.serve_widths) or default_widths(loaded.model),
        input_size=size,
        batch_sizes=batch_sizes,
        fold_bn=not args.no_fold_bn,
        calibration_s=args.calibration_seconds,
        cache_path=None if args.latency_cache.lower() == "none" else args.latency_cache,
        name=loaded.name,
        max_concurrency=args.max_concurrency or None,
        policy=args.width_policy,
    )
    src = "cache " + str(runner.cache_path) if runner.calibrated_from_cache else "measured"
    print(f"calibrated latency ({src}, {runner.calibration_seconds:.2f} s, {torch.get_num_threads()} threads):")
    rows = [(f"{w:g}", *(f"{runner.base_latency(w, b):.3f}" for b in batch_sizes)) for w in runner.widths]
    print(format_table(["width", *(f"batch {b} (ms)" for b in batch_sizes)], rows))
    mem = runner.memory_bytes()
    print(
        f"memory: {mem['dense_total'] / 1e6:.1f} MB of dense copies vs "
        f"{mem['source_weight_set'] / 1e6:.1f} MB in the slimmable weight set"
    )
    server = PredictionServer(
        runner, host, args.port, labels=labels, mean=pre.get("mean"), std=pre.get("std"), resize=pre.get("eval_resize"),
        request_timeout=args.request_timeout, max_decodes=args.max_concurrency or None, model_name=args.name,
    )  # fmt: skip
    # SIGTERM stops the server like Ctrl-C does.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # inherited: shells start background jobs that way
        print(f"SIGINT is ignored in this process (started in the background?): stop it with kill {os.getpid()}")
    try:  # a Ctrl-C right after the line below still stops cleanly
        routes = f"POST /predict, GET /info, GET /health; V2 protocol as model {server.v2.name!r} under /v2"
        print(f"serving {loaded.name} at {server.url} ({routes}); Ctrl-C stops", flush=True)
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        print("stopping")
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()
    return 0
