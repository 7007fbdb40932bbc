"""A small HTTP prediction server around :class:`~slimmable.runtime.SlimmableRunner`, on loopback only.

Why the standard library (``http.server.ThreadingHTTPServer``) rather than FastAPI + uvicorn: the API is three
routes, and the work per request is one CPU-bound forward pass that PyTorch runs with the GIL released, so one
thread per request is the right concurrency model (an async framework would hand each request to a thread pool
anyway). The runner is thread-safe by design, the server adds no dependency (the deployment extra stays
onnx/onnxruntime), and tests can start and stop it in-process in milliseconds. The price is that it is a plain
HTTP/1.1 server without TLS, authentication or HTTP/2: it binds only loopback addresses (127.0.0.0/8, ::1) and
refuses any other, so exposing it takes a reverse proxy that provides those.

Routes:

* ``GET /health`` → ``{"status": "ok"}``
* ``GET /info`` → model, widths, input shape, calibrated latencies, drift, memory
* ``POST /predict`` with either
  - ``Content-Type: application/json``: ``{"tensor": [...] | "image_base64": "...", "width": 0.5 | "budget_ms": 10,
    "top_k": 5}``; the tensor is ``(C, H, W)`` or ``(N, C, H, W)``;
  - ``Content-Type: image/png`` (``image/*``, ``application/octet-stream``): the image bytes as the body, options
    in the query string (``/predict?budget_ms=10``);
  - ``Content-Type: multipart/form-data``: an ``image`` (or ``file``) part and ``width``/``budget_ms``/``top_k``
    fields.

  Answer: ``{"predictions": [{"class_index", "label"?, "top_k": [{"index", "prob", "label"?}]}], "width",
  "budget_ms", "budget_met", "inference_ms", "predicted_ms", "queue_ms", "predicted_queue_ms", "total_ms",
  "batch_size", "forward_batch_size"}``. Neither width nor budget runs the widest width. ``batch_size`` counts the
  request's inputs, ``forward_batch_size`` those of the forward pass that ran them (more where an engine batches
  requests together, as the Ray Serve deployment does: :mod:`slimmable.serve.ray_serve`).

  A budget counts from the request's arrival at the server: the time spent reading and decoding it is passed to
  the runner, whose width policy (load-aware by default, :mod:`slimmable.runtime.policy`) picks the widest width
  whose predicted completion fits, the wait behind the requests ahead included. ``width`` is the width chosen,
  ``predicted_ms``/``inference_ms`` the forward pass predicted and measured, ``predicted_queue_ms``/``queue_ms``
  the wait for a slot predicted and measured, and ``budget_met`` whether the request was done within its budget
  (arrival to the end of inference). When no width fits, the narrowest runs: the request is never refused for load.

  A detector (the runner serves a slimmable R-CNN detector) takes images of any size, sent as they are (the
  detector normalises and resizes them; a JSON tensor holds values in [0, 1]), and answers ``"detections"``
  instead of ``"predictions"``: one list per image of ``{"box": [x1, y1, x2, y2], "label", "label_name"?,
  "score"}``, plus ``"mask"`` as COCO RLE (``{"size": [H, W], "counts": str}``, the mask thresholded at 0.5;
  ``pycocotools.mask.decode`` reads it) for Mask R-CNN, and ``"keypoints"`` ``[[x, y, visible], ...]`` with
  ``"keypoint_scores"`` for Keypoint R-CNN. ``min_score`` (a request field) drops detections scoring below it.

  A segmenter takes ``(N, C, H, W)`` at the calibrated size (an encoded image is resized whole to it, in [0, 1],
  no crop) and answers ``"masks"``: per image ``{"size": [H, W], "classes": [present class indices],
  "class_names"?, "mask"}`` with the class map as ``{"format": "png", "data": base64 8-bit PNG of class indices}``,
  or with ``mask_format=rle`` ``{"format": "rle", "rle": {class: COCO RLE}}``.

  What differs per task (decoding, request fields, the answer) is the model's task's
  (:class:`slimmable.tasks.Task`); the server itself is the same for all.

The Open Inference Protocol (KServe V2, Triton's HTTP API: what ``tritonclient.http`` speaks) is served next to
these routes, under ``/v2`` (:mod:`slimmable.serve.v2`): server and model metadata, health, and ``POST
/v2/models/{name}[/versions/{v}]/infer`` with JSON or binary tensors, a version per width.

Bad requests get a 4xx JSON ``{"error": message, "status": code}`` (V2 routes: ``{"error": message}``); an
unexpected failure a 500. Either way the server keeps serving.

Bounds (see ``docs/reliability.md``): the listen backlog holds a burst of ``backlog`` (256) connections; an idle or
stalled connection is closed after ``request_timeout`` seconds; at most ``max_decodes`` images decode at once, and
the decoded pixels and request-body bytes in flight are capped (image sizes are read from the header before
decoding), a request over a cap getting 503 with ``Retry-After``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import torch

from ..runtime import SlimmableRunner
from ._decode import MAX_IMAGE_PIXELS, BadRequest, Budget, image_pixels
from ._routes import (
    error_reply_for,
    get_route,
    internal_error_reply,
    parse_predict,
    post_route,
    predict_answer,
    predict_request,
    waited_ms,
)
from .v2 import OpenInferenceProtocol, Reply

__all__ = ["BadRequest", "PredictionServer", "check_loopback"]

_logger = logging.getLogger(__name__)


def check_loopback(host: str) -> str:
    """The loopback IP address to bind for ``host``.

    Args:
        host: ``"localhost"``, an address in 127.0.0.0/8, or ``"::1"``.

    Raises:
        ValueError: ``host`` is not a loopback address (the server never binds other addresses).
    """
    if host == "localhost":
        return "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as err:
        raise ValueError(
            f"host {host!r} is not an IP address; use 127.0.0.1 (the server binds only loopback addresses)"
        ) from err
    if not ip.is_loopback:
        raise ValueError(
            f"host {host} is not a loopback address; the server binds only 127.0.0.1 or ::1. To reach it from other "
            "machines, put a reverse proxy with TLS and authentication in front of it"
        )
    return str(ip)


class PredictionServer(ThreadingHTTPServer):
    """Threaded HTTP server answering predictions with a :class:`SlimmableRunner` (one thread per request).

    Use as a context manager (``with PredictionServer(runner) as srv: requests to srv.url``), or call
    :meth:`start` / :meth:`stop`, or ``serve_forever()`` in the foreground.

    Args:
        runner: the calibrated runner.
        host: a loopback address (see :func:`check_loopback`).
        port: TCP port; 0 picks a free one (read it from :attr:`port`).
        labels: class names, indexed by class (optional).
        top_k: default number of classes returned per input.
        max_body_bytes: larger request bodies get 413.
        max_batch: largest batch of a tensor request.
        mean, std: image normalisation (default: ImageNet's).
        resize: short side images are resized to before the center crop (default ``side / 0.875``).
        backlog: listen queue length: connections the kernel holds before they are accepted (a burst beyond it
            gets resets).
        request_timeout: seconds a connection may stay idle or stall mid-request before it is closed; ``None``:
            never (each open connection holds a thread).
        max_decodes: images decoded at once (others wait); ``None``: the CPU count.
        max_pixels_in_flight: decoded pixels held at once over all requests (an image is sized from its header
            before decoding); a request that does not fit gets 503 with ``Retry-After``. ``None``: no bound.
        max_body_bytes_in_flight: request-body bytes held at once; likewise 503 beyond it. ``None``: no bound.
        model_name: the model's name in the V2 routes (``/v2/models/{model_name}``); default: the runner's
            :attr:`~slimmable.runtime.SlimmableRunner.name` (the registry name).

    Raises:
        ValueError: ``host`` is not a loopback address, a bound is not positive, or ``model_name`` cannot be a URL
            path segment.
        OSError: the port is taken.
    """

    # Request threads are joined on close, after their connections are shut down: a daemon thread still inside torch
    # or writing to stdout while the interpreter exits can abort the process (SIGABRT) instead of a clean exit.
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(
        self,
        runner: SlimmableRunner,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        labels: Sequence[str] | None = None,
        top_k: int = 5,
        max_body_bytes: int = 16 << 20,
        max_batch: int = 32,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        resize: int | None = None,
        backlog: int = 256,
        request_timeout: float | None = 30.0,
        max_decodes: int | None = None,
        max_pixels_in_flight: int | None = 2 * MAX_IMAGE_PIXELS,
        max_body_bytes_in_flight: int | None = 256 << 20,
        model_name: str | None = None,
    ) -> None:
        addr = check_loopback(host)
        if backlog < 1 or (max_decodes is not None and max_decodes < 1):
            raise ValueError(f"backlog {backlog!r} and max_decodes {max_decodes!r} must be positive")
        if request_timeout is not None and not request_timeout > 0:
            raise ValueError(f"request_timeout {request_timeout!r} must be positive seconds or None")
        self.request_queue_size = int(backlog)
        self.request_timeout = request_timeout
        self.decode_slots = threading.BoundedSemaphore(max_decodes or os.cpu_count() or 1)
        self.pixel_budget = Budget(max_pixels_in_flight, "decoded pixels")
        self.body_budget = Budget(max_body_bytes_in_flight, "request-body bytes")
        self.address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        self.runner = runner
        self.labels = list(labels) if labels is not None else None
        self.top_k = int(top_k)
        self.max_body_bytes = int(max_body_bytes)
        self.max_batch = int(max_batch)
        self.mean, self.std, self.resize = mean, std, resize
        #: the Open Inference Protocol (V2) routes
        self.v2 = OpenInferenceProtocol(runner, model_name if model_name is not None else runner.name, max_batch)
        self._thread: threading.Thread | None = None
        self._open: set[socket.socket] = set()  # connections being served (shut down on close)
        self._open_lock = threading.Lock()
        super().__init__((addr, int(port)), _Handler)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open.discard(request)

    def server_close(self) -> None:
        """Close the listening socket, end idle keep-alive connections and wait for the request threads."""
        with self._open_lock:
            for conn in list(self._open):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)  # a thread waiting for the next request wakes up and ends
        super().server_close()

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8000``."""
        host = self.server_address[0]
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def start(self) -> PredictionServer:
        """Serve in a background thread; returns ``self``."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self.serve_forever, kwargs={"poll_interval": 0.05}, name="slimmable-serve", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (waits for the serving thread)."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()

    def __enter__(self) -> PredictionServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ request handling (called by _Handler)

    def predict(self, x: Any, params: Mapping[str, Any], t0: float) -> dict[str, Any]:
        """Run ``x`` ``(N, C, H, W)`` (a detector: a list of images, or one ``(C, H, W)``) with the request's
        ``width``/``budget_ms``/``top_k`` (a detector: ``min_score``) and build the answer.

        Raises:
            BadRequest: bad parameters, an unknown width, or a budget below the fastest width.
        """
        request = predict_request(x, params, self.runner.task)
        try:
            result = self.runner.run(
                request.x, width=request.width, budget_ms=request.budget_ms, waited_ms=waited_ms(t0)
            )
        except (ValueError, TypeError) as err:
            raise BadRequest(str(err)) from err
        return predict_answer(self.runner.task, result, request.options, self.labels, self.top_k, t0)

    def decode_image(self, data: bytes) -> torch.Tensor:
        """Decode and preprocess an image within the bounds: its pixels (from the header) are reserved from
        :attr:`pixel_budget` first (:class:`Busy`, 503, when full), then it waits for one of the decode slots.

        Raises:
            BadRequest: not an image, too large (413), or the server is at its pixel bound (503).
        """
        with self.pixel_budget.reserve(image_pixels(data)), self.decode_slots:
            preprocess = {"mean": self.mean, "std": self.std, "resize": self.resize}
            return self.runner.task.decode_image(data, self.runner.input_shape, preprocess)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so load tests and clients can reuse connections
    # Headers and body go out in two writes; with Nagle's algorithm the second waits for the client's delayed ACK
    # (40 ms on Linux), which would dwarf a few-millisecond inference.
    disable_nagle_algorithm = True
    server_version = "slimmable-serve/1"
    server: PredictionServer

    def setup(self) -> None:
        self.timeout = self.server.request_timeout  # socket timeout: idle or stalled connections are closed
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        _logger.debug("%s - %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        srv = self.server
        path = urlsplit(self.path).path
        try:
            reply = get_route(path, srv.runner, srv.v2, srv.labels)
        except Exception as err:  # keep serving whatever happens in one request
            _logger.exception("internal error answering %s", self.path)
            reply = internal_error_reply(err, srv.v2.owns(path))
        self._send_reply(reply)

    def do_POST(self) -> None:
        t0 = time.perf_counter()
        split = urlsplit(self.path)
        v2 = self.server.v2
        is_v2 = v2.owns(split.path)
        try:
            try:
                version = post_route(split.path, v2)
            except BadRequest:
                self.close_connection = True  # the body is not read
                raise
            n = self._body_length()
            try:
                reservation = self.server.body_budget.reserve(n)
            except BadRequest:
                self.close_connection = True  # the body is not read
                raise
            with reservation:
                if is_v2:
                    request = v2.parse(version, self._read_body(n), self.headers)
                else:
                    x, params = self._parse(self._read_body(n), dict(parse_qsl(split.query)))
            if is_v2:
                self._send_reply(v2.infer(request, t0))
            else:
                self._send(200, self.server.predict(x, params, t0))
        except BadRequest as err:
            self._send_reply(error_reply_for(err, is_v2))
        except Exception as err:  # keep serving whatever happens in one request
            _logger.exception("internal error answering %s", self.path)
            self._send_reply(internal_error_reply(err, is_v2))

    def _body_length(self) -> int:
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise BadRequest("send the body with a Content-Length header (chunked bodies are not supported)", 411)
        try:
            n = int(length)
        except ValueError as err:
            self.close_connection = True
            raise BadRequest(f"Content-Length {length!r} is not an integer") from err
        if n < 0:
            self.close_connection = True
            raise BadRequest(f"Content-Length {n} is negative")
        if n > self.server.max_body_bytes:
            self.close_connection = True
            raise BadRequest(f"the body has {n} bytes, more than the {self.server.max_body_bytes} allowed", 413)
        return n

    def _read_body(self, n: int) -> bytes:
        try:
            body = self.rfile.read(n)
        except TimeoutError as err:
            self.close_connection = True
            raise BadRequest(f"the body did not arrive within {self.server.request_timeout} s", 408) from err
        if len(body) != n:
            self.close_connection = True
            raise BadRequest(f"the body ended after {len(body)} of {n} bytes")
        return body

    def _parse(self, body: bytes, query: dict[str, str]) -> tuple[Any, dict[str, Any]]:
        srv = self.server
        return parse_predict(
            body,
            self.headers.get("Content-Type", ""),
            query,
            task=srv.runner.task,
            input_shape=srv.runner.input_shape,
            max_batch=srv.max_batch,
            decode_image=srv.decode_image,
        )

    def _send(self, status: int, payload: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> None:
        self._send_bytes(status, json.dumps(payload).encode(), {**(headers or {}), "Content-Type": "application/json"})

    def _send_reply(self, reply: Reply) -> None:
        self._send_bytes(reply.status, reply.body, reply.headers)

    def _send_bytes(self, status: int, data: bytes, headers: Mapping[str, str]) -> None:
        """Send ``data`` with ``headers`` (``Content-Type`` among them) and its ``Content-Length``."""
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
