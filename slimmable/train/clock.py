"""The speed of a training run as it goes: the seconds of its recent steps."""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable

__all__ = ["StepClock"]


class StepClock:
    """Seconds per training step from the last ``window`` steps (a median: robust to one slow step, and quick to
    follow a machine whose load changes).

    Args:
        window: steps remembered.
        clock: the timer (tests pass a fake one).
    """

    def __init__(self, window: int = 32, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self._times: deque[float] = deque(maxlen=window)
        self._last: float | None = None

    def start(self) -> None:
        """Mark the start of a step sequence (an epoch): the wait for its first batch counts toward its first step."""
        self._last = self.clock()

    def tick(self) -> None:
        """Mark the end of a step."""
        now = self.clock()
        if self._last is not None:
            self._times.append(now - self._last)
        self._last = now

    def __len__(self) -> int:
        return len(self._times)

    def seconds_per_step(self) -> float | None:
        """The median of the remembered steps, or ``None`` before the first."""
        return statistics.median(self._times) if self._times else None

    def deviates(self, expected: float | None, factor: float = 1.25, min_steps: int = 8) -> bool:
        """Whether the recent steps take more than ``factor`` times ``expected`` or less than ``1 / factor`` of it
        (the machine got busier or quieter than a plan assumed), once ``min_steps`` steps are remembered."""
        now = self.seconds_per_step()
        if expected is None or now is None or len(self._times) < min_steps or expected <= 0:
            return False
        return not expected / factor <= now <= expected * factor
