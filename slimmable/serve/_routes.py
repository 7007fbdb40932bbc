"""The HTTP API's routes without an HTTP server: ``GET`` answers, ``POST /predict`` (a body to the model's input and
options, a run's result to the JSON answer) and error replies. The stdlib server (:mod:`slimmable.serve.server`)
and the Ray Serve deployment (:mod:`slimmable.serve.ray_serve`) both call these, so the API behaves the same on
either engine; the V2 routes are :class:`slimmable.serve.v2.OpenInferenceProtocol`'s."""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email import policy
from email.message import Message
from email.parser import BytesParser
from typing import TYPE_CHECKING, Any

import torch

from ..runtime import RunResult, SlimmableRunner
from ..tasks import Task
from ._decode import MAX_IMAGE_PIXELS, BadRequest, number_param

if TYPE_CHECKING:  # v2 imports this module
    from .v2 import OpenInferenceProtocol, Reply

__all__ = [
    "ROUTES",
    "PredictRequest",
    "error_reply_for",
    "get_route",
    "info_answer",
    "internal_error_reply",
    "json_reply",
    "parse_predict",
    "post_route",
    "predict_answer",
    "predict_request",
    "waited_ms",
]

#: the Open Inference Protocol (V2) routes, as ``GET /`` lists them
V2_ROUTES = (
    "GET /v2",
    "GET /v2/health/live",
    "GET /v2/health/ready",
    "GET /v2/models/{name}[/versions/{version}][/ready]",
    "POST /v2/models/{name}[/versions/{version}]/infer",
)
#: every route, as ``GET /`` lists them
ROUTES = ("GET /health", "GET /info", "POST /predict", *V2_ROUTES)


def get_route(
    path: str,
    runner: SlimmableRunner,
    v2: OpenInferenceProtocol,
    labels: Sequence[str] | None,
    info: Mapping[str, Any] | None = None,
) -> Reply:
    """The answer to ``GET path``: ``/health``, ``/info`` (the runner's, the number of labels, and ``info``),
    ``/`` (the routes), a V2 route, or a 404 naming the routes."""
    if v2.owns(path):
        return v2.get(path)
    if path == "/health":
        return json_reply(200, {"status": "ok"})
    if path == "/info":
        return json_reply(200, info_answer(runner, labels, info))
    if path == "/":
        return json_reply(200, {"routes": list(ROUTES)})
    return json_reply(404, {"error": f"no route GET {path}; routes: GET /health, GET /info, POST /predict, GET /v2"})


