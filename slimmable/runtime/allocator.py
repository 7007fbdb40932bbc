"""Opt-in tuning of the C allocator for CPU inference: :func:`retain_freed_memory`.

PyTorch allocates CPU tensors with the C library's ``malloc``. With glibc's defaults, blocks above a threshold
(128 kB, rising with the largest block freed, to at most 32 MB) are mapped fresh from the kernel on every
allocation and unmapped on free, and the top of the heap is returned to the kernel whenever more than twice that
threshold of it is free. An inference loop allocates and frees the
same activation sizes on every forward, so it pays for zero-filled fresh pages every time: tens of thousands of
page faults per forward. Measured on this project's 2-core machine (``benchmarks/RESULTS.md``, "Allocator"),
keeping freed memory makes torchvision's MobileNet v2 1.3-1.4x faster at batch 1 and 2.9x at batch 8.

It also decides how two equal models compare: which frees let glibc trim the heap depends on the exact order of
frees, so a model that frees one activation earlier can fault more and run 4-6% slower
(see :class:`~slimmable.models.resnet.SlimResNet`'s forward).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["freed_memory_retained", "retain_freed_memory"]

# mallopt() parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1

# Mirrors the C library's own process-wide setting (which cannot be read back), so that latency caches can tell
# measurements taken under the two allocators apart.
_applied = False


def retain_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse instead of handing it back to the kernel.

    Sets ``M_MMAP_MAX=0`` (large blocks come from the heap, where a freed block is reused, instead of a fresh
    mapping each time) and ``M_TRIM_THRESHOLD`` to 2 GiB, the largest ``mallopt`` takes (the heap top is trimmed
    only when that much of it is free). This is process-wide and cannot be undone; call it once at start-up of a
    process that serves or benchmarks models. The cost is memory: the process keeps its peak heap (the largest
    batch it has run) instead of shrinking after it.

    Threads other than the main one allocate from arenas of their own, which glibc still unmaps when one empties:
    there, large batches keep part of their page faults (``benchmarks/RESULTS.md``, "Allocator").

    The same settings can be given before start-up without code, as environment variables:
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``.

    Returns:
        ``True`` if applied; ``False`` if this C library is not glibc (macOS, Windows, musl), where nothing changes.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    global _applied
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and ok
    _applied = _applied or ok
    return ok


def freed_memory_retained() -> bool:
    """Whether this process retains freed memory: :func:`retain_freed_memory` was applied, or the equivalent
    ``MALLOC_MMAP_MAX_=0`` and a trim threshold of at least 2 GiB were set in the environment at start-up."""
    if _applied:
        return True
    try:
        trim = int(os.environ.get("MALLOC_TRIM_THRESHOLD_", "0"))
    except ValueError:
        return False
    return os.environ.get("MALLOC_MMAP_MAX_") == "0" and trim >= _TRIM_THRESHOLD
