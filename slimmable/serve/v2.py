"""The Open Inference Protocol (KServe V2, Triton's HTTP API) for :class:`~slimmable.serve.PredictionServer`.

A client of KServe's V2 protocol, such as ``tritonclient.http.InferenceServerClient``, talks to ``slimmable serve``
as to any V2 server. The routes, next to the server's own ``/predict`` and ``/info``:

* ``GET /v2``: server metadata ``{"name": "slimmable", "version", "extensions": ["binary_tensor_data",
  "parameters"]}``;
* ``GET /v2/health/live``, ``GET /v2/health/ready``: 200 ``{"live": true}`` / ``{"ready": true}``;
* ``GET /v2/models/{name}[/versions/{v}]``: model metadata ``{"name", "versions", "platform", "inputs",
  "outputs", "parameters"}``;
* ``GET /v2/models/{name}[/versions/{v}]/ready``: 200 ``{"name", "ready": true}`` (a 400 with ``"ready": false``
  for a model the protocol cannot serve yet, a detector);
* ``POST /v2/models/{name}[/versions/{v}]/infer``: inference.

Widths are model versions. Version ``"50"`` runs width 0.5: a version is the width times 100 (``"100"`` the full
width, ``"12.5"`` width 0.125), and the metadata's ``parameters.widths`` maps each version to its width. Without a
version, the request's ``parameters`` choose: ``{"width": 0.5}``, or ``{"latency_budget_ms": 8}`` for the width the
runner's width policy picks (by default the widest whose predicted completion fits, counted from the request's
arrival, the wait behind the requests ahead included); neither runs the widest width. A version with a different
``width``, or ``latency_budget_ms`` with a version or a width, is a 400. The response's ``parameters`` say what
ran: ``width``, ``latency_ms`` (the measured forward pass), ``predicted_ms``, ``queue_ms`` and
``predicted_queue_ms`` (the wait for a slot, measured and predicted), with a budget ``latency_budget_ms`` and
``budget_met`` (done within the budget, from arrival to the end of inference), and ``forward_batch_size`` (the
inputs of the forward pass that ran the request, more than its own where requests are batched together).

Tensors. The input is ``input``, the model's dtype (``FP32``), shape ``[-1, C, H, W]`` (the calibrated size; at
most ``max_batch`` items). The outputs are the model's task's (:meth:`slimmable.tasks.Task.v2_outputs`): a
classifier's ``logits`` ``FP32 [-1, num_classes]``; a segmenter's ``out`` logits ``FP32 [-1, K, H, W]`` and
``class_map`` ``INT64 [-1, H, W]`` (the argmax over classes). ``outputs`` in the request picks some of them
(default: all). Detectors are not served over V2 yet (a 400 that says so; use ``POST /predict``).

Binary tensor data (Triton's extension, what tritonclient sends by default): the body is the JSON request followed
by raw little-endian row-major tensor bytes, the ``Inference-Header-Content-Length`` header giving the JSON's length
and each binary input carrying ``parameters.binary_data_size`` instead of ``data``. Outputs come back binary when
the request asks (``parameters.binary_data: true`` on an output, or ``binary_data_output: true`` on the request,
an output's own setting winning), the response then laid out the same way.

Errors are ``{"error": message}`` with 400 (bad request), 404 (unknown route, model or version), 411 (no
Content-Length), 413 (a body or batch over the server's bounds), 415 (a compressed body) or 503 with
``Retry-After`` (the server is at its bound of body bytes in flight). Request parameters other than those above
are ignored, as V2 servers do (``budget_ms``, the ``/predict`` name, is refused so that it is not silently
ignored). Compressed bodies (``Content-Encoding``) and Triton's classification extension are not supported.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import numpy as np
import torch

from ..export._io import INPUT_NAME
from ..nn.channels import width_key
from ..runtime import RunResult, SlimmableRunner
from ._decode import BadRequest, number_param
from ._routes import waited_ms

__all__ = [
    "DATATYPES",
    "EXTENSIONS",
    "PLATFORM",
    "InferRequest",
    "OpenInferenceProtocol",
    "Reply",
    "version_of",
]

#: the protocol extensions this server implements (``GET /v2`` lists them)
EXTENSIONS = ("binary_tensor_data", "parameters")
#: the ``platform`` of the model metadata: PyTorch modules, one dense copy per width
PLATFORM = "pytorch_slimmable"
#: V2 datatypes this server reads or writes, with their torch dtype and little-endian numpy dtype (binary data)
DATATYPES: dict[str, tuple[torch.dtype, str]] = {
    "BOOL": (torch.bool, "|b1"),
    "UINT8": (torch.uint8, "|u1"),
    "INT8": (torch.int8, "|i1"),
    "INT16": (torch.int16, "<i2"),
    "INT32": (torch.int32, "<i4"),
    "INT64": (torch.int64, "<i8"),
    "FP16": (torch.float16, "<f2"),
    "FP32": (torch.float32, "<f4"),
    "FP64": (torch.float64, "<f8"),
}
_NAME_OF_DTYPE = {dtype: name for name, (dtype, _) in DATATYPES.items()}
_HEADER_LENGTH = "Inference-Header-Content-Length"


def version_of(width: float) -> str:
    """The model version that serves ``width``: the width times 100 (``0.5`` → ``"50"``, ``0.125`` → ``"12.5"``)."""
    return f"{round(float(width) * 100, 4):g}"


@dataclass(frozen=True)
class Reply:
    """An HTTP answer: status, body bytes and headers (``Content-Type`` included)."""

    status: int
    body: bytes
    headers: Mapping[str, str]


@dataclass(frozen=True)
class InferRequest:
    """A parsed and checked inference request.

    Attributes:
        id: the request's ``id`` (echoed in the response), or ``None``.
        x: the input batch ``(N, C, H, W)``.
        width: the width the version or ``parameters.width`` pins, or ``None``.
        budget_ms: ``parameters.latency_budget_ms``, or ``None``.
        outputs: the requested outputs as ``(name, binary)``; ``None``: all of them.
        binary_output: the request's ``binary_data_output`` (outputs not named, or named without ``binary_data``).
    """

    id: str | None
    x: torch.Tensor
    width: float | None
    budget_ms: float | None
    outputs: tuple[tuple[str, bool | None], ...] | None
    binary_output: bool


@dataclass(frozen=True)
class _Spec:
    """A tensor of the model metadata."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


