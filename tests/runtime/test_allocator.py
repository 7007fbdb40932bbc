"""retain_freed_memory: glibc stops handing freed activation memory back to the kernel (no page faults on reuse)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

_PROBE = """
import json, resource, sys, torch
from slimmable.runtime.allocator import freed_memory_retained, retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else None
faults = []
for _ in range(10):  # the allocation pattern of an inference loop: the same large activation, allocated and freed
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(12 << 20)  # 48 MB, above glibc's largest mmap threshold
    t.fill_(1.0)
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"applied": applied, "faults": faults, "retained": freed_memory_retained()}))
"""


def _probe(mode: str, env: dict[str, str] | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | (env or {})
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, timeout=120, env=env
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc-only"
)
def test_retain_freed_memory_stops_page_faults_on_reuse() -> None:
    default, retained = _probe("default"), _probe("retain")
    by_env = _probe("default", {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "2147483647"})
    pages = (12 << 20) * 4 // 4096
    # glibc's defaults map a fresh 48 MB block per allocation: every touch of it faults its pages in again.
    assert all(f >= pages // 2 for f in default["faults"]), default
    assert default["retained"] is False
    assert retained["applied"] is True and retained["retained"] is True
    # Retained: once the heap has grown to fit the pattern, the freed block is reused without a single fault. The
    # environment variables the docstring names do the same before start-up.
    for probe in (retained, by_env):
        assert sum(probe["faults"][-5:]) < pages // 100, probe
    assert by_env["retained"] is True


def test_retain_freed_memory_is_a_no_op_off_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    from slimmable.runtime import allocator

    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator.retain_freed_memory() is False
