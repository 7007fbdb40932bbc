"""Run-time width switching: :class:`SlimmableRunner` picks the widest width that fits a latency budget, the wait
behind the requests ahead included (:mod:`slimmable.runtime.policy`); :func:`retain_freed_memory` tunes glibc's
allocator for CPU inference."""

from .allocator import freed_memory_retained, retain_freed_memory
from .policy import Admission, LoadAwarePolicy, StaticPolicy, WidthPolicy
from .runner import AdmittedRequest, RunResult, SlimmableRunner

__all__ = [
    "Admission",
    "AdmittedRequest",
    "LoadAwarePolicy",
    "RunResult",
    "SlimmableRunner",
    "StaticPolicy",
    "WidthPolicy",
    "freed_memory_retained",
    "retain_freed_memory",
]
