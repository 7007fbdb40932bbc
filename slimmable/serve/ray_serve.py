"""Ray Serve engine: the same HTTP API as :class:`~slimmable.serve.PredictionServer`, on replicas a Ray cluster
places on any of its machines (``slimmable serve --engine ray``; ``pip install 'slimmable[ray]'``).

Design. One Ray Serve deployment, multiplexed by width: every replica holds a
:class:`~slimmable.runtime.SlimmableRunner` with the dense copy of every width (together about one weight set more
than the widest alone, see :meth:`~slimmable.runtime.SlimmableRunner.memory_bytes`), so any replica answers any
width and Ray's router spreads requests over replicas by their queue lengths alone. A request with a budget gets
its width where it runs: the replica's load-aware policy (:mod:`slimmable.runtime.policy`) picks the widest width
whose predicted completion, the replica's queue included, fits the budget counted from the request's arrival at
the replica. A replica set per width would instead need the router to pick a budgeted request's width without
knowing the queue that request will wait in.

Batching. A replica decodes a request, admits it to the runner's policy at once (so the requests after it see it
in the queue), then hands it to ``@serve.batch``, which collects the replica's requests for up to
``batch_wait_ms`` (or ``max_batch_size`` requests) while the previous batch runs, and runs a batch with one forward
pass per width (:meth:`~slimmable.runtime.SlimmableRunner.run_admitted`). Answers report the pass's
``forward_batch_size``. The runner calibrates the batch sizes 1 and ``max_batch_size`` (other sizes are
interpolated), so batched passes neither look like drift nor mislead the policy.

Routes: those of the stdlib server (``GET /health``, ``/info``, ``/``; ``POST /predict``; the Open Inference
Protocol under ``/v2``), answered by the same functions (:mod:`slimmable.serve._routes`,
:class:`~slimmable.serve.v2.OpenInferenceProtocol`), so the same clients work. ``/info`` is the answering
replica's, with its ``host`` and ``pid``.

Each replica calibrates its own latencies on its own machine (a cluster's machines may differ). The model goes to
the replicas with the deployment, not as a path, so nodes need slimmable installed but not the checkpoint file.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..runtime import AdmittedRequest, RunResult, SlimmableRunner, retain_freed_memory
from ._decode import BadRequest
from ._routes import (
    error_reply_for,
    get_route,
    info_answer,
    internal_error_reply,
    json_reply,
    parse_predict,
    post_route,
    predict_answer,
    predict_request,
    waited_ms,
)
from .v2 import OpenInferenceProtocol, Reply

__all__ = ["RAY_PIP", "RayServeOptions", "SlimmableDeployment", "build_app", "require_ray", "start", "stop"]

_logger = logging.getLogger(__name__)

#: how to install what this engine needs
RAY_PIP = "pip install 'slimmable[ray]'"
#: the oldest Ray whose Serve API this module uses (``max_ongoing_requests`` is from 2.10)
MIN_RAY = (2, 10)


def require_ray() -> None:
    """Check that Ray Serve is importable and recent enough.

    Raises:
        ImportError: ray (or its serve part) is missing or older than 2.10; the message names the pip command.
    """
    try:
        import ray
        from ray import serve  # noqa: F401
    except ImportError as err:
        raise ImportError(f"--engine ray needs Ray Serve, which is not installed: {RAY_PIP}") from err
    version = tuple(int(p) for p in ray.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_RAY:
        raise ImportError(
            f"--engine ray needs Ray Serve >= {'.'.join(map(str, MIN_RAY))}, found ray {ray.__version__}: "
            f"pip install -U {RAY_PIP.split(' ', 2)[2]}"
        )


@dataclass(frozen=True)
class RayServeOptions:
    """How the deployment runs: replicas, their resources, batching, and what each replica's server answers.

    Attributes:
        replicas: replicas to run (Ray places them on the cluster's machines).
        replica_cpus: CPUs Ray reserves for each replica (fractions allowed).
        threads: torch intra-op threads per replica (``None``: Ray's default, the replica's CPUs).
        max_batch_size: at most this many requests run in one batch.
        batch_wait_ms: how long a batch waits for more requests before it runs.
        max_ongoing_requests: requests a replica holds at once, waiting or running (Ray's router sends no more;
            ``None``: twice ``max_batch_size``, so that a batch forms while the previous one runs).
        runner: keyword arguments of each replica's :class:`~slimmable.runtime.SlimmableRunner` (widths,
            input_size, calibration_s, cache_path, name, policy, ...).
        labels: class names, indexed by class.
        top_k: default number of classes answered per input.
        max_body_bytes: larger request bodies get 413.
        max_batch: the largest batch of inputs in one request.
        preprocess: image normalisation: ``mean``, ``std``, ``resize`` (``None`` values: ImageNet's, side/0.875).
        model_name: the model's name in the V2 routes (default: the runner's).
        retain_freed_memory: each replica calls :func:`slimmable.runtime.retain_freed_memory` first.
    """

    replicas: int = 1
    replica_cpus: float = 1.0
    threads: int | None = None
    max_batch_size: int = 8
    batch_wait_ms: float = 5.0
    max_ongoing_requests: int | None = None
    runner: Mapping[str, Any] = field(default_factory=dict)
    labels: Sequence[str] | None = None
    top_k: int = 5
    max_body_bytes: int = 16 << 20
    max_batch: int = 32
    preprocess: Mapping[str, Any] = field(default_factory=dict)
    model_name: str | None = None
    retain_freed_memory: bool = False

    def __post_init__(self) -> None:
        checks = {
            "replicas": _is_int(self.replicas, 1),
            "replica_cpus": _is_number(self.replica_cpus) and self.replica_cpus > 0,
            "threads": self.threads is None or _is_int(self.threads, 1),
            "max_batch_size": _is_int(self.max_batch_size, 1),
            "batch_wait_ms": _is_number(self.batch_wait_ms) and self.batch_wait_ms >= 0,
            "max_ongoing_requests": self.max_ongoing_requests is None or _is_int(self.max_ongoing_requests, 1),
            "max_batch": _is_int(self.max_batch, 1),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ValueError(
                f"Ray Serve options {values}: replicas, threads, max_batch_size, max_ongoing_requests and max_batch "
                "must be positive ints, replica_cpus a positive number, batch_wait_ms zero or more"
            )

    @property
    def ongoing_requests(self) -> int:
        """:attr:`max_ongoing_requests`, its default resolved."""
        return self.max_ongoing_requests or 2 * self.max_batch_size

    def runner_kwargs(self) -> dict[str, Any]:
        """The replicas' runner arguments: :attr:`runner`, with batch sizes 1 and :attr:`max_batch_size` calibrated
        unless it names its own, and one forward pass at a time (a replica runs one batch at a time)."""
        kwargs = dict(self.runner)
        kwargs.setdefault("batch_sizes", sorted({1, self.max_batch_size}))
        kwargs["max_concurrency"] = 1
        return kwargs


class SlimmableDeployment:
    """One replica: a calibrated runner answering the HTTP API, requests batched per width.

    Ray Serve builds it (:func:`build_app` makes it a deployment); it is a plain class otherwise.

    Args:
        model: the slimmable model (each replica gets its own copy).
        options: see :class:`RayServeOptions`.
    """

    def __init__(self, model: nn.Module, options: RayServeOptions) -> None:
        from ray import serve

        if options.retain_freed_memory:
            retain_freed_memory()
        if options.threads:
            torch.set_num_threads(options.threads)
        self.options = options
        self.runner = SlimmableRunner(model, **options.runner_kwargs())
        name = options.model_name if options.model_name is not None else self.runner.name
        self.v2 = OpenInferenceProtocol(self.runner, name, options.max_batch)
        self.labels = list(options.labels) if options.labels is not None else None
        self._preprocess = {k: options.preprocess.get(k) for k in ("mean", "std", "resize")}
        # a batch waits for requests while the one before runs: one batch at a time, as the runner's one slot
        self._batched = serve.batch(
            max_batch_size=options.max_batch_size, batch_wait_timeout_s=options.batch_wait_ms / 1e3
        )(self._run_batch)

    def info(self) -> dict[str, Any]:
        """The runner's summary (``GET /info``) with the replica's ``host`` and ``pid`` and the batching options."""
        return info_answer(self.runner, self.labels, self._replica_info())

    def _replica_info(self) -> dict[str, Any]:
        batching = {"max_batch_size": self.options.max_batch_size, "batch_wait_ms": self.options.batch_wait_ms}
        return {"engine": "ray", "host": socket.gethostname(), "pid": os.getpid(), "batching": batching}

    async def __call__(self, request: Any) -> Any:
        """Answer one HTTP request (a ``starlette.requests.Request``) with a ``starlette.responses.Response``."""
        from starlette.responses import Response

        t0 = time.perf_counter()
        path = request.url.path
        is_v2 = self.v2.owns(path)
        try:
            if request.method == "GET":
                reply = get_route(path, self.runner, self.v2, self.labels, self._replica_info())
            elif request.method == "POST":
                reply = await self._post(request, path, t0)
            else:
                raise BadRequest(f"method {request.method} is not served; use GET or POST", 405)
        except BadRequest as err:
            reply = error_reply_for(err, is_v2)
        except Exception as err:  # keep serving whatever happens in one request
            _logger.exception("internal error answering %s %s", request.method, path)
            reply = internal_error_reply(err, is_v2)
        return Response(reply.body, status_code=reply.status, headers=dict(reply.headers))

    async def _post(self, request: Any, path: str, t0: float) -> Reply:
        version = post_route(path, self.v2)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit():
            self._check_size(int(length))  # refused before the body is read
        body = await request.body()
        self._check_size(len(body))
        if self.v2.owns(path):
            parsed = await asyncio.to_thread(self.v2.parse, version, body, request.headers)
            result = await self._run(parsed.x, parsed.width, parsed.budget_ms, t0)
            return await asyncio.to_thread(self.v2.reply, parsed, result, t0)
        runner = self.runner
        x, params = await asyncio.to_thread(
            parse_predict,
            body,
            request.headers.get("content-type", ""),
            dict(request.query_params),
            task=runner.task,
            input_shape=runner.input_shape,
            max_batch=self.options.max_batch,
            decode_image=self._decode_image,
        )
        asked = predict_request(x, params, runner.task)
        result = await self._run(asked.x, asked.width, asked.budget_ms, t0)
        answer = await asyncio.to_thread(
            predict_answer, runner.task, result, asked.options, self.labels, self.options.top_k, t0
        )
        return json_reply(200, answer)

    def _check_size(self, size: int) -> None:
        if size > self.options.max_body_bytes:
            raise BadRequest(f"the body has {size} bytes, more than the {self.options.max_body_bytes} allowed", 413)

    def _decode_image(self, data: bytes) -> torch.Tensor:
        return self.runner.task.decode_image(data, self.runner.input_shape, self._preprocess)

    async def _run(self, x: Any, width: float | None, budget_ms: float | None, t0: float) -> RunResult:
        """Admit a request now (its width is chosen as it arrives) and run it in the next batch."""
        try:
            admitted = self.runner.admit(x, width=width, budget_ms=budget_ms, waited_ms=waited_ms(t0))
        except (ValueError, TypeError) as err:
            raise BadRequest(str(err)) from err
        try:
            return await self._batched(admitted)
        finally:
            self.runner.discard(admitted)  # a no-op once it ran; a cancelled request leaves the queue

    async def _run_batch(self, batch: list[AdmittedRequest]) -> list[RunResult]:
        # in a thread: the event loop goes on taking requests, which form the next batch meanwhile
        return await asyncio.to_thread(self.runner.run_admitted, batch)


def build_app(model: nn.Module, options: RayServeOptions, *, name: str = "slimmable") -> Any:
    """The Ray Serve application: :class:`SlimmableDeployment` with ``options``' replicas and resources.

    Args:
        model: the slimmable model (sent to every replica with the deployment).
        options: see :class:`RayServeOptions`.
        name: the deployment's name.

    Returns:
        A ``ray.serve.Application`` for :func:`start` (or ``serve.run``).

    Raises:
        ImportError: Ray Serve is not installed.
    """
    require_ray()
    from ray import serve

    deployment = serve.deployment(
        SlimmableDeployment,
        name=name,
        num_replicas=options.replicas,
        ray_actor_options={"num_cpus": options.replica_cpus},
        max_ongoing_requests=options.ongoing_requests,
    )
    return deployment.bind(model, options)


def start(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    num_cpus: float | None = None,
    name: str = "slimmable",
) -> tuple[str, Any]:
    """Connect to a Ray cluster (or start a local one), start Serve's HTTP proxies on ``host:port`` and deploy
    ``app``; returns when every replica is ready (built and calibrated).

    Args:
        app: from :func:`build_app`.
        host, port: where Serve's HTTP proxies listen (cluster-wide; kept if Serve already runs there).
        address: the cluster (``"auto"``, ``"HOST:6379"``, ``"ray://HOST:10001"``); ``None``: ``RAY_ADDRESS``
            when set, else a new local Ray of ``num_cpus`` CPUs.
        num_cpus: CPUs of a new local Ray (``None``: the machine's).
        name: the Serve application's name.

    Returns:
        ``(url, handle)``: the proxy's URL on this machine, and the application's ``DeploymentHandle``.

    Raises:
        ImportError: Ray Serve is not installed.
        ConnectionError: no Ray cluster answers at ``address``.
    """
    require_ray()
    import ray
    from ray import serve

    address = address or os.environ.get("RAY_ADDRESS") or None
    if not ray.is_initialized():
        if address is None:
            cpus = None if num_cpus is None else max(1, math.ceil(num_cpus))
            # "local": a new Ray of its own, never a cluster another command started on this machine
            ray.init(address="local", num_cpus=cpus, include_dashboard=False)
        else:
            ray.init(address=address)
    serve.start(http_options={"host": host, "port": int(port)})
    handle = serve.run(app, name=name, route_prefix="/")
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    return url, handle


def stop(name: str = "slimmable", *, local: bool) -> None:
    """Take the application down: on a local Ray started by :func:`start`, Serve and Ray too; on a cluster, only
    the application (Serve and the cluster's other applications keep running), then disconnect. Nothing to do
    when Ray was not started."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    if local:
        serve.shutdown()
    else:
        serve.delete(name)
    ray.shutdown()


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
