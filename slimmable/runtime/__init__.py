"""Run-time width switching: :class:`SlimmableRunner` picks the widest width that fits a latency budget;
:func:`retain_freed_memory` tunes glibc's allocator for CPU inference."""

from .allocator import freed_memory_retained, retain_freed_memory
from .runner import RunResult, SlimmableRunner

__all__ = ["RunResult", "SlimmableRunner", "freed_memory_retained", "retain_freed_memory"]
