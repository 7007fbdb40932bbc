"""All widths in one folder: a file per width in any registered format plus ``manifest.json`` with MACs and
measured latency."""

from __future__ import annotations

import importlib
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..search.cost import count_macs, measure_latency
from ._io import INPUT_NAME, OUTPUT_NAME, model_label, sha256_file, width_tag, write_json
from .dense import default_widths, example_input, export_width, input_shape
from .registry import get_exporter

__all__ = ["MANIFEST_NAME", "export_bundle"]

_logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"


def export_bundle(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    widths: Sequence[float] | None = None,
    *,
    name: str | None = None,
    input_size: int | Sequence[int] = 224,
    fold_bn: bool = True,
    format: str = "onnx",
    opset: int | None = None,
    exporter: str = "auto",
    latency_batch_size: int = 1,
    latency_runs: int = 20,
    **opts: Any,
) -> Path:
    """Export every width of ``model`` in ``format`` to ``out_dir`` and write ``manifest.json`` describing them.

    Files are named ``<name>_w<width><suffix>`` (e.g. ``slim_mobilenet_v2_w0.35.onnx``); each is verified with its
    runtime at batches 1 and 3. The manifest records the format, and per width: format, file (and companion files
    such as OpenVINO's ``.bin``, with their SHA-256), SHA-256, bytes of all its files, MACs per image, parameters,
    the largest difference to PyTorch, and the median latency of the file's runtime and of the PyTorch dense
    module on this machine at ``latency_batch_size``. Every file is written atomically; the manifest last.

    Args:
        model: a slimmable model.
        out_dir: the folder (created if missing).
        widths: widths to export (default: :func:`~slimmable.export.dense.default_widths`).
        name: file-name prefix (default: the model's registered name or class name).
        input_size: image side or ``(C, H, W)``.
        fold_bn: fold BN into convolutions (the usual choice for deployment).
        format: a registered format (:func:`~slimmable.export.registry.list_exporters`).
        opset: ONNX opset (default: the exporter's); ONNX only.
        exporter: ONNX exporter, see :func:`~slimmable.export.formats.export_onnx`; ONNX only.
        latency_batch_size: batch size of the latency measurement.
        latency_runs: timed runs per width (0 skips latency).
        **opts: further options of the format's writer (OpenVINO: ``compress_to_fp16``).

    Returns:
        The manifest's path.

    Raises:
        ValueError: an unknown format, or ONNX options for another format.
        ImportError: the format's dependencies are missing (before any work).
    """
    target = get_exporter(format)
    if target.name == "onnx":
        opts = {"opset": opset, "exporter": exporter, **opts}
    elif opset is not None or exporter != "auto":
        raise ValueError(f"opset and exporter are ONNX options; the {target.title} format takes neither")
    target.require(verify=True)
    out = Path(out_dir)
    name = name or model_label(model)
    widths = tuple(float(w) for w in (widths if widths is not None else default_widths(model)))
    shape = input_shape(model, input_size)
    entries: list[dict[str, Any]] = []
    result = None
    latency_key = target.runtime.replace(".", "_") + "_cpu"  # onnxruntime_cpu, torch_jit_cpu, openvino_cpu...
    for w in widths:
        dense = export_width(model, w, fold_bn=fold_bn)
        path = out / f"{name.replace('/', '_')}_{width_tag(w)}{target.suffix}"  # torchvision/<arch>: no folder
        result = target.export(dense, path, input_size=shape, **opts)
        files = target.files(path)
        x1 = example_input(dense, shape, 1)
        entry: dict[str, Any] = {
            "width": w,
            "format": target.name,
            "file": path.name,
            "sha256": sha256_file(path),
            "bytes": sum(f.stat().st_size for f in files),
            "macs": int(count_macs(dense, x1)),
            "params": int(sum(p.numel() for p in dense.parameters())),
            "max_abs_diff_vs_torch": result.max_abs_diff,
            "latency_ms": None,
        }
        if len(files) > 1:
            entry["companions"] = [{"file": f.name, "sha256": sha256_file(f)} for f in files[1:]]
        if latency_runs > 0:
            xb = example_input(dense, shape, latency_batch_size)
            entry["latency_ms"] = {
                latency_key: round(_median_ms(target.load(path), xb, latency_runs), 4),
                "torch_" + xb.device.type: round(measure_latency(dense, xb, runs=latency_runs), 4),
            }
        entries.append(entry)
        _logger.info("bundle: width %g → %s", w, path.name)
    manifest = {
        "format_version": 1,
        "format": target.name,
        "model": name,
        "input": {"name": INPUT_NAME, "shape": ["batch", *shape], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", "num_classes"]},
        "exporter": result.exporter if result else None,
        "opset": result.opset if result else None,
        "fold_bn": fold_bn,
        "latency": {
            "batch_size": latency_batch_size,
            "runs": latency_runs,
            "statistic": "median",
            "torch_threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "processor": platform.processor() or None,
        },
        "versions": {
            "torch": torch.__version__,
            **{m: _version(m) for m in (*target.requires, *target.runtime_requires)},
        },
        "widths": entries,
    }
    return write_json(out / MANIFEST_NAME, manifest)


def _median_ms(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        run(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _version(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except (ImportError, AttributeError):
        return None
