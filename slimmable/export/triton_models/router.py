"""The router of a slimmable model's Triton repository (written by ``slimmable export --format triton``).

This file is ``<name>_router/1/model.py``: a Triton Python-backend model that takes the same input as ``<name>``
and runs each request on one of its versions (one version per width, the width x 100: ``25``, ``50``, ``100``)
through Business Logic Scripting. The request's parameters choose the width, as on ``slimmable serve``'s V2
routes:

* ``width``: run that width (``0.5``; the string ``"0.5"`` too, for clients and Triton builds whose request
  parameters take no floating-point numbers);
* ``latency_budget_ms``: run the widest width whose latency, measured when the repository was written and
  recorded in ``route.json`` beside this file, fits the budget (the latencies are of one image, on the exporting
  machine's CPU with onnxruntime: edit ``route.json`` with numbers measured on the serving hardware);
* neither: run the widest width.

An unknown width, both parameters, or a budget below the fastest width is an error response that says what to
send. When Triton allows it the response's parameters say what ran: ``width`` and ``version``.

The file needs nothing but the standard library and Triton's ``triton_python_backend_utils``; outside Triton it
imports without the latter, so that :func:`request_choice` and :func:`choose_version` can be tested on their own.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from collections.abc import Mapping
from typing import Any

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # outside Triton: the routing functions below still import and run
    pb_utils = None

#: the routing table beside this file: the model, its tensors and its versions with their widths and latencies
ROUTE_FILE = "route.json"
#: the request parameters that choose a width
WIDTH_PARAMETER = "width"
BUDGET_PARAMETER = "latency_budget_ms"
#: widths are compared at this many decimals (0.1 + 0.2 and 0.3 are one width)
_DECIMALS = 6


class RouteError(ValueError):
    """A request whose parameters choose no width; the message says what to send instead."""


def read_number(params: Mapping[str, Any], key: str) -> float | None:
    """The positive number ``params[key]`` (a number or a numeric string), ``None`` when absent or empty.

    Raises:
        RouteError: the value is not a positive finite number.
    """
    value = params.get(key)
    if value is None or value == "":
        return None
    number = None
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    if number is None or not math.isfinite(number) or number <= 0:
        raise RouteError(f'parameter {key} must be a positive number such as 0.5 (or the string "0.5"), got {value!r}')
    return number


def request_choice(params: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """``(width, latency_budget_ms)`` from a request's parameters (each ``None`` when not given).

    Raises:
        RouteError: a value is not a positive number, both are given, or ``budget_ms`` (the name of
            ``slimmable serve``'s ``/predict`` field) is used instead of ``latency_budget_ms``.
    """
    if "budget_ms" in params:
        raise RouteError(
            f"the budget parameter is {BUDGET_PARAMETER!r} (budget_ms is slimmable's /predict field); rename it"
        )
    width = read_number(params, WIDTH_PARAMETER)
    budget = read_number(params, BUDGET_PARAMETER)
    if width is not None and budget is not None:
        raise RouteError(f"give either parameter {WIDTH_PARAMETER} or {BUDGET_PARAMETER}, not both")
    return width, budget


def _widths_text(route: Mapping[str, Any]) -> str:
    entries = route["versions"]
    widths = ", ".join(f"{float(e['width']):g}" for e in entries)
    versions = ", ".join(str(e["version"]) for e in entries)
    return f"widths {widths} (versions {versions})"


def choose_version(
    route: Mapping[str, Any], width: float | None = None, budget_ms: float | None = None
) -> Mapping[str, Any]:
    """The entry of ``route["versions"]`` (``{"version", "width", "latency_ms", ...}``) that runs a request.

    Args:
        route: the routing table (``route.json``); its versions sorted by width, narrowest first.
        width: run this width.
        budget_ms: run the widest width whose ``latency_ms`` is at most this.

    Returns:
        The chosen entry: the given width's, the widest fitting the budget, or (neither given) the widest.

    Raises:
        RouteError: both given; a width that is not one of the model's (the message names them); a budget with no
            latencies recorded, or below the fastest width's latency.
    """
    entries = sorted(route["versions"], key=lambda e: float(e["width"]))
    name = route.get("model", "the model")
    if width is not None and budget_ms is not None:
        raise RouteError(f"give either parameter {WIDTH_PARAMETER} or {BUDGET_PARAMETER}, not both")
    if width is not None:
        for entry in entries:
            if round(float(entry["width"]), _DECIMALS) == round(float(width), _DECIMALS):
                return entry
        raise RouteError(f"{name} has no width {width:g}; its {_widths_text(route)}: send one of these widths")
    if budget_ms is not None:
        if any(e.get("latency_ms") is None for e in entries):
            raise RouteError(
                f"{name}'s latencies were not measured when the repository was written, so {BUDGET_PARAMETER} cannot "
                f"choose a width; send {WIDTH_PARAMETER}, or write each version's latency_ms into {ROUTE_FILE}"
            )
        fitting = [e for e in entries if float(e["latency_ms"]) <= budget_ms]
        if not fitting:
            fastest = min(entries, key=lambda e: float(e["latency_ms"]))
            raise RouteError(
                f"{BUDGET_PARAMETER} {budget_ms:g} is below the fastest width of {name}: width "
                f"{float(fastest['width']):g} took {float(fastest['latency_ms']):.3g} ms (measured at export, "
                f"{ROUTE_FILE}); send a budget of at least that"
            )
        return fitting[-1]
    return entries[-1]


def load_route(path: str) -> dict:
    """The routing table at ``path``, checked.

    Raises:
        ValueError: the file lacks a field, or has no versions.
    """
    with open(path, encoding="utf-8") as f:
        route = json.load(f)
    missing = [k for k in ("model", "input", "outputs", "versions") if k not in route]
    if missing or not route.get("versions"):
        raise ValueError(f"{path} is not a slimmable routing table (missing {missing or ['versions']}); re-export it")
    for entry in route["versions"]:
        if "version" not in entry or "width" not in entry:
            raise ValueError(f"{path}: every entry of versions needs version and width, got {entry!r}")
    return route


def _route_path(args: Mapping[str, str]) -> str:
    """``route.json`` of this model version: in the repository Triton names, else beside this file."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), ROUTE_FILE)
    repo, version = args.get("model_repository"), args.get("model_version")
    if repo and version:
        named = os.path.join(repo, str(version), ROUTE_FILE)
        if os.path.isfile(named):
            return named
    return here


def _parameters(request: Any) -> Mapping[str, Any]:
    """A Triton request's parameters as a dict (``request.parameters()`` is JSON)."""
    read = getattr(request, "parameters", None)
    if read is None:
        return {}
    text = read()
    params = json.loads(text) if text else {}
    return params if isinstance(params, dict) else {}


def _error(message: str, invalid: bool = False) -> Any:
    """An error response (``INVALID_ARG`` for a bad request where this Triton has error codes)."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None) if invalid else None
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(error=error)


def _response(tensors: Any, entry: Mapping[str, Any]) -> Any:
    """The response with ``tensors``; its parameters name the width that ran where this Triton has them."""
    params = {WIDTH_PARAMETER: f"{float(entry['width']):g}", "version": int(entry["version"])}
    try:
        return pb_utils.InferenceResponse(output_tensors=tensors, parameters=params)
    except TypeError:  # Python backends before response parameters
        return pb_utils.InferenceResponse(output_tensors=tensors)


class TritonPythonModel:
    """The router: each request's parameters pick a version of the model; BLS runs it there."""

    def initialize(self, args: Mapping[str, str]) -> None:
        if pb_utils is None:
            raise RuntimeError("this file is a Triton Python-backend model: serve its repository with tritonserver")
        self.route = load_route(_route_path(args))
        self.model = str(self.route["model"])
        self.input = str(self.route["input"])
        self.outputs = [str(o) for o in self.route["outputs"]]

    async def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        pending = []
        for i, request in enumerate(requests):
            try:
                entry = choose_version(self.route, *request_choice(_parameters(request)))
            except ValueError as err:  # a RouteError, or parameters that are not JSON
                responses[i] = _error(str(err), invalid=True)
                continue
            call = pb_utils.InferenceRequest(
                model_name=self.model,
                model_version=int(entry["version"]),
                requested_output_names=self.outputs,
                inputs=[pb_utils.get_input_tensor_by_name(request, self.input)],
            )
            pending.append((i, entry, call.async_exec()))
        replies = await asyncio.gather(*(p[2] for p in pending))
        for (i, entry, _), reply in zip(pending, replies):
            if reply.has_error():
                where = f"{self.model} version {entry['version']} (width {float(entry['width']):g})"
                responses[i] = _error(f"{where}: {reply.error().message()}")
            else:
                responses[i] = _response(reply.output_tensors(), entry)
        return responses