class OpenInferenceProtocol:
    """The V2 routes of a :class:`~slimmable.serve.PredictionServer` (see the module docstring).

    Args:
        runner: the calibrated runner the server answers with.
        name: the model's V2 name (the ``{name}`` of ``/v2/models/{name}``).
        max_batch: the largest batch of an inference request (413 beyond).

    Raises:
        ValueError: ``name`` is empty or holds ``/``, or two widths would have the same version.
    """

    def __init__(self, runner: SlimmableRunner, name: str, max_batch: int) -> None:
        if not name or "/" in name or name != name.strip():
            raise ValueError(
                f"model name {name!r} cannot be a V2 model name (a URL path segment): give a non-empty name without "
                "'/' or surrounding spaces, e.g. --name mobilenet"
            )
        self.runner = runner
        self.name = name
        self.max_batch = int(max_batch)
        self.versions: dict[str, float] = {version_of(w): w for w in runner.widths}
        if len(self.versions) != len(runner.widths):
            raise ValueError(
                f"widths {list(runner.widths)} do not give distinct versions (width x 100, 4 decimals); serve widths "
                "that differ by at least 1e-6"
            )
        datatype = _NAME_OF_DTYPE.get(runner.dtype)
        self.input = _Spec(INPUT_NAME, datatype or str(runner.dtype), (-1, *(int(s) for s in runner.input_shape)))
        self._outputs: list[_Spec] | None = None
        self._outputs_error: BadRequest | None = None
        if datatype is None:  # /predict still serves it
            self._outputs_error = BadRequest(
                f"the model runs in {runner.dtype}, which has no V2 datatype this server reads; serve it in float32 "
                "for the V2 routes, or use POST /predict"
            )
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ routing

    @staticmethod
    def owns(path: str) -> bool:
        """Whether ``path`` is a V2 route (``/v2`` or below it)."""
        return path == "/v2" or path.startswith("/v2/")

    def get(self, path: str) -> Reply:
        """Answer ``GET path`` (a V2 route): metadata or health; errors are V2 error replies."""
        try:
            return self._get(path)
        except BadRequest as err:
            return error_reply(err)

    def _get(self, path: str) -> Reply:
        if path in ("/v2", "/v2/"):
            from .. import __version__  # at call time: the package's __init__ may still be importing this module

            return _json(200, {"name": "slimmable", "version": __version__, "extensions": list(EXTENSIONS)})
        if path == "/v2/health/live":
            return _json(200, {"live": True})
        if path == "/v2/health/ready":
            return _json(200, {"ready": True})
        version, action = self._model_route(path, "GET")
        if action == "ready":
            try:
                self.output_specs()
            except BadRequest as err:
                return _json(err.status, {"name": self.name, "ready": False, "error": str(err)})
            return _json(200, {"name": self.name, "ready": True})
        return _json(200, self.metadata(version))

    def infer_version(self, path: str) -> str | None:
        """The version that ``POST path`` infers with (``None``: the request's parameters choose).

        Raises:
            BadRequest: 404 for a path that is not an ``infer`` route of this model, or an unknown version.
        """
        version, action = self._model_route(path, "POST")
        if action != "infer":
            raise BadRequest(
                f"no route POST {path}; infer with POST /v2/models/{self.name}[/versions/VERSION]/infer", 404
            )
        return version

    def _model_route(self, path: str, method: str) -> tuple[str | None, str | None]:
        """``(version, action)`` of a ``/v2/models/{name}[/versions/{v}][/ready|/infer]`` path (``action`` ``None``:
        the metadata)."""
        parts = [unquote(p) for p in path.split("/")[1:]]  # "", "v2", "models", name, ...
        if parts[-1:] == [""]:
            parts.pop()
        if len(parts) < 3 or parts[:2] != ["v2", "models"]:
            raise BadRequest(self._no_route(method, path), 404)
        name, rest = parts[2], parts[3:]
        version = None
        if rest[:1] == ["versions"]:
            if len(rest) < 2:
                raise BadRequest(self._no_route(method, path), 404)
            version, rest = rest[1], rest[2:]
        action = rest[0] if len(rest) == 1 else None
        if len(rest) > 1 or (rest and action not in ("ready", "infer")) or (action == "infer") != (method == "POST"):
            raise BadRequest(self._no_route(method, path), 404)
        if name != self.name:
            raise BadRequest(
                f"unknown model {name!r}; this server serves {self.name!r} (GET /v2/models/{self.name})", 404
            )
        if version is not None and version not in self.versions:
            raise BadRequest(
                f"model {self.name!r} has no version {version!r}; its versions are {', '.join(self.versions)} (a "
                f"version is the width x 100: {self._version_table()})",
                404,
            )
        return version, action

    def _no_route(self, method: str, path: str) -> str:
        m = f"/v2/models/{self.name}[/versions/VERSION]"
        return (
            f"no route {method} {path}; the V2 routes are GET /v2, GET /v2/health/live, GET /v2/health/ready, GET {m}, "
            f"GET {m}/ready, POST {m}/infer"
        )

    def _version_table(self) -> str:
        return ", ".join(f"{v} -> {w:g}" for v, w in self.versions.items())

    # ------------------------------------------------------------------ metadata

    def output_specs(self) -> list[_Spec]:
        """The model's V2 outputs, found once by running the narrowest width on one example input.

        Raises:
            BadRequest: the model's task has no V2 outputs (a detector), or its dtype no V2 datatype (400).
        """
        with self._lock:
            if self._outputs is None and self._outputs_error is None:
                width = self.runner.widths[0]
                module = self.runner.module(width)
                task = self.runner.task
                x = task.example_inputs(module, self.runner.input_shape, 1, seed=0)
                try:
                    with torch.inference_mode():
                        named = task.v2_outputs(module, module(x))
                    self._outputs = [_Spec(n, _checked_datatype(n, d), (-1, *t.shape[1:])) for n, d, t in named]
                except BadRequest as err:
                    self._outputs_error = err
            if self._outputs_error is not None:
                raise self._outputs_error
            assert self._outputs is not None
            return self._outputs

    def metadata(self, version: str | None = None) -> dict[str, Any]:
        """The model metadata (``GET /v2/models/{name}[/versions/{v}]``).

        Raises:
            BadRequest: the model cannot be served over V2 (a detector: 400).
        """
        outputs = self.output_specs()
        params: dict[str, Any] = {
            "task": self.runner.task.name,
            "widths": dict(self.versions),
            "default_version": version_of(self.runner.widths[-1]),
            "request_parameters": ["width", "latency_budget_ms"],
        }
        if version is not None:
            params["width"] = self.versions[version]
        return {
            "name": self.name,
            "versions": list(self.versions),
            "platform": PLATFORM,
            "inputs": [self.input.to_json()],
            "outputs": [o.to_json() for o in outputs],
            "parameters": params,
        }

    # ------------------------------------------------------------------ inference

    def parse(self, version: str | None, body: bytes, headers: Mapping[str, str]) -> InferRequest:
        """Parse and check an inference request body (JSON, or JSON plus binary tensor data).

        Args:
            version: the version of the URL (see :meth:`infer_version`).
            body: the request body.
            headers: the request headers (``Inference-Header-Content-Length``, ``Content-Encoding``).

        Raises:
            BadRequest: anything the request gets wrong, with the status to answer.
        """
        encoding = (headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding != "identity":
            raise BadRequest(
                f"Content-Encoding {encoding} is not supported; send the body uncompressed (tritonclient: leave "
                "request_compression_algorithm unset)",
                415,
            )
        obj, binary = _split_body(body, headers.get(_HEADER_LENGTH))
        outputs = self.output_specs()
        request_id = obj.get("id")
        if request_id is not None and not isinstance(request_id, str):
            raise BadRequest(f"'id' must be a string, got {request_id!r}")
        params = obj.get("parameters", {})
        if not isinstance(params, dict):
            raise BadRequest(f"'parameters' must be an object such as {{\"width\": 0.5}}, got {params!r}")
        if "budget_ms" in params:
            raise BadRequest("the V2 parameter is 'latency_budget_ms' (budget_ms is the /predict field); rename it")
        width = number_param(params, "width")
        budget = number_param(params, "latency_budget_ms")
        if width is not None and budget is not None:
            raise BadRequest("give either parameters.width or parameters.latency_budget_ms, not both")
        if version is not None:
            pinned = self.versions[version]
            if budget is not None:
                raise BadRequest(
                    f"version {version} pins width {pinned:g}, and parameters.latency_budget_ms picks a width: give "
                    f"one, e.g. infer at /v2/models/{self.name}/infer with the budget"
                )
            if width is not None and width_key(width) != pinned:
                raise BadRequest(
                    f"version {version} runs width {pinned:g} but parameters.width is {width:g}; give one of them "
                    f"(versions: {self._version_table()})"
                )
            width = pinned
        binary_output = params.get("binary_data_output", False)
        if not isinstance(binary_output, bool):
            raise BadRequest(f"parameters.binary_data_output must be true or false, got {binary_output!r}")
        x = self._input(obj.get("inputs"), binary)
        requested = self._requested(obj.get("outputs"), [o.name for o in outputs])
        return InferRequest(request_id, x, width, budget, requested, binary_output)

    def _input(self, inputs: Any, binary: bytes) -> torch.Tensor:
        """The input tensor of ``inputs`` (with its binary data)."""
        spec = self.input
        if not isinstance(inputs, list) or not inputs:
            raise BadRequest(
                f"'inputs' must be a list holding the input {spec.name!r} ({spec.datatype} {list(spec.shape)})"
            )
        x: torch.Tensor | None = None
        offset = 0
        for entry in inputs:
            if not isinstance(entry, dict):
                raise BadRequest(f"each input must be an object with name, shape, datatype and data, got {entry!r}")
            name = entry.get("name")
            if name != spec.name:
                raise BadRequest(f"unknown input {name!r}; model {self.name!r} takes one input, {spec.name!r}")
            if x is not None:
                raise BadRequest(f"input {spec.name!r} is given twice; give it once")
            x, offset = self._tensor(entry, binary, offset)
        if offset != len(binary):
            raise BadRequest(
                f"the body holds {len(binary)} bytes after the JSON header ({_HEADER_LENGTH}), but the inputs' "
                f"binary_data_size add up to {offset}; send exactly the inputs' binary data"
            )
        assert x is not None
        return x

    def _tensor(self, entry: Mapping[str, Any], binary: bytes, offset: int) -> tuple[torch.Tensor, int]:
        """The tensor of one input entry, and the offset of the next input's binary data."""
        spec = self.input
        datatype = entry.get("datatype")
        if datatype != spec.datatype:
            raise BadRequest(f"input {spec.name!r} has datatype {datatype!r}; this model takes {spec.datatype}")
        shape = entry.get("shape")
        expected = list(spec.shape)
        if not (
            isinstance(shape, list)
            and all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
            and len(shape) == len(expected)
            and shape[1:] == expected[1:]
            and shape[0] >= 1
        ):
            raise BadRequest(
                f"input {spec.name!r} has shape {shape!r}; this model takes {expected} (-1: a batch of 1 or more; "
                "resize the images to the served input size)"
            )
        if shape[0] > self.max_batch:
            raise BadRequest(
                f"input {spec.name!r} holds a batch of {shape[0]}; at most {self.max_batch} per request", 413
            )
        count = math.prod(shape)
        torch_dtype, np_dtype = DATATYPES[spec.datatype]
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequest(f"the parameters of input {spec.name!r} must be an object, got {params!r}")
        size = params.get("binary_data_size")
        if size is not None:
            if "data" in entry:
                raise BadRequest(f"input {spec.name!r} has both 'data' and parameters.binary_data_size; give one")
            itemsize = np.dtype(np_dtype).itemsize
            if isinstance(size, bool) or not isinstance(size, int) or size != count * itemsize:
                raise BadRequest(
                    f"input {spec.name!r} has binary_data_size {size!r}; shape {shape} of {spec.datatype} takes "
                    f"{count * itemsize} bytes"
                )
            if offset + size > len(binary):
                raise BadRequest(
                    f"input {spec.name!r} needs {size} bytes of binary data but the body has {len(binary) - offset} "
                    f"left after the JSON header ({_HEADER_LENGTH})"
                )
            array = np.frombuffer(binary, dtype=np_dtype, count=count, offset=offset)
            x = torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True)).to(torch_dtype)
            offset += size
        else:
            x = _from_json(entry.get("data"), spec.name, torch_dtype, count)
        x = x.reshape(shape)
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise BadRequest(f"input {spec.name!r} holds NaN or infinite values")
        return x, offset

    @staticmethod
    def _requested(outputs: Any, names: Sequence[str]) -> tuple[tuple[str, bool | None], ...] | None:
        """The request's ``outputs`` as ``(name, binary_data or None)``."""
        if outputs is None:
            return None
        if not isinstance(outputs, list):
            raise BadRequest(f"'outputs' must be a list such as [{{\"name\": {names[0]!r}}}], got {outputs!r}")
        got: list[tuple[str, bool | None]] = []
        for out in outputs:
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise BadRequest(f"each requested output must be an object with a name, got {out!r}")
            name = out["name"]
            if name not in names:
                raise BadRequest(f"unknown output {name!r}; the model's outputs are {', '.join(names)}")
            if any(name == n for n, _ in got):
                raise BadRequest(f"output {name!r} is requested twice; name it once")
            params = out.get("parameters") or {}
            if not isinstance(params, dict):
                raise BadRequest(f"the parameters of output {name!r} must be an object, got {params!r}")
            if params.get("classification"):
                raise BadRequest(
                    f"output {name!r} asks for classification (Triton's classification extension), which this "
                    "server does not implement; request the logits and take their top-k"
                )
            binary = params.get("binary_data")
            if binary is not None and not isinstance(binary, bool):
                raise BadRequest(f"parameters.binary_data of output {name!r} must be true or false, got {binary!r}")
            got.append((name, binary))
        return tuple(got)

    def infer(self, request: InferRequest, t0: float | None = None) -> Reply:
        """Run a parsed request and build the response (JSON, or JSON plus binary output data).

        Args:
            request: from :meth:`parse`.
            t0: ``time.perf_counter()`` when the request arrived (the response's ``total_ms``, and where a budget
                starts counting); ``None``: omitted, and a budget counts from this call.

        Raises:
            BadRequest: a width the runner does not serve, or a budget below the fastest width (400).
        """
        try:
            result = self.runner.run(
                request.x, width=request.width, budget_ms=request.budget_ms, waited_ms=waited_ms(t0)
            )
        except (ValueError, TypeError) as err:
            raise BadRequest(str(err)) from err
        return self.reply(request, result, t0)

    def reply(self, request: InferRequest, result: RunResult, t0: float | None = None) -> Reply:
        """The response to ``request`` once the runner ran it (:meth:`infer` runs it itself; an engine that
        batches requests runs them its way and calls this).

        Args:
            request: from :meth:`parse`.
            result: the runner's result for it.
            t0: when the request arrived (the response's ``total_ms``; ``None``: omitted).
        """
        named = self.runner.task.v2_outputs(self.runner.module(result.width), result.output)
        tensors = {n: (_checked_datatype(n, d), t) for n, d, t in named}
        wanted = request.outputs if request.outputs is not None else tuple((n, None) for n in tensors)
        outputs, blobs = [], []
        for name, binary in wanted:
            datatype, tensor = tensors[name]
            entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(tensor.shape)}
            data = _contiguous(tensor, datatype)
            if request.binary_output if binary is None else binary:
                blob = _to_bytes(data, datatype)
                entry["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                entry["data"] = data.reshape(-1).tolist()
            outputs.append(entry)
        response: dict[str, Any] = {"model_name": self.name, "model_version": version_of(result.width)}
        if request.id is not None:
            response["id"] = request.id
        response["parameters"] = _run_parameters(result, t0, time.perf_counter())
        response["outputs"] = outputs
        header = json.dumps(response).encode()
        if not blobs:
            return Reply(200, header, {"Content-Type": "application/json"})
        return Reply(
            200,
            b"".join([header, *blobs]),
            {"Content-Type": "application/octet-stream", _HEADER_LENGTH: str(len(header))},
        )


def error_reply(err: BadRequest) -> Reply:
    """The V2 error reply ``{"error": message}`` of ``err``, with its status and headers (``Retry-After``)."""
    return _json(err.status, {"error": str(err)}, err.headers)


def _json(status: int, payload: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> Reply:
    return Reply(status, json.dumps(payload).encode(), {**(headers or {}), "Content-Type": "application/json"})


def _checked_datatype(name: str, datatype: str) -> str:
    if datatype not in DATATYPES:
        raise TypeError(f"the task names datatype {datatype!r} for output {name!r}; use one of {', '.join(DATATYPES)}")
    return datatype


def _split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON request object and the binary data after it."""
    if header_length is None:
        head, binary = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError as err:
            raise BadRequest(f"{_HEADER_LENGTH} {header_length!r} is not an integer") from err
        if not 0 <= n <= len(body):
            raise BadRequest(f"{_HEADER_LENGTH} {n} is outside the body of {len(body)} bytes")
        head, binary = body[:n], body[n:]
    try:
        obj = json.loads(head)
    except (ValueError, UnicodeDecodeError) as err:
        hint = "" if header_length is not None else f" (binary data needs the {_HEADER_LENGTH} header)"
        raise BadRequest(f"the request is not valid JSON{hint}: {str(err)[:160]}") from err
    except RecursionError as err:
        raise BadRequest("the JSON request is nested too deeply") from err
    if not isinstance(obj, dict):
        raise BadRequest(
            'the request must be a JSON object such as {"inputs": [{"name", "shape", "datatype", "data"}]}'
        )
    return obj, binary


def _from_json(data: Any, name: str, dtype: torch.dtype, count: int) -> torch.Tensor:
    """A JSON ``data`` list (flat or nested, row-major) as a flat tensor of ``count`` elements."""
    if not isinstance(data, list):
        raise BadRequest(
            f"input {name!r} needs 'data' (a list of numbers in row-major order) or parameters.binary_data_size"
        )
    try:
        x = torch.tensor(data, dtype=dtype)
    except (TypeError, ValueError, RuntimeError, OverflowError, RecursionError) as err:
        raise BadRequest(f"the data of input {name!r} is not a (nested) list of numbers ({str(err)[:120]})") from err
    if x.numel() != count:
        raise BadRequest(f"input {name!r} has {x.numel()} values in 'data' but its shape holds {count}")
    return x.reshape(-1)


def _contiguous(tensor: torch.Tensor, datatype: str) -> torch.Tensor:
    return tensor.detach().to("cpu", DATATYPES[datatype][0]).contiguous()


def _to_bytes(tensor: torch.Tensor, datatype: str) -> bytes:
    """Little-endian row-major bytes of ``tensor`` (already of ``datatype``'s dtype, on the CPU)."""
    return tensor.numpy().astype(DATATYPES[datatype][1], copy=False).tobytes()


def _run_parameters(result: RunResult, t0: float | None, now: float) -> dict[str, Any]:
    params: dict[str, Any] = {"width": result.width, "latency_ms": round(result.latency_ms, 4)}
    if result.predicted_ms is not None:
        params["predicted_ms"] = round(result.predicted_ms, 4)
    params["queue_ms"] = round(result.queue_ms, 4)
    if result.predicted_queue_ms is not None:
        params["predicted_queue_ms"] = round(result.predicted_queue_ms, 4)
    if result.budget_ms is not None:
        params["latency_budget_ms"] = result.budget_ms
        params["budget_met"] = bool(result.budget_met)
    params["forward_batch_size"] = result.forward_batch_size
    if t0 is not None:
        params["total_ms"] = round(1e3 * (now - t0), 4)
    return params
