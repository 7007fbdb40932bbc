"""Helpers shared by the sub-commands: parsing widths, printing tables, writing JSON."""

from __future__ import annotations

import argparse
import errno
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def parse_widths(text: str | None) -> tuple[float, ...] | None:
    """``"0.25,0.5,1.0"`` → ``(0.25, 0.5, 1.0)``; ``None`` stays ``None``."""
    if text is None:
        return None
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError as err:
        raise ValueError(f"--widths {text!r}: give comma-separated numbers such as 0.25,0.5,1.0") from err


def positive_int(text: str) -> int:
    """argparse ``type``: an integer >= 1 (image sides, batch sizes, counts), refused in one line otherwise."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse ``type``: an integer >= 0 (0 usually skips: ``--latency-runs 0``, ``--workers 0``)."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
    return value


def non_negative_float(text: str) -> float:
    """argparse ``type``: a finite number >= 0 (a wait that may be zero)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0")
    return value


def positive_float(text: str) -> float:
    """argparse ``type``: a finite number > 0 (seconds, minutes)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number > 0")
    return value


_OS_ERROR_FIXES = {
    errno.ENOSPC: "free disk space or write elsewhere (files saved before, such as last.pt, are intact)",
    errno.EDQUOT: "free space in your quota or write elsewhere (files saved before, such as last.pt, are intact)",
    errno.EACCES: "choose a folder you can write to (--out) or fix its permissions",
    errno.EPERM: "choose a folder you can write to (--out) or fix its permissions",
    errno.EROFS: "the file system is read-only; choose another folder (--out)",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "the path is a folder; give a file path",
    errno.EADDRINUSE: "another process uses this port; pick another with --port or stop it",
    errno.EADDRNOTAVAIL: "the address is not on this machine; use 127.0.0.1",
}


def describe_os_error(err: OSError) -> str:
    """One line for an operating-system error: what failed, on which path, and what to do."""
    what = err.strerror or str(err) or type(err).__name__
    if err.filename:
        what = f"{err.filename}: {what}"
    fix = _OS_ERROR_FIXES.get(err.errno or 0)
    return what + (f"; {fix}" if fix else "")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain-text table with right-aligned columns."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.1f}"
    return "-" if v is None else str(v)


def format_report_table(rows: Sequence[dict[str, Any]]) -> str:
    """The per-width table of a training or evaluation report (rows of ``final_metrics.json``), as the task whose
    metric the rows carry lays it out (top-1 for classifiers, AP per IoU type for detectors, ...)."""
    from ..tasks import task_for_rows

    headers, cells = task_for_rows(rows).table(rows)
    return format_table(headers, cells)


def print_outputs(out_dir: Path, tensorboard: bool = True) -> None:
    """Where a training run's outputs are."""
    print(f"\noutputs in {out_dir}:")
    print(f"  best checkpoint  {out_dir / 'best.pt'}")
    print(f"  last checkpoint  {out_dir / 'last.pt'}")
    print(f"  metrics          {out_dir / 'final_metrics.json'} (.csv), {out_dir / 'history.json'}")
    print(f"  plot             {out_dir / 'accuracy_vs_macs.png'} (the task's metric vs MACs per width)")
    if tensorboard and (out_dir / "tb").exists():
        print(f"  TensorBoard      tensorboard --logdir {out_dir / 'tb'}")
