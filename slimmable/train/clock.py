"""The speed of a training run as it goes: the seconds of its recent steps, and the thread count that runs them
fastest on a shared machine."""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from collections.abc import Callable

__all__ = ["StepClock", "ThreadGovernor"]

_logger = logging.getLogger(__name__)


class StepClock:
    """Seconds per training step from the last ``window`` steps: their mean without the slowest one. A time budget
    spends wall time, so on a machine that slows one step in three the plan must count them (a median did not: a
    shared run planned at its fast steps' 0.14-0.22 s while its epoch took 0.71 s a step); the slowest step is left
    out so that one stall does not cut the plan. Quick to follow a machine whose load changes.

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
        """The mean of the remembered steps without the slowest (of one step: itself), or ``None`` before the
        first."""
        if not self._times:
            return None
        if len(self._times) == 1:
            return self._times[0]
        return (sum(self._times) - max(self._times)) / (len(self._times) - 1)

    def last(self) -> float | None:
        """The seconds of the last step, or ``None`` before the first."""
        return self._times[-1] if self._times else None

    def recent_median(self, n: int) -> float | None:
        """The median of the last ``n`` steps, or ``None`` before ``n`` steps are remembered."""
        if len(self._times) < n:
            return None
        return statistics.median(list(self._times)[-n:])

    def deviates(self, expected: float | None, factor: float = 1.25, min_steps: int = 8) -> bool:
        """Whether the recent steps take more than ``factor`` times ``expected`` or less than ``1 / factor`` of it
        (the machine got busier or quieter than a plan assumed), once ``min_steps`` steps are remembered."""
        now = self.seconds_per_step()
        if expected is None or now is None or len(self._times) < min_steps or expected <= 0:
            return False
        return not expected / factor <= now <= expected * factor


class ThreadGovernor:
    """Moves a CPU run between its full thread count and half of it, whichever runs the steps faster now.

    On a machine shared with another busy process, a 2-thread step of the main job's model took 19x its quiet time
    (2.1 s instead of 0.11 s: each parallel region waits for the thread whose core is taken) while one thread ran it
    in 0.17 s. So a time-budgeted run tries the other setting now and then, on its real steps: ``trial_steps`` steps
    at the other count (ended at once by a step 3x slower than before), then it keeps whichever median was at least
    10% faster. A trial comes at once when the steps
    get ``slow`` times slower than the best seen at the current count, else after ``retry_seconds``, doubled after
    every trial that changed nothing (at most ``max_retry_seconds``), so a quiet run loses about 1% to trials.

    Args:
        threads: the full thread count (``torch.get_num_threads()``).
        clock: the timer.
        set_threads: applies a thread count (default ``torch.set_num_threads``).
    """

    def __init__(
        self,
        threads: int,
        clock: Callable[[], float] = time.perf_counter,
        set_threads: Callable[[int], None] | None = None,
        *,
        trial_steps: int = 8,
        slow: float = 1.5,
        retry_seconds: float = 15.0,
        max_retry_seconds: float = 60.0,
    ) -> None:
        import torch

        self.full, self.current = threads, threads
        self.clock, self.set_threads = clock, set_threads or torch.set_num_threads
        self.trial_steps, self.slow = trial_steps, slow
        self.retry, self.min_retry, self.max_retry = retry_seconds, retry_seconds, max_retry_seconds
        self.best: dict[int, float] = {}
        self._trial: tuple[int, float, int] | None = None  # (threads before, their median, step at the switch)
        self._next = clock()  # the first trial comes early: a run may start on a busy machine
        self._since = 0  # steps at the current count
        #: ``(step, from, to, seconds per step before, after)`` of every kept change
        self.changes: list[tuple[int, int, int, float, float]] = []

    def restore(self) -> None:
        """Back to the full thread count (training is over: evaluation and latency use every thread)."""
        if self.current != self.full:
            self._switch(self.full)
        self._trial = None

    def _other(self) -> int:
        return max(1, self.full // 2) if self.current == self.full else self.full

    def _switch(self, n: int) -> None:
        self.current = n
        self.set_threads(n)
        self._since = 0

    def update(self, step: int, step_clock: StepClock, steps: int = 1) -> None:
        """After ``steps`` more training steps (``step``: the run's step count): end a trial or start one."""
        self._since += steps
        if self.full < 2:
            return
        if self._trial is not None:
            before, before_med, _ = self._trial
            last = step_clock.last()
            clearly_slower = last is not None and last > 3 * before_med  # end it at once: a slow step costs
            if not clearly_slower and self._since < self.trial_steps:
                return
            now_med = step_clock.recent_median(min(self._since, self.trial_steps))
            self._trial = None
            if not clearly_slower and now_med is not None and now_med * 1.1 < before_med:  # faster: keep it
                self.changes.append((step, before, self.current, before_med, now_med))
                self.retry = self.min_retry
                _logger.warning(
                    "threads: %d instead of %d from step %d: steps take %.3f s instead of %.3f s (%s)",
                    self.current, before, step, now_med, before_med,
                    "the machine is shared" if self.current < before else "the machine is quiet again",
                )  # fmt: skip
            else:
                self._switch(before)
                self.retry = min(self.max_retry, self.retry * 2)
            self._next = self.clock() + self.retry
            return
        if self._since < self.trial_steps:
            return
        now_med = step_clock.recent_median(self.trial_steps)
        if now_med is None:
            return
        best = self.best.get(self.current)
        self.best[self.current] = now_med if best is None else min(best, now_med)
        slowed = best is not None and now_med > self.slow * best
        if slowed or self.clock() >= self._next:
            if slowed:
                self.retry = self.min_retry
            self._trial = (self.current, now_med, step)
            self._switch(self._other())
