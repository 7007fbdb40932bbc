"""Per-width report rows: accuracy and loss joined with cost (MACs, active parameters, latency); JSON and CSV."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .._utils import atomic_path, write_json, write_text
from ..search.cost import profile_widths
from .engine import WidthMetrics

__all__ = ["REPORT_COLUMNS", "plot_report", "width_report", "write_json", "write_report"]

REPORT_COLUMNS = ("width", "top1", "top5", "loss", "images", "macs", "params", "latency_ms")


def width_report(
    model: nn.Module,
    metrics: Sequence[WidthMetrics],
    input_shape: tuple[int, int, int],
    *,
    latency_runs: int = 10,
    latency_batch_size: int = 1,
) -> list[dict[str, Any]]:
    """Join evaluation metrics with each width's cost (:func:`slimmable.search.cost.profile_widths`).

    Args:
        model: the evaluated model (its width is restored).
        metrics: from :func:`slimmable.train.evaluate`.
        input_shape: ``(C, H, W)`` of one input image.
        latency_runs: timed forward passes per width on the model's device; 0 skips latency.
        latency_batch_size: batch size of the latency measurement.

    Returns:
        One dict per width with the keys of :data:`REPORT_COLUMNS` (MACs and parameters per image).
    """
    widths = [m.width for m in metrics]
    costs = profile_widths(model, input_shape, widths, batch_size=latency_batch_size, latency_runs=latency_runs)
    rows = []
    for m, c in zip(metrics, costs):
        row = m.to_dict()
        row.update(macs=c.macs, params=c.params, latency_ms=c.latency_ms)
        rows.append({k: row.get(k) for k in REPORT_COLUMNS})
    return rows


def write_report(
    stem: str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    meta: Mapping[str, Any] | None = None,
    columns: Sequence[str] = REPORT_COLUMNS,
) -> tuple[Path, Path]:
    """Write ``<stem>.json`` (``{"meta": ..., "widths": rows}``) and ``<stem>.csv`` (one line per width).

    Returns:
        The JSON and CSV paths.
    """
    stem = Path(stem)
    json_path = write_json(stem.with_suffix(".json"), {"meta": dict(meta or {}), "widths": list(rows)})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r.get(k) for k in columns})
    csv_path = write_text(stem.with_suffix(".csv"), buf.getvalue())
    return json_path, csv_path


def plot_report(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    title: str = "",
    metric: str = "top1",
    label: str = "test top-1 (%)",
) -> Path:
    """Plot a metric (default top-1 accuracy) against MACs per width (one point per width, annotated) to a PNG.

    Args:
        rows: report rows with ``width``, ``metric`` and ``macs`` (from :func:`width_report`).
        path: the PNG to write (atomically).
        title: plot title.
        metric, label: the row key plotted and its axis label.

    Returns:
        The PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    pts = sorted((r["macs"] / 1e6, r[metric], r["width"]) for r in rows)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
    for macs, value, width in pts:
        ax.annotate(f"{width:g}x", (macs, value), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set_xlabel("MACs per image (M)")
    ax.set_ylabel(label)
    ax.set_title(title or f"{label} vs MACs, one network at every width")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return Path(path)
