"""``slimmable serve``: an HTTP prediction server on loopback that switches width per request or latency budget, on
this process (``--engine builtin``) or on Ray Serve replicas across a Ray cluster (``--engine ray``)."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import LoadedModel
from ..export import default_widths
from ..runtime import SlimmableRunner, retain_freed_memory
from ..serve import PredictionServer, check_loopback
from ..tasks import task_of
from ._common import format_table, non_negative_float, parse_widths, positive_float, positive_int
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
        "version 50 runs width 0.5), or parameters width / latency_budget_ms. --engine ray serves the same API from "
        "Ray Serve replicas (pip install 'slimmable[ray]'), on a local Ray or a cluster's machines.",
    )
    add_model_args(p)
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="builtin",
        help="builtin (default): this process, one thread per request; ray: a Ray Serve deployment of --replicas "
        "replicas, each with every width, requests batched per width (pip install 'slimmable[ray]')",
    )
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
    p.add_argument(
        "--batch-sizes",
        help="batch sizes to calibrate latency for (default 1; --engine ray: 1 and --ray-max-batch)",
    )
    p.add_argument(
        "--calibration-seconds", type=positive_float, default=5.0, help="calibration time budget (default 5)"
    )
    p.add_argument("--latency-cache", default=_default_cache(), help="latency cache file ('none' disables)")
    p.add_argument("--no-fold-bn", action="store_true", help="keep BatchNorm layers (default: folded)")
    p.add_argument(
        "--max-concurrency",
        type=int,
        help="at most N forward passes at once, others queue (default 1: on CPU one pass already uses every "
        "intra-op thread, and overlapping passes oversubscribe the cores and break the calibrated latencies; 0: "
        "no limit). --engine builtin only: a Ray replica runs one batch at a time",
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
        metavar="S",
        help="close a connection idle or stalled mid-request for S seconds (default 30; --engine builtin only)",
    )
    p.add_argument("--labels", metavar="FILE", help="class names, one per line")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument(
        "--retain-freed-memory",
        action="store_true",
        help="glibc keeps freed memory for reuse instead of faulting fresh pages in on every request (faster CPU "
        "inference; the process keeps its peak memory). See slimmable.runtime.retain_freed_memory",
    )
    g = p.add_argument_group("Ray Serve (--engine ray)")
    g.add_argument(
        "--replicas", type=positive_int, help="replicas, placed by Ray on the cluster's machines (default 1)"
    )
    g.add_argument(
        "--replica-cpus", type=positive_float, help="CPUs Ray reserves per replica (default 1; fractions allowed)"
    )
    g.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="the Ray cluster to deploy on: auto (this machine's node), HOST:6379 (default: $RAY_ADDRESS when set, "
        "else a local Ray started for this command and stopped with it)",
    )
    g.add_argument("--ray-max-batch", type=positive_int, help="at most N requests per batch of a replica (default 8)")
    g.add_argument(
        "--ray-batch-wait-ms",
        type=non_negative_float,
        help="how long a replica's batch waits for more requests before it runs (default 5)",
    )
    p.set_defaults(func=run)


#: the server engines of ``--engine``
ENGINES = ("builtin", "ray")
#: the options of each engine alone, with their defaults
_BUILTIN_DEFAULTS = {"max_concurrency": 1, "request_timeout": 30.0}
_RAY_DEFAULTS = {"replicas": 1, "replica_cpus": 1.0, "ray_address": None, "ray_max_batch": 8, "ray_batch_wait_ms": 5.0}


def _engine_defaults(args: argparse.Namespace) -> None:
    """Refuse the other engine's options, then fill in this engine's defaults."""
    own, other = (_RAY_DEFAULTS, _BUILTIN_DEFAULTS) if args.engine == "ray" else (_BUILTIN_DEFAULTS, _RAY_DEFAULTS)
    given = [f"--{k.replace('_', '-')}" for k in other if getattr(args, k) is not None]
    if given:
        them = "it" if len(given) == 1 else "them"
        engine = "builtin" if args.engine == "ray" else "ray"
        raise ValueError(f"{', '.join(given)}: for --engine {engine} only; drop {them} (or pass --engine {engine})")
    for key, value in own.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def _check_args(args: argparse.Namespace, host: str) -> None:
    """Refuse bad numbers, the other engine's options and a taken port now, before the model is loaded and
    calibrated."""
    _engine_defaults(args)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not a TCP port; give 1-65535, or 0 to pick a free one")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads} must be >= 1 (or leave it out for torch's default)")
    if args.engine == "builtin" and args.max_concurrency < 0:
        raise ValueError(f"--max-concurrency {args.max_concurrency} must be >= 1, or 0 for no limit")
    if args.engine == "builtin" and not args.request_timeout > 0:
        raise ValueError(f"--request-timeout {args.request_timeout} must be a positive number of seconds")
    if args.name is not None and (not args.name or "/" in args.name or args.name != args.name.strip()):
        raise ValueError(f"--name {args.name!r} must be a non-empty name without '/' or surrounding spaces")
    if args.engine == "ray" and args.port == 0:
        raise ValueError("--port 0 does not apply to --engine ray: Ray Serve's proxies listen on one port; give one")
    if args.port == 0 or (args.engine == "ray" and _ray_address(args) is not None):
        return  # a free port, or one on the cluster's nodes (Serve may already listen there)
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


def _ray_address(args: argparse.Namespace) -> str | None:
    return args.ray_address or os.environ.get("RAY_ADDRESS") or None


def run(args: argparse.Namespace) -> int:
    host = check_loopback(args.host)
    _check_args(args, host)
    if args.engine == "ray":
        from ..serve import ray_serve

        try:  # before loading anything: name the pip command
            ray_serve.require_ray()
        except ImportError as err:
            raise ValueError(str(err)) from err
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.retain_freed_memory and args.engine == "builtin":
        applied = retain_freed_memory()
        print("allocator: " + ("freed memory is retained" if applied else "not glibc, --retain-freed-memory ignored"))
    loaded = _load_model(args)
    pre = loaded.preprocess or {}
    size = args.input_size or pre.get("image_size") or (32 if args.small_input else 224)
    if task_of(loaded.model).resizes_inputs:  # calibrated at the side it resizes to, unless --input-size says
        size = args.input_size
    batch_sizes = None
    if args.batch_sizes is not None:
        try:
            batch_sizes = tuple(int(b) for b in args.batch_sizes.split(",") if b.strip())
        except ValueError as err:
            raise ValueError(f"--batch-sizes {args.batch_sizes!r}: give comma-separated ints such as 1,8") from err
    labels = None
    if args.labels:
        labels = [line.strip() for line in Path(args.labels).read_text().splitlines() if line.strip()]
    print(describe_source(loaded))
    runner_kwargs = {
        "widths": parse_widths(args.serve_widths) or default_widths(loaded.model),
        "input_size": size,
        "fold_bn": not args.no_fold_bn,
        "calibration_s": args.calibration_seconds,
        "cache_path": None if args.latency_cache.lower() == "none" else args.latency_cache,
        "name": loaded.name,
        "policy": args.width_policy,
    }
    if batch_sizes is not None:
        runner_kwargs["batch_sizes"] = batch_sizes
    if args.engine == "ray":
        return _run_ray(args, host, loaded, runner_kwargs, labels, pre)
    return _run_builtin(args, host, loaded, runner_kwargs, labels, pre)


def _run_builtin(
    args: argparse.Namespace,
    host: str,
    loaded: LoadedModel,
    runner_kwargs: dict[str, Any],
    labels: list[str] | None,
    pre: dict[str, Any],
) -> int:
    runner = SlimmableRunner(loaded.model, **runner_kwargs, max_concurrency=args.max_concurrency or None)
    src = "cache " + str(runner.cache_path) if runner.calibrated_from_cache else "measured"
    print(f"calibrated latency ({src}, {runner.calibration_seconds:.2f} s, {torch.get_num_threads()} threads):")
    print(_latency_table(runner.info()))
    mem = runner.memory_bytes()
    print(
        f"memory: {mem['dense_total'] / 1e6:.1f} MB of dense copies vs "
        f"{mem['source_weight_set'] / 1e6:.1f} MB in the slimmable weight set"
    )
    server = PredictionServer(
        runner, host, args.port, labels=labels, mean=pre.get("mean"), std=pre.get("std"), resize=pre.get("eval_resize"),
        request_timeout=args.request_timeout, max_decodes=args.max_concurrency or None, model_name=args.name,
    )  # fmt: skip
    with _stopped_by_signals():  # a Ctrl-C right after the line below still stops cleanly
        try:
            routes = f"POST /predict, GET /info, GET /health; V2 protocol as model {server.v2.name!r} under /v2"
            print(f"serving {loaded.name} at {server.url} ({routes}); Ctrl-C stops", flush=True)
            server.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:
            print("stopping")
        finally:
            server.server_close()
    return 0


def _run_ray(
    args: argparse.Namespace,
    host: str,
    loaded: LoadedModel,
    runner_kwargs: dict[str, Any],
    labels: list[str] | None,
    pre: dict[str, Any],
) -> int:
    from ..serve import ray_serve
    from ..serve.v2 import OpenInferenceProtocol

    options = ray_serve.RayServeOptions(
        replicas=args.replicas,
        replica_cpus=args.replica_cpus,
        threads=args.threads,
        max_batch_size=args.ray_max_batch,
        batch_wait_ms=args.ray_batch_wait_ms,
        runner=runner_kwargs,
        labels=labels,
        preprocess={"mean": pre.get("mean"), "std": pre.get("std"), "resize": pre.get("eval_resize")},
        model_name=args.name,
        retain_freed_memory=args.retain_freed_memory,
    )
    # Widths, input size and V2 name are checked here, in one line, rather than in every replica's start-up.
    probe = SlimmableRunner(loaded.model, **options.runner_kwargs(), calibrate=False)
    name = OpenInferenceProtocol(probe, args.name or probe.name, options.max_batch).name
    mem = probe.memory_bytes()
    del probe
    address = _ray_address(args)
    where = f"the Ray cluster at {address}" if address else "a local Ray"
    print(
        f"deploying {args.replicas} replica(s) of {loaded.name} on {where}: widths {list(runner_kwargs['widths'])}, "
        f"{mem['dense_total'] / 1e6:.1f} MB of dense copies per replica; each replica calibrates its latencies",
        flush=True,
    )
    app = ray_serve.build_app(loaded.model, options)
    with _stopped_by_signals():
        try:
            cpus = args.replicas * args.replica_cpus
            url, handle = ray_serve.start(app, host=host, port=args.port, address=address, num_cpus=cpus)
            signal.signal(signal.SIGTERM, signal.default_int_handler)  # again: ray.init installs a handler of its own
            info = handle.info.remote().result()
            print(f"calibrated latency of one replica ({info['host']}, pid {info['pid']}):")
            print(_latency_table(info))
            routes = f"POST /predict, GET /info, GET /health; V2 protocol as model {name!r} under /v2"
            print(f"serving {loaded.name} at {url} on Ray Serve ({routes}); Ctrl-C stops", flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping", flush=True)
        finally:
            ray_serve.stop(local=address is None)
    return 0


def _latency_table(info: dict[str, Any]) -> str:
    """The calibrated latency per width and batch size of a runner's :meth:`~SlimmableRunner.info`."""
    tables = info["calibrated_latency_ms"]
    rows = [(f"{w:g}", *(f"{tables[b][f'{w:g}']:.3f}" for b in tables)) for w in info["widths"]]
    return format_table(["width", *(f"batch {b} (ms)" for b in tables)], rows)


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """SIGTERM stops the server as Ctrl-C does, within the block."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # inherited: shells start background jobs that way
        print(f"SIGINT is ignored in this process (started in the background?): stop it with kill {os.getpid()}")
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
