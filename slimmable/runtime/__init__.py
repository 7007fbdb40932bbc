"""Run-time width switching: :class:`SlimmableRunner` picks the widest width that fits a latency budget."""

from .runner import RunResult, SlimmableRunner

__all__ = ["RunResult", "SlimmableRunner"]
