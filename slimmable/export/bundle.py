"""All widths in one folder: an ONNX file per width plus ``manifest.json`` with MACs and measured latency."""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..search.cost import count_macs, measure_latency
from ._io import model_label, sha256_file, width_tag, write_json
from .dense import default_widths, example_input, export_width, input_shape
from .formats import INPUT_NAME, OUTPUT_NAME, export_onnx, ort_session

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
    opset: int | None = None,
    exporter: str = "auto",
    latency_batch_size: int = 1,
    latency_runs: int = 20,
) -> Path:
    """Export every width of ``model`` to ONNX in ``out_dir`` and write ``manifest.json`` describing them.

    Files are named ``<name>_w<width>.onnx`` (e.g. ``slim_mobilenet_v2_w0.35.onnx``); each is verified with
    onnxruntime at batches 1 and 3. The manifest lists, per width: file, SHA-256, MACs per image, parameters,
    the largest difference to PyTorch, and the median latency of onnxruntime and of the PyTorch dense module on
    this machine at ``latency_batch_size``. Every file is written atomically; the manifest last.

    Args:
        model: a slimmable model.
        out_dir: the folder (created if missing).
        widths: widths to export (default: :func:`~slimmable.export.dense.default_widths`).
        name: file-name prefix (default: the model's registered name or class name).
        input_size: image side or ``(C, H, W)``.
        fold_bn: fold BN into convolutions (the usual choice for deployment).
        opset: ONNX opset (default: the exporter's).
        exporter: ONNX exporter, see :func:`~slimmable.export.formats.export_onnx`.
        latency_batch_size: batch size of the latency measurement.
        latency_runs: timed runs per width (0 skips latency).

    Returns:
        The manifest's path.
    """
    out = Path(out_dir)
    name = name or model_label(model)
    widths = tuple(float(w) for w in (widths if widths is not None else default_widths(model)))
    shape = input_shape(model, input_size)
    entries: list[dict[str, Any]] = []
    result = None
    for w in widths:
        dense = export_width(model, w, fold_bn=fold_bn)
        path = out / f"{name.replace('/', '_')}_{width_tag(w)}.onnx"  # torchvision/<arch>: one file, no folder
        result = export_onnx(dense, path, input_size=shape, opset=opset, exporter=exporter)
        x1 = example_input(dense, shape, 1)
        entry: dict[str, Any] = {
            "width": w,
            "file": path.name,
            "sha256": sha256_file(path),
            "bytes": path.stat().st_size,
            "macs": int(count_macs(dense, x1)),
            "params": int(sum(p.numel() for p in dense.parameters())),
            "max_abs_diff_vs_torch": result.max_abs_diff,
            "latency_ms": None,
        }
        if latency_runs > 0:
            xb = example_input(dense, shape, latency_batch_size)
            entry["latency_ms"] = {
                "onnxruntime_cpu": round(_ort_latency(path, xb, latency_runs), 4),
                "torch_" + xb.device.type: round(measure_latency(dense, xb, runs=latency_runs), 4),
            }
        entries.append(entry)
        _logger.info("bundle: width %g → %s", w, path.name)
    manifest = {
        "format_version": 1,
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
        "versions": {"torch": torch.__version__, "onnxruntime": _ort_version()},
        "widths": entries,
    }
    return write_json(out / MANIFEST_NAME, manifest)


def _ort_latency(path: Path, x: torch.Tensor, runs: int, warmup: int = 3) -> float:
    sess = ort_session(path)
    feed = {sess.get_inputs()[0].name: x.float().cpu().numpy()}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _ort_version() -> str | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    return ort.__version__
