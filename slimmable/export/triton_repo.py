"""A slimmable model as an NVIDIA Triton Inference Server model repository (``slimmable export --format triton``).

:func:`export_triton` writes two models into a repository folder::

    repo/
      <name>/                  the slimmable model: one version per width
        config.pbtxt           platform "onnxruntime_onnx" (or backend "python"), dynamic batching, all versions
        25/model.onnx          width 0.25 (version = width x 100, as slimmable serve's V2 versions; x 1000
                               or x 10000 when a width is finer: 0.0625 is version 625)
        50/model.onnx
        100/model.onnx         (+ model.py in each version with triton_backend="python")
      <name>_router/           picks a width per request and runs it on <name> through BLS
        config.pbtxt           backend "python"
        1/model.py             slimmable/export/triton_models/router.py, verbatim
        1/width_policy.py      slimmable/runtime/policy.py, verbatim: the router's load-aware width policy
        1/route.json           the versions, their widths, the latency measured here per width at batch 1 and
                               at max_batch_size, and the policy's settings

Every ``model.onnx`` is the ONNX writer's file (:func:`~slimmable.export.formats.export_onnx`: one input
``input``, one output, a dynamic batch), checked with onnxruntime against the slimmable model at its width. The
router takes the same input plus the optional request parameters ``width`` and ``latency_budget_ms`` (see
:mod:`slimmable.export.triton_models.router`). ``triton_backend="python"`` writes each width as a Python-backend
model that runs its ONNX file with onnxruntime, for Triton builds without the ONNX Runtime backend (the one that
``nvidia-pytriton`` bundles).

A repository is not a single file, so it is not an :class:`~slimmable.export.exporter.Exporter` of the registry
(which writes, loads and verifies one file per width): ``slimmable export --format triton`` calls
:func:`export_triton` directly. Classifiers (output ``logits``) and segmenters (output ``out``, their logits)
export; detectors do not.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._utils import TEMP_SUFFIX
from ..search.cost import count_macs
from ._io import INPUT_NAME, model_label, sha256_file, write_json
from .bundle import _median_ms
from .dense import default_widths, example_input, input_shape, prepare_dense
from .formats import ONNX, export_onnx, load_onnx
from .triton_models import source

__all__ = [
    "ROUTER_SUFFIX",
    "TRITON_BACKENDS",
    "TRITON_FORMAT",
    "TRITON_TASKS",
    "TritonRepository",
    "export_triton",
    "model_config",
    "read_route",
    "triton_version",
]

#: the ``--format`` value of a Triton repository
TRITON_FORMAT = "triton"
#: what runs each width: Triton's ONNX Runtime backend, or onnxruntime inside its Python backend
TRITON_BACKENDS = ("onnxruntime", "python")
#: the tasks whose models export (one tensor in, one tensor out)
TRITON_TASKS = ("classification", "segmentation")
#: the router model's name is the model's name plus this
ROUTER_SUFFIX = "_router"
#: the router's version (it has one)
ROUTER_VERSION = 1
ONNX_FILE = "model.onnx"
CONFIG_FILE = "config.pbtxt"
MODEL_PY = "model.py"
ROUTE_FILE = "route.json"
#: the router's second output: the width each item ran at (Triton's Python backend may not return response
#: parameters, so a client learns it from this tensor)
WIDTH_OUTPUT = "width"
#: the router's width policy, beside its model.py
POLICY_PY = "width_policy.py"


@dataclass(frozen=True)
class TritonRepository:
    """What :func:`export_triton` wrote.

    Attributes:
        path: the repository folder (``--model-repository``).
        model: the slimmable model's Triton name (its folder).
        router: the router model's name (``<model>_router``).
        versions: Triton version → width, narrowest first.
        backend: ``"onnxruntime"`` or ``"python"`` (what runs each width).
        max_abs_diff: version → the largest difference of its ONNX file to PyTorch (``None``: not verified).
        latency_ms: version → the latency of one image measured with onnxruntime here (``None``: not measured).
    """

    path: Path
    model: str
    router: str
    versions: dict[int, float]
    backend: str
    max_abs_diff: dict[int, float | None]
    latency_ms: dict[int, float | None]


#: the scales a repository's versions may use (width x scale), the smallest that makes every version an integer
VERSION_SCALES = (100, 1000, 10000)


def triton_version(width: float, scale: int = 100) -> int:
    """The Triton model version of ``width``: the width x ``scale``; with the default 100 (``0.25`` → ``25``,
    ``1.0`` → ``100``) the version ``slimmable serve`` gives it over V2.

    Raises:
        ValueError: the width x ``scale`` is not a positive integer (Triton versions are positive integers).
    """
    w = float(width)
    version = round(w * scale)
    if not (w > 0 and abs(w * scale - version) < 1e-6 and version >= 1):
        raise ValueError(
            f"width {w:g} has no Triton version: a version is the width x {scale} and must be a positive integer, "
            f"so Triton repositories take widths that are multiples of {1 / scale:g}; export such widths with "
            "--width (e.g. 0.25,0.5,1.0), or this one with --format onnx"
        )
    return version


def model_config(
    name: str,
    *,
    max_batch_size: int,
    input_dims: Sequence[int],
    output_name: str,
    output_dims: Sequence[int],
    platform: str | None = None,
    backend: str | None = None,
    all_versions: bool = True,
    dynamic_batching: bool = True,
    instance_kind: str | None = None,
    extra_outputs: Sequence[tuple[str, Sequence[int]]] = (),
) -> str:
    """A ``config.pbtxt`` (protobuf text of Triton's ``ModelConfig``) for a model with one FP32 input ``input``
    and one FP32 output; dims are without the batch dimension, which Triton adds (``max_batch_size`` >= 1).

    Args:
        name: the model's name (its folder's).
        max_batch_size: the largest batch Triton forms or accepts.
        input_dims: ``(C, H, W)``.
        output_name: the output's name.
        output_dims: the output's shape without the batch.
        platform: e.g. ``"onnxruntime_onnx"`` (exclusive with ``backend``).
        backend: e.g. ``"python"``.
        all_versions: serve every version (``version_policy: { all { } }``), not only the latest.
        dynamic_batching: let Triton batch requests together.
        instance_kind: one instance of this kind (``"KIND_CPU"``); ``None``: Triton's default instances.
        extra_outputs: more FP32 outputs, ``(name, dims)`` each (the router's ``width``).
    """
    if (platform is None) == (backend is None):
        raise ValueError("give exactly one of platform and backend")
    kind = f'platform: "{platform}"' if platform is not None else f'backend: "{backend}"'
    lines = [f'name: "{name}"', kind, f"max_batch_size: {int(max_batch_size)}"]
    if all_versions:
        lines.append("version_policy: { all { } }")
    lines += _tensor_block("input", INPUT_NAME, input_dims)
    lines += _tensor_block("output", output_name, output_dims)
    for extra, dims in extra_outputs:
        lines += _tensor_block("output", extra, dims)
    if instance_kind is not None:
        lines.append(f"instance_group [ {{ kind: {instance_kind} count: 1 }} ]")
    if dynamic_batching:
        lines.append("dynamic_batching { }")
    return "\n".join(lines) + "\n"


def _tensor_block(field: str, name: str, dims: Sequence[int]) -> list[str]:
    return [
        f"{field} [",
        "  {",
        f'    name: "{name}"',
        "    data_type: TYPE_FP32",
        f"    dims: [ {', '.join(str(int(d)) for d in dims)} ]",
        "  }",
        "]",
    ]


def export_triton(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    widths: Sequence[float] | None = None,
    *,
    name: str | None = None,
    input_size: int | Sequence[int] = 224,
    fold_bn: bool = True,
    triton_backend: str = "onnxruntime",
    max_batch_size: int = 8,
    opset: int | None = None,
    exporter: str = "auto",
    verify: bool = True,
    latency_runs: int = 20,
) -> TritonRepository:
    """Write ``model`` into the Triton model repository ``out_dir``: ``<name>`` with a version per width and the
    router ``<name>_router`` (see the module docstring).

    The two model folders are written into a temporary folder beside the repository and moved into it once
    complete (replacing earlier ones of the same names; other models stay); on error nothing is moved.

    Args:
        model: a slimmable classifier or segmenter.
        out_dir: the repository folder (created if missing; other models in it are left alone).
        widths: widths to export (default: :func:`~slimmable.export.dense.default_widths`), each a multiple of 0.01.
        name: the Triton model name (default: the model's registered name, ``/`` as ``_``).
        input_size: image side or ``(C, H, W)``.
        fold_bn: fold BN into convolutions.
        triton_backend: ``"onnxruntime"`` (``platform: "onnxruntime_onnx"``) or ``"python"`` (each width a
            Python-backend model running its ONNX file with onnxruntime).
        max_batch_size: the configs' ``max_batch_size`` (>= 1; the graphs' batch dimension is dynamic).
        opset: ONNX opset (default: the exporter's).
        exporter: ONNX exporter, see :func:`~slimmable.export.formats.export_onnx`.
        verify: check each ONNX file against the slimmable model with onnxruntime (batches 1 and 3).
        latency_runs: timed onnxruntime runs of one image per width, for the router's budgets (0: none; budgets
            are then refused by the router).

    Returns:
        A :class:`TritonRepository`.

    Raises:
        ValueError: a detector (or another task's model), a width that is not a multiple of 0.01, two widths with
            one version, a bad name, backend or batch size.
        ImportError: ``onnx`` (or ``onnxruntime``, to verify or time) is not installed (before any work).
        RuntimeError: an ONNX file differs from PyTorch.
    """
    from ..tasks import task_of

    task = task_of(model)
    if task.name not in TRITON_TASKS:
        raise ValueError(
            f"Triton repositories take classifiers and segmenters (one image tensor in, one tensor out); this is a "
            f"{task.name} model: export its widths with --format onnx (or --format pt) instead"
        )
    if triton_backend not in TRITON_BACKENDS:
        raise ValueError(f"triton_backend {triton_backend!r} is not one of {', '.join(TRITON_BACKENDS)}")
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(
            f"max_batch_size {max_batch_size!r} must be an integer >= 1 (the graphs' batch dimension is dynamic)"
        )
    if isinstance(latency_runs, bool) or not isinstance(latency_runs, int) or latency_runs < 0:
        raise ValueError(f"latency_runs {latency_runs!r} must be an integer >= 0 (0 skips the measurement)")
    name = _checked_name(name if name is not None else model_label(model).replace("/", "_"))
    router = name + ROUTER_SUFFIX
    widths = tuple(float(w) for w in (widths if widths is not None else default_widths(model)))
    versions = _versions(widths)
    ONNX.require(verify=verify or latency_runs > 0)
    shape = input_shape(model, input_size)
    output_name = task.output_names(model)[0]

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file; give a folder for the model repository (--out)")
    out.mkdir(parents=True, exist_ok=True)
    stage = _stage_folder(out, name)
    try:
        entries, output_dims = _write_versions(
            model,
            stage / name,
            versions,
            shape,
            output_name,
            fold_bn,
            triton_backend,
            opset,
            exporter,
            verify,
            latency_runs,
            max_batch_size,
        )
        kind = {"platform": "onnxruntime_onnx"} if triton_backend == "onnxruntime" else {"backend": "python"}
        config = model_config(
            name,
            max_batch_size=max_batch_size,
            input_dims=shape,
            output_name=output_name,
            output_dims=output_dims,
            **kind,
        )
        (stage / name / CONFIG_FILE).write_text(config, encoding="utf-8")
        _write_router(stage / router, name, output_name, shape, output_dims, max_batch_size, entries, latency_runs)
        _install(stage, out, (name, router))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return TritonRepository(
        path=out,
        model=name,
        router=router,
        versions=dict(versions),
        backend=triton_backend,
        max_abs_diff={e["version"]: e["max_abs_diff_vs_torch"] for e in entries},
        latency_ms={e["version"]: e["latency_ms"] for e in entries},
    )


def _checked_name(name: str) -> str:
    """A Triton model name: a folder name (the router's is ``name + "_router"``)."""
    bad = not name or name != name.strip() or name.startswith(".") or any(c in name for c in '/\\:*?"<>|')
    if bad or any(c.isspace() for c in name):
        raise ValueError(
            f"model name {name!r} cannot name a Triton model folder: give a name of letters, digits, '_', '-' or "
            "'.' (not first), e.g. --name mobilenet"
        )
    return name


def _versions(widths: Sequence[float]) -> dict[int, float]:
    """Version → width, narrowest first: width x 100, or x 1000 or x 10000 when a width is finer (the main job's
    0.0625 is version 625 and its 0.25 version 2500; ``route.json`` and the model metadata map them).

    Raises:
        ValueError: no widths, a width that is not a multiple of 0.0001, or two widths with one version.
    """
    if not widths:
        raise ValueError("no widths to export; give at least one, e.g. --width 0.5,1.0")

    def fits(scale: int) -> bool:
        return all(abs(w * scale - round(w * scale)) < 1e-6 for w in widths)

    scale = next((k for k in VERSION_SCALES if fits(k)), VERSION_SCALES[-1])  # the last one names the culprit
    versions: dict[int, float] = {}
    for w in sorted(widths):
        v = triton_version(w, scale)
        if v in versions and versions[v] != w:
            raise ValueError(f"widths {versions[v]:g} and {w:g} both have Triton version {v}; export one of them")
        versions[v] = w
    return versions


def _write_versions(
    model: nn.Module,
    folder: Path,
    versions: Mapping[int, float],
    shape: tuple[int, int, int],
    output_name: str,
    fold_bn: bool,
    backend: str,
    opset: int | None,
    exporter: str,
    verify: bool,
    latency_runs: int,
    max_batch_size: int,
) -> tuple[list[dict[str, Any]], tuple[int, ...]]:
    """Each width's ``<version>/model.onnx`` (and ``model.py``); returns the route entries and the output dims."""
    entries: list[dict[str, Any]] = []
    output_dims: tuple[int, ...] | None = None
    for version, w in versions.items():
        module = prepare_dense(model, width=w, fold_bn=fold_bn)  # exactly what the file computes
        vdir = folder / str(version)
        vdir.mkdir(parents=True)
        path = vdir / ONNX_FILE
        res = export_onnx(
            module, path, input_size=shape, opset=opset, exporter=exporter, verify=verify, output_name=output_name
        )
        if backend == "python":
            (vdir / MODEL_PY).write_text(source("onnx_model"), encoding="utf-8")
        x1 = example_input(module, shape, 1)
        with torch.no_grad():
            dims = tuple(int(d) for d in module.eval()(x1).shape[1:])
        if output_dims is not None and dims != output_dims:
            raise RuntimeError(f"width {w:g} gives outputs of shape {dims}, other widths {output_dims}")
        output_dims = dims
        by_batch: dict[str, float] = {}
        if latency_runs > 0:  # batch 1 and the largest batch: the router interpolates between them
            session = load_onnx(path)
            for b in sorted({1, max_batch_size}):
                xb = x1 if b == 1 else example_input(module, shape, b)
                by_batch[str(b)] = round(_median_ms(session, xb, latency_runs), 4)
        entries.append(
            {
                "version": version,
                "width": w,
                "latency_ms": by_batch.get("1"),
                "latency_ms_by_batch": by_batch or None,
                "macs": int(count_macs(module, x1)),
                "params": int(sum(p.numel() for p in module.parameters())),
                "max_abs_diff_vs_torch": res.max_abs_diff,
                "sha256": sha256_file(path),
            }
        )
    assert output_dims is not None
    return entries, output_dims


def _write_router(
    folder: Path,
    model: str,
    output_name: str,
    shape: Sequence[int],
    output_dims: Sequence[int],
    max_batch_size: int,
    entries: list[dict[str, Any]],
    latency_runs: int,
) -> None:
    """The router's ``config.pbtxt``, ``1/model.py`` and ``1/route.json``."""
    vdir = folder / str(ROUTER_VERSION)
    vdir.mkdir(parents=True)
    (vdir / MODEL_PY).write_text(source("router"), encoding="utf-8")
    (vdir / POLICY_PY).write_text(source("width_policy"), encoding="utf-8")
    route = {
        "format_version": 1,
        "model": model,
        "input": INPUT_NAME,
        "outputs": [output_name],
        "latency": {
            "what": "median onnxruntime CPU latency (ms) at export: latency_ms of one image, latency_ms_by_batch "
            "at batch 1 and max_batch_size (other batches interpolated); the router corrects them online by the "
            "ratio it observes, or replace them with the serving hardware's",
            "batch_sizes": sorted({1, max_batch_size}),
            "runs": latency_runs,
            "threads": torch.get_num_threads(),
        },
        "policy": {
            "what": "how latency_budget_ms picks the width (slimmable.runtime.policy, in width_policy.py): "
            "load_aware = the widest width whose predicted completion, behind the requests in flight, fits, and "
            "that the measured arrival rate keeps under utilization, its predictions scaled by the tail_quantile "
            "of recent observed / predicted times; static = the widest whose own latency fits; parallelism = "
            "requests the versions run at once",
            "name": "load_aware",
            "utilization": 0.8,
            "tail_quantile": 0.99,
            "parallelism": 1,
        },
        "versions": entries,
    }
    write_json(vdir / ROUTE_FILE, route)
    config = model_config(
        folder.name,
        backend="python",
        max_batch_size=max_batch_size,
        input_dims=shape,
        output_name=output_name,
        output_dims=output_dims,
        all_versions=False,
        instance_kind="KIND_CPU",  # it only forwards requests (asynchronously: one instance serves many)
        extra_outputs=[(WIDTH_OUTPUT, (1,))],
    )
    (folder / CONFIG_FILE).write_text(config, encoding="utf-8")


def _stage_folder(out: Path, name: str) -> Path:
    """A temporary folder to write the models into: beside the repository, so that a Triton polling it never sees
    a half-written model; inside it (hidden) when the repository is another file system (a mount point), where a
    folder beside it could not be renamed into it."""
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.{name}.", suffix=TEMP_SUFFIX, dir=out.resolve().parent))
    if stage.stat().st_dev == out.stat().st_dev:
        return stage
    shutil.rmtree(stage, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=TEMP_SUFFIX, dir=out))


def _install(stage: Path, out: Path, names: Sequence[str]) -> None:
    """Move the staged model folders into ``out``, each replacing an earlier folder of its name."""
    for n in names:
        dest = out / n
        if dest.exists():
            if not dest.is_dir():
                raise FileExistsError(f"{dest} is a file, not a model folder; remove it or choose another --name")
            old = stage / f".old.{n}"  # removed with the stage
            os.replace(dest, old)
            try:
                os.replace(stage / n, dest)
            except OSError:
                os.replace(old, dest)  # the earlier model stays in place
                raise
        else:
            os.replace(stage / n, dest)


def read_route(repository: str | os.PathLike[str], model: str) -> dict[str, Any]:
    """The routing table of ``model``'s router in a repository (``<model>_router/1/route.json``)."""
    path = Path(repository) / (model + ROUTER_SUFFIX) / str(ROUTER_VERSION) / ROUTE_FILE
    return json.loads(path.read_text(encoding="utf-8"))
