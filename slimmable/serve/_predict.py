"""The ``POST /predict`` route without the HTTP server: a body to the model's input and options, and a run's result
to the JSON answer. The stdlib server (:mod:`slimmable.serve.server`) and the Ray Serve deployment
(:mod:`slimmable.serve.ray_serve`) both call these, so the route behaves the same on either engine."""

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
from typing import Any

import torch

from ..runtime import RunResult
from ..tasks import Task
from ._decode import MAX_IMAGE_PIXELS, BadRequest, number_param

__all__ = ["PredictRequest", "parse_predict", "predict_answer", "predict_request"]


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
