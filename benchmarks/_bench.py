"""Shared by the benchmark scripts: the machine facts every result records, and the emulated AVX2 path.

CPUs differ: bf16 and channels-last are fast with AVX512-BF16/AMX and many times slower on AVX2-only CPUs. A
benchmark run with ``--avx2`` also runs itself in a child process under ``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2`` (PyTorch's and oneDNN's kernels limited to AVX2 on a newer CPU) and reports both paths.
"""

from __future__ import annotations

import heapq
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slimmable.hardware import describe_machine, machine_info
from slimmable.train.report import write_json as _write_json

__all__ = [
    "AVX2_ENV",
    "describe_machine",
    "emulating_avx2",
    "machine_info",
    "run_avx2_child",
    "schedule_seconds",
    "write_json",
]

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def emulating_avx2() -> bool:
    """Whether this process runs under the AVX2 emulation."""
    return all(os.environ.get(k, "").lower() == v.lower() for k, v in AVX2_ENV.items())


def run_avx2_child(script: str, argv: Sequence[str]) -> dict[str, Any]:
    """Run ``script argv --json TMP`` under the AVX2 emulation (its output streams through); return its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "avx2.json"
        cmd = [sys.executable, script, *argv, "--json", str(path)]
        env = " ".join(f"{k}={v}" for k, v in AVX2_ENV.items())
        print(f"\n--- the AVX2 path: {env} {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, env={**os.environ, **AVX2_ENV}, check=True)
        return json.loads(path.read_text())


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as JSON atomically (:func:`slimmable.train.report.write_json`) and say where."""
    print(f"wrote {_write_json(path, data)}")


def schedule_seconds(durations: Sequence[float], workers: int) -> float:
    """Wall seconds of jobs taken in the given order by ``workers`` workers, each job by the first one free."""
    free = [0.0] * workers
    for d in durations:
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free)
