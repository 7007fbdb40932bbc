"""The router of a slimmable model's Triton repository (written by ``slimmable export --format triton``).

This file is ``<name>_router/1/model.py``: a Triton Python-backend model that takes the same input as ``<name>``
and runs each request on one of its versions (one version per width, the width x 100: ``25``, ``50``, ``100``)
through Business Logic Scripting. The request's parameters choose the width, as on ``slimmable serve``'s V2
routes:

* ``width``: run that width (``0.5``; the string ``"0.5"`` too, for clients and Triton builds whose request
  parameters take no floating-point numbers);
* ``latency_budget_ms``: the width policy in ``width_policy.py`` beside this file (``slimmable.runtime.policy``,
  copied verbatim) picks the width: by default (``route.json``'s ``policy``: ``load_aware``) the widest width
  whose predicted completion, behind the requests this router has in flight, fits the budget, and that the
  measured arrival rate keeps under the utilisation limit. Its latencies are those ``route.json`` records (onnxruntime
  on the exporting machine's CPU, at batch 1 and the largest batch), corrected online by the ratio of observed to
  predicted latency of the requests that ran with nothing ahead of them;
* neither: run the widest width.

An unknown width, both parameters, or a budget below the fastest width is an error response that says what to
send. The router answers the model's output and ``width``, the width each item ran at (shape ``(N, 1)``); when
Triton allows it the response's parameters also say what ran: ``width`` and ``version``.

The file needs nothing but the standard library, ``width_policy.py`` and Triton's ``triton_python_backend_utils``;
outside Triton it imports without the latter, so that :func:`request_choice`, :func:`choose_version` and
:class:`Estimator` can be tested on their own.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # outside Triton: the routing functions below still import and run
    pb_utils = None

#: the routing table beside this file: the model, its tensors and its versions with their widths and latencies
ROUTE_FILE = "route.json"
#: the width policy beside this file (slimmable.runtime.policy)
POLICY_FILE = "width_policy.py"
#: the router's own output: the width each item ran at
WIDTH_OUTPUT = "width"
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


class Estimator:
    """Predicted latency (ms) of a width at a batch size: the route's measured latencies (linear in the batch size
    between the measured batches, extrapolated beyond them), times a drift factor learnt online.

    Args:
        route: the routing table (its versions' ``latency_ms_by_batch``, or ``latency_ms`` of one image).
        interpolate: ``interpolate(points, batch_size)``, the width policy module's ``interpolate_latency``.
        alpha: weight of each observation in the drift factor's moving average, in (0, 1].
    """

    def __init__(self, route: Mapping[str, Any], interpolate: Any, alpha: float = 0.2) -> None:
        self.table: dict[float, dict[int, float]] = {}
        for entry in route["versions"]:
            by_batch = entry.get("latency_ms_by_batch") or (
                {"1": entry["latency_ms"]} if entry.get("latency_ms") is not None else {}
            )
            if by_batch:
                self.table[_key(entry["width"])] = {int(b): float(ms) for b, ms in by_batch.items()}
        self._interpolate = interpolate  # width_policy.interpolate_latency (the runner's rule)
        self.alpha = float(alpha)
        self.drift = 1.0

    def base(self, width: float, batch_size: int) -> float:
        """The measured latency of ``width`` at ``batch_size`` (interpolated as the runner does), before the drift
        factor."""
        return self._interpolate(self.table[_key(width)], batch_size)

    def __call__(self, width: float, batch_size: int) -> float:
        """The predicted latency now: :meth:`base` times the drift factor."""
        return self.base(width, batch_size) * self.drift

    def observe(self, width: float, batch_size: int, observed_ms: float) -> None:
        """Learn from a request that ran with nothing ahead of it: the drift factor moves towards observed/base."""
        ratio = observed_ms / self.base(width, batch_size)
        self.drift += self.alpha * (min(max(ratio, 0.02), 50.0) - self.drift)


def _key(width: Any) -> float:
    return round(float(width), _DECIMALS)


def _beside(args: Mapping[str, str], filename: str) -> str:
    """``filename`` of this model version: in the repository Triton names, else beside this file."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), filename)
    repo, version = args.get("model_repository"), args.get("model_version")
    if repo and version:
        named = os.path.join(repo, str(version), filename)
        if os.path.isfile(named):
            return named
    return here


def _route_path(args: Mapping[str, str]) -> str:
    """``route.json`` of this model version."""
    return _beside(args, ROUTE_FILE)


def load_policy_module(path: str) -> Any:
    """The width-policy module file ``path`` (``width_policy.py``, :mod:`slimmable.runtime.policy`), imported.

    Raises:
        RuntimeError: the file is missing (a repository written before the router had a policy).
    """
    if not os.path.isfile(path):
        raise RuntimeError(f"{path} is missing: write the repository again with slimmable export --format triton")
    spec = importlib.util.spec_from_file_location("slimmable_width_policy", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def load_policy(path: str | Any, route: Mapping[str, Any], estimate: Any) -> Any:
    """The width policy that ``route``'s ``policy`` section names, from the module file ``path`` (or the module
    :func:`load_policy_module` returned).

    Raises:
        RuntimeError: the file is missing (a repository written before the router had a policy).
        ValueError: an unknown policy or bad settings (the message names them).
    """
    module = load_policy_module(path) if isinstance(path, str) else path
    settings = dict(route.get("policy") or {"name": "load_aware"})
    settings.pop("what", None)
    name = settings.pop("name", "load_aware")
    widths = [float(e["width"]) for e in route["versions"]]
    return module.make_policy(name, widths, estimate, **settings)


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


def _response(tensors: Any, entry: Mapping[str, Any], batch: int) -> Any:
    """The response with ``tensors`` and the ``width`` output; its parameters name the width that ran where this
    Triton has them."""
    tensors = [*tensors, pb_utils.Tensor(WIDTH_OUTPUT, np.full((batch, 1), float(entry["width"]), np.float32))]
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
        self.by_width = {_key(e["width"]): e for e in self.route["versions"]}
        policy_module = load_policy_module(_beside(args, POLICY_FILE))
        self.estimate = Estimator(self.route, policy_module.interpolate_latency)
        measured = set(self.estimate.table) == set(self.by_width)
        # without measured latencies budgets are refused (choose_version says so), pinned widths add no work
        self.policy = load_policy(policy_module, self.route, self.estimate if measured else (lambda w, b: 0.0))

    def _admit(self, request: Any, tensor: Any) -> tuple[Mapping[str, Any], Any]:
        """The version entry for ``request`` and its admission to the width policy.

        Raises:
            ValueError: a RouteError, or parameters that are not JSON.
        """
        width, budget = request_choice(_parameters(request))
        entry = choose_version(self.route, width, budget)  # checks the width, or that the budget can be met
        batch = _batch_size(tensor)
        if budget is None:
            return entry, self.policy.admit(float(entry["width"]), batch)
        admission = self.policy.choose(budget, batch)
        return self.by_width[_key(admission.width)], admission

    async def _run(self, entry: Mapping[str, Any], admission: Any, tensor: Any) -> Any:
        """Run one request on its version through BLS; the policy learns when it ends."""
        call = pb_utils.InferenceRequest(
            model_name=self.model,
            model_version=int(entry["version"]),
            requested_output_names=self.outputs,
            inputs=[tensor],
        )
        t0 = time.perf_counter()
        try:
            reply = await call.async_exec()
        except BaseException:
            self.policy.finished(admission, failed=True)
            raise
        failed = reply.has_error()
        self.policy.finished(admission, failed=failed)
        if not failed and admission.raw_queue_ms == 0 and self.estimate.table:
            self.estimate.observe(admission.width, admission.batch_size, 1e3 * (time.perf_counter() - t0))
        return reply

    async def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        pending = []
        for i, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, self.input)
            try:
                entry, admission = self._admit(request, tensor)
            except ValueError as err:  # a RouteError, or parameters that are not JSON
                responses[i] = _error(str(err), invalid=True)
                continue
            pending.append((i, entry, admission, self._run(entry, admission, tensor)))
        replies = await asyncio.gather(*(p[3] for p in pending))
        for (i, entry, admission, _), reply in zip(pending, replies):
            if reply.has_error():
                where = f"{self.model} version {entry['version']} (width {float(entry['width']):g})"
                responses[i] = _error(f"{where}: {reply.error().message()}")
            else:
                responses[i] = _response(reply.output_tensors(), entry, admission.batch_size)
        return responses


def _batch_size(tensor: Any) -> int:
    """The batch dimension of a Triton input tensor (1 for a tensor without one)."""
    shape = tensor.shape() if callable(getattr(tensor, "shape", None)) else tensor.as_numpy().shape
    return int(shape[0]) if len(shape) else 1