def info_answer(
    runner: SlimmableRunner, labels: Sequence[str] | None, info: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``GET /info``: the runner's summary (:meth:`~slimmable.runtime.SlimmableRunner.info`), the number of
    labels, and what the engine adds (``info``)."""
    answer = runner.info()
    answer["labels"] = len(labels) if labels is not None else None
    return {**answer, **(info or {})}


def post_route(path: str, v2: OpenInferenceProtocol) -> str | None:
    """The V2 version that ``POST path`` infers with (``None``: the request's parameters choose, or ``/predict``).

    Raises:
        BadRequest: 404 for a path that is neither ``/predict`` nor a V2 ``infer`` route of the model.
    """
    if v2.owns(path):
        return v2.infer_version(path)
    if path != "/predict":
        raise BadRequest(f"no route POST {path}; use POST /predict (or the V2 routes under /v2)", 404)
    return None


def error_reply_for(err: BadRequest, v2_route: bool) -> Reply:
    """A refused request's reply: ``{"error", "status"}`` (a V2 route: ``{"error"}``), with ``err``'s status and
    headers (``Retry-After``)."""
    payload = {"error": str(err)} if v2_route else {"error": str(err), "status": err.status}
    return json_reply(err.status, payload, err.headers)


def internal_error_reply(err: Exception, v2_route: bool) -> Reply:
    """The 500 reply to a request that failed unexpectedly (the server keeps serving)."""
    return error_reply_for(BadRequest(f"internal error: {type(err).__name__}: {err}", 500), v2_route)


@dataclass(frozen=True)
class PredictRequest:
    """A checked ``/predict`` request.

    Attributes:
        x: the model's input (``(N, C, H, W)``; a detector: a list of images).
        width: the width asked for, or ``None``.
        budget_ms: the latency budget asked for, or ``None`` (neither: the widest width).
        options: the task's own request options (``top_k``, ``min_score``, ``mask_format``, ...).
    """

    x: Any
    width: float | None
    budget_ms: float | None
    options: dict[str, Any]


def parse_predict(
    body: bytes,
    content_type: str,
    query: Mapping[str, str],
    *,
    task: Task,
    input_shape: Sequence[int],
    max_batch: int,
    decode_image: Callable[[bytes], torch.Tensor],
) -> tuple[Any, dict[str, Any]]:
    """The model input and the request parameters of a ``/predict`` body.

    Args:
        body: the request body.
        content_type: its ``Content-Type`` header, parameters (a multipart boundary) included; ``""`` when absent.
        query: the query string's fields (options of an image body, such as ``budget_ms``).
        task: the model's task (decodes JSON tensors).
        input_shape: the served input shape ``(C, H, W)``.
        max_batch: the largest batch of a JSON tensor (413 beyond).
        decode_image: decodes and preprocesses encoded image bytes (the server bounds how many decode at once).

    Returns:
        ``(x, params)``: the input, and the parameters of the query string, JSON object or form fields.

    Raises:
        BadRequest: a body that cannot be read, or an unsupported ``Content-Type`` (415).
    """
    header = Message()
    header["Content-Type"] = content_type
    ctype = header.get_content_type()  # as http.server reads it: lower case, text/plain when missing or invalid
    params: dict[str, Any] = dict(query)
    if ctype == "application/json":
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:
            raise BadRequest(f"the body is not valid JSON ({err})") from err
        except RecursionError as err:
            raise BadRequest("the JSON body is nested too deeply; send a tensor of at most 4 dimensions") from err
        if not isinstance(obj, dict):
            raise BadRequest('the JSON body must be an object such as {"tensor": [...], "width": 0.5}')
        params.update({k: v for k, v in obj.items() if k not in ("tensor", "image_base64")})
        if "tensor" in obj:
            return task.decode_tensor(obj["tensor"], input_shape, max_batch, MAX_IMAGE_PIXELS), params
        if "image_base64" in obj:
            try:
                data = base64.b64decode(obj["image_base64"], validate=True)
            except (binascii.Error, TypeError, ValueError) as err:
                raise BadRequest(f"'image_base64' is not valid base64 ({err})") from err
            return decode_image(data), params
        raise BadRequest("the JSON body needs a 'tensor' (nested list) or an 'image_base64' field")
    if ctype == "multipart/form-data":
        image, fields = _parse_multipart(content_type, body)
        params.update(fields)
        if image is None:
            raise BadRequest("the multipart body needs an 'image' (or 'file') part")
        return decode_image(image), params
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        return decode_image(body), params
    raise BadRequest(
        f"unsupported Content-Type {ctype!r}; send application/json, multipart/form-data, or image bytes "
        "(image/png, image/jpeg)",
        415,
    )


def predict_request(x: Any, params: Mapping[str, Any], task: Task) -> PredictRequest:
    """Check the request parameters: ``width`` or ``budget_ms`` (not both), and the task's options.

    Raises:
        BadRequest: a parameter that is not a positive number, both ``width`` and ``budget_ms``, or a bad option.
    """
    width = number_param(params, "width")
    budget = number_param(params, "budget_ms")
    if width is not None and budget is not None:
        raise BadRequest("give either width or budget_ms, not both")
    return PredictRequest(x, width, budget, task.request_options(params, number_param))


def predict_answer(
    task: Task,
    result: RunResult,
    options: Mapping[str, Any],
    labels: Sequence[str] | None,
    top_k: int,
    t0: float,
) -> dict[str, Any]:
    """The JSON answer of a ``/predict`` request (see :mod:`slimmable.serve.server`).

    Args:
        task: the model's task (builds the answer's list).
        result: the runner's result for the request.
        options: the request's task options (:attr:`PredictRequest.options`).
        labels: class names, or ``None``.
        top_k: the default number of classes per input.
        t0: ``time.perf_counter()`` when the request arrived (the answer's ``total_ms``).
    """
    entries = task.answer(result.output, options, labels, top_k)
    return {
        task.answer_field: entries,
        "width": result.width,
        "budget_ms": result.budget_ms,
        "budget_met": result.budget_met,
        "inference_ms": round(result.latency_ms, 4),
        "predicted_ms": _rounded(result.predicted_ms),
        "queue_ms": round(result.queue_ms, 4),
        "predicted_queue_ms": _rounded(result.predicted_queue_ms),
        "total_ms": round(1e3 * (time.perf_counter() - t0), 4),
        "batch_size": len(entries),
        "forward_batch_size": result.forward_batch_size,
    }


def waited_ms(t0: float | None) -> float:
    """Milliseconds since ``t0`` (a request's arrival, ``time.perf_counter()``), 0 for ``None``: what a budget has
    already spent on reading and decoding when the request reaches the runner."""
    return 0.0 if t0 is None else 1e3 * max(0.0, time.perf_counter() - t0)


def json_reply(status: int, payload: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> Reply:
    """A JSON reply (``Content-Type: application/json``) with ``headers``."""
    from .v2 import Reply

    return Reply(status, json.dumps(payload).encode(), {**(headers or {}), "Content-Type": "application/json"})


def _rounded(ms: float | None) -> float | None:
    return None if ms is None else round(ms, 4)


def _parse_multipart(content_type: str, body: bytes) -> tuple[bytes | None, dict[str, str]]:
    """The image part and the text fields of a ``multipart/form-data`` body (parsed with the email package)."""
    msg = BytesParser(policy=policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\nMIME-Version: 1.0\r\n\r\n" + body
    )
    if not msg.is_multipart():
        raise BadRequest("the multipart body could not be parsed (check the boundary)")
    image: bytes | None = None
    fields: dict[str, str] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if name in ("image", "file"):
            image = payload
        elif isinstance(name, str):
            fields[name] = payload.decode("utf-8", "replace").strip()
    return image, fields
