"""Width policies: the width a request with a latency budget runs at, given the requests ahead of it.

A request's latency budget counts from its arrival, so what must fit is its *completion time*: the time it has
already spent (decoding, say), plus the time it waits behind the requests admitted before it, plus its own forward
pass. :class:`LoadAwarePolicy` predicts all three and picks the widest width that fits; :class:`StaticPolicy` keeps
the runner's original rule, the widest width whose own predicted latency fits, whatever the queue.

The queue model. Every request the runner admits (budgeted or at a pinned width) is recorded with its predicted
service time (the runner's drift-adjusted latency estimate for its width and batch size). The work ahead of a new
request is the predicted service of every admitted request still waiting for a slot, plus the predicted remainder
of every request already running (its prediction minus the time it has run, at least 0). Divided by the runner's
parallelism (its ``max_concurrency`` slots, 1 without a limit), that is the predicted queueing delay, a fluid
approximation: ``P`` slots work off ``P`` milliseconds of predicted work per millisecond.

Sustained load. A request that fits its own budget can still make the requests after it miss theirs: when
requests arrive faster than the chosen width serves them, the queue grows whatever each one predicts for itself.
So :class:`LoadAwarePolicy` also measures the arrival rate (requests per second over the last ``rate_window_s``,
arrival = admission minus the time already waited) and keeps to widths the runner can sustain at that rate: the
predicted utilisation ``rate x service / parallelism`` at most ``utilization`` (default 0.8). A burst then still
finds the queue short, and a rise of the load moves the width down before the queue has built up.

Tails. The estimates are means (a calibrated median, corrected by moving averages), and a request that fits its
budget on average misses it whenever its pass or its wait runs long: on a shared machine, one request in ten or
twenty. So every finished request also records how its time in the runner compared with what was predicted at
its admission (observed / predicted), and :class:`LoadAwarePolicy` scales its predictions by a high quantile of
the last 200 such ratios (``tail_quantile``, default 0.99; at least 1): the noisier the machine, the more room a
width must leave.

Online correction. The service estimates already follow the runner's drift factor (measured / calibrated
latency). The queueing model is corrected separately: when a request that had work ahead of it finishes, its
observed queueing delay (its time in the runner minus its predicted service) and the delay the model predicted
feed two exponential moving averages, and the predicted delay is multiplied by their ratio (the *queue factor*).
It absorbs what the fluid model gets wrong: slots that overlap on shared cores (slower passes), a model that is
slower alone than in company, a scheduler that is not first come first served.

Bookkeeping. :meth:`WidthPolicy.choose` (or :meth:`~WidthPolicy.admit`, for a pinned width) admits a request and
returns its :class:`Admission`; :meth:`~WidthPolicy.started` marks it running (it got a slot) and
:meth:`~WidthPolicy.finished` removes it, with ``failed=True`` when it raised (no correction is learnt from it).
Requests may finish in any order; finishing twice is a no-op. Every method is thread-safe: one lock guards the
admitted requests and the correction, and a choice and its admission are one atomic step, so two requests arriving
together each see the other.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "POLICIES",
    "Admission",
    "LoadAwarePolicy",
    "StaticPolicy",
    "WidthPolicy",
    "interpolate_latency",
    "make_policy",
]

#: the queue factor (observed / predicted queueing delay) stays in this range
QUEUE_FACTOR_RANGE = (0.05, 20.0)
#: one observation of queueing delay counts as at most this many times its prediction (one GC pause must not
#: dominate the moving average)
_SAMPLE_CLIP = 10.0


@dataclass(eq=False)
class Admission:
    """One request admitted by a :class:`WidthPolicy`: the width it runs at and what the policy predicted.

    Attributes:
        width: the width chosen (or pinned).
        batch_size: the request's batch size.
        budget_ms: the request's latency budget, counted from its arrival (``None``: a pinned width).
        waited_ms: time the request had spent before it reached the policy (e.g. decoding), in ms.
        service_ms: predicted forward-pass time at ``width`` when admitted (drift included).
        queue_ms: predicted queueing delay when admitted (the queue factor applied).
        raw_queue_ms: the same before the queue factor (what the correction compares observations with).
        admitted_at: clock time of admission, in seconds.
        started_at: clock time the request got a slot (``None`` until :meth:`WidthPolicy.started`).
        finished_at: clock time it finished (``None`` until :meth:`WidthPolicy.finished`).
    """

    width: float
    batch_size: int
    budget_ms: float | None
    waited_ms: float
    service_ms: float
    queue_ms: float
    raw_queue_ms: float
    admitted_at: float
    started_at: float | None = field(default=None)
    finished_at: float | None = field(default=None)

    @property
    def predicted_total_ms(self) -> float:
        """Predicted time from arrival to the end of the forward pass: waited + queueing + service."""
        return self.waited_ms + self.queue_ms + self.service_ms

    @property
    def predicted_met(self) -> bool | None:
        """Whether the prediction fitted the budget (``None`` without a budget)."""
        return None if self.budget_ms is None else self.predicted_total_ms <= self.budget_ms


class WidthPolicy:
    """Bookkeeping of the admitted requests and their predicted queue; subclasses decide the width.

    Args:
        widths: the served widths.
        estimate: ``estimate(width, batch_size) -> ms``, the predicted forward-pass time now (the runner passes
            :meth:`SlimmableRunner.estimate`, drift included).
        parallelism: forward passes that run at once (the runner's ``max_concurrency``; 1 without a limit).
        alpha: weight of each new observation in the queue factor's moving averages, in (0, 1].
        clock: a ``perf_counter``-like function returning seconds (tests inject a fake clock).

    Raises:
        ValueError: no widths, ``parallelism`` below 1, or ``alpha`` outside (0, 1].
    """

    #: the name :func:`make_policy` knows the policy by
    name = "width_policy"

    def __init__(
        self,
        widths: Sequence[float],
        estimate: Callable[[float, int], float],
        *,
        parallelism: int = 1,
        alpha: float = 0.2,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        ws = sorted({float(w) for w in widths})
        if not ws:
            raise ValueError("a width policy needs at least one width, e.g. widths=(0.5, 1.0)")
        if isinstance(parallelism, bool) or not isinstance(parallelism, int) or parallelism < 1:
            raise ValueError(f"parallelism {parallelism!r} must be a positive int (the forward passes run at once)")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha {alpha!r} must be in (0, 1], e.g. 0.2")
        self._widths = tuple(ws)
        self._estimate = estimate
        self.parallelism = parallelism
        self.alpha = float(alpha)
        self._clock = clock
        self._lock = threading.Lock()
        self._active: dict[Admission, None] = {}  # admitted, not finished, in admission order
        self._observed_ewma: float | None = None
        self._predicted_ewma: float | None = None
        self._factor = 1.0
        self._observations = 0
        self._arrivals: deque[float] = deque()  # clock times of recent arrivals (see _arrival_rate)
        self._ratios: deque[float] = deque(maxlen=self.tail_window)  # observed / predicted time in the runner
        self._tail = 1.0

    # ------------------------------------------------------------------ state

    @property
    def widths(self) -> tuple[float, ...]:
        """The widths the policy chooses from, ascending."""
        return self._widths

    @property
    def queue_factor(self) -> float:
        """Observed / predicted queueing delay, as corrected online (1.0 until a request with work ahead finishes)."""
        return self._factor

    def predicted_queue_ms(self, now: float | None = None) -> float:
        """The queueing delay a request admitted now would be predicted to wait (the queue factor applied), ms."""
        with self._lock:
            return self._raw_queue_ms(self._now(now)) * self._factor

    def stats(self, now: float | None = None) -> dict[str, Any]:
        """A JSON-ready snapshot: policy name, requests running and waiting, predicted queue, queue factor."""
        with self._lock:
            t = self._now(now)
            running = sum(1 for a in self._active if a.started_at is not None)
            return {
                "policy": self.name,
                "parallelism": self.parallelism,
                "running": running,
                "waiting": len(self._active) - running,
                "predicted_queue_ms": round(self._raw_queue_ms(t) * self._factor, 4),
                "queue_factor": round(self._factor, 4),
                "queue_observations": self._observations,
                "arrival_rate_per_s": round(self._arrival_rate(t), 3),
                "tail_factor": round(self._tail, 4),
            }

    def reset_correction(self) -> None:
        """Forget the learnt queue factor (back to 1.0) and the recent arrivals; the admitted requests stay."""
        with self._lock:
            self._observed_ewma = self._predicted_ewma = None
            self._factor = 1.0
            self._observations = 0
            self._arrivals.clear()
            self._ratios.clear()
            self._tail = 1.0

    # ------------------------------------------------------------------ admission

    def choose(
        self, budget_ms: float, batch_size: int = 1, *, waited_ms: float = 0.0, now: float | None = None
    ) -> Admission:
        """Choose the width for a request with a latency budget, and admit it.

        Never refuses: when no width fits, the fastest (narrowest) width runs and the admission's
        :attr:`~Admission.predicted_met` is ``False``.

        Args:
            budget_ms: the budget in ms, counted from the request's arrival.
            batch_size: its batch size.
            waited_ms: ms the request has already spent since it arrived (e.g. decoding), taken off the budget by
                the load-aware policy.
            now: the clock time (default: read the clock).

        Returns:
            The :class:`Admission`; pass it to :meth:`started` and :meth:`finished`.

        Raises:
            ValueError: ``budget_ms`` is not a positive finite number, or ``waited_ms`` not a non-negative one.
        """
        budget = _number(budget_ms, "budget_ms", "10.0", positive=True)
        waited = _number(waited_ms, "waited_ms", "0.0", positive=False)
        service = self._service(batch_size)
        with self._lock:
            t = self._now(now)
            raw = self._raw_queue_ms(t)
            queue = raw * self._factor
            self._arrived(t - waited / 1e3)
            width = self._pick(budget, waited, queue, service, self._arrival_rate(t))
            return self._admit(width, batch_size, budget, waited, service[width], queue, raw, t)

    def admit(
        self, width: float, batch_size: int = 1, *, waited_ms: float = 0.0, now: float | None = None
    ) -> Admission:
        """Admit a request at a pinned width (it adds to the queue the budgeted requests after it see).

        Raises:
            ValueError: ``width`` is not one of :attr:`widths`, or ``waited_ms`` is not a non-negative number.
        """
        w = float(width)
        if w not in self._widths:
            raise ValueError(f"width {width!r} is not one of the policy's widths {list(self._widths)}; use one of them")
        waited = _number(waited_ms, "waited_ms", "0.0", positive=False)
        service = float(self._estimate(w, batch_size))
        with self._lock:
            t = self._now(now)
            raw = self._raw_queue_ms(t)
            self._arrived(t - waited / 1e3)
            return self._admit(w, batch_size, None, waited, service, raw * self._factor, raw, t)

    def started(self, admission: Admission, now: float | None = None) -> None:
        """Mark ``admission`` as running (it got a slot); a finished or already started one is left as it is."""
        with self._lock:
            if admission in self._active and admission.started_at is None:
                admission.started_at = self._now(now)

    def finished(self, admission: Admission, now: float | None = None, *, failed: bool = False) -> bool:
        """Remove ``admission`` from the queue and, unless it ``failed``, learn from its queueing delay.

        Args:
            admission: from :meth:`choose` or :meth:`admit`.
            now: the clock time it finished (default: read the clock).
            failed: it raised (or never ran): remove it without learning from it.

        Returns:
            Whether it was still admitted (``False``: already finished, or another policy's).
        """
        with self._lock:
            if admission not in self._active:
                return False
            del self._active[admission]
            t = self._now(now)
            admission.finished_at = t
            if failed:
                return True
            if admission.raw_queue_ms > 0:
                observed = 1e3 * (t - admission.admitted_at) - admission.service_ms
                self._learn(min(max(observed, 0.0), _SAMPLE_CLIP * admission.raw_queue_ms), admission.raw_queue_ms)
            predicted = admission.queue_ms + admission.service_ms
            if predicted > 0:
                self._ratios.append(1e3 * (t - admission.admitted_at) / predicted)
                self._tail = self._ratio_quantile()
            return True

    #: finished requests whose observed / predicted ratios the tail factor reads
    tail_window = 200
    #: the tail factor counts once this many ratios are known (1.0 before)
    tail_min_samples = 20
    #: the quantile of the ratios the tail factor is (see :class:`LoadAwarePolicy`); ``None``: none, factor 1
    tail_quantile: float | None = None

    @property
    def tail_factor(self) -> float:
        """The factor the load-aware policy scales predictions by: the ``tail_quantile`` of recent observed /
        predicted ratios, between 1 and ``_SAMPLE_CLIP`` (1.0 without a quantile or with too few samples)."""
        return self._tail

    def _ratio_quantile(self) -> float:
        if self.tail_quantile is None or len(self._ratios) < self.tail_min_samples:
            return 1.0
        ordered = sorted(self._ratios)
        q = ordered[min(int(self.tail_quantile * len(ordered)), len(ordered) - 1)]
        return min(max(q, 1.0), _SAMPLE_CLIP)

    # ------------------------------------------------------------------ internals (the lock is held)

    def _pick(
        self, budget_ms: float, waited_ms: float, queue_ms: float, service: Mapping[float, float], rate: float
    ) -> float:
        """The width for a request: ``rate`` is the recent arrival rate per second (0 until measured)."""
        raise NotImplementedError

    #: the arrival rate counts the arrivals of the last this many seconds
    rate_window_s = 1.0

    def _arrived(self, at: float) -> None:
        self._arrivals.append(at)
        while self._arrivals and self._arrivals[0] < at - 2 * self.rate_window_s:
            self._arrivals.popleft()

    def _arrival_rate(self, now: float) -> float:
        """Arrivals per second: those within ``rate_window_s`` before ``now``, over the window (a burst at start-up
        counts as spread over the window rather than as an infinite rate)."""
        return sum(1 for a in self._arrivals if a > now - self.rate_window_s) / self.rate_window_s

    def _service(self, batch_size: int) -> dict[float, float]:
        return {w: float(self._estimate(w, batch_size)) for w in self._widths}

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else float(now)

    def _raw_queue_ms(self, now: float) -> float:
        work = 0.0
        for a in self._active:
            if a.started_at is None:
                work += a.service_ms
            else:
                work += max(a.service_ms - 1e3 * (now - a.started_at), 0.0)
        return work / self.parallelism

    def _admit(
        self,
        width: float,
        batch_size: int,
        budget: float | None,
        waited: float,
        service: float,
        queue: float,
        raw: float,
        now: float,
    ) -> Admission:
        a = Admission(width, int(batch_size), budget, waited, service, queue, raw, now)
        self._active[a] = None
        return a

    def _learn(self, observed_ms: float, predicted_ms: float) -> None:
        if self._observed_ewma is None or self._predicted_ewma is None:
            self._observed_ewma, self._predicted_ewma = observed_ms, predicted_ms
        else:
            self._observed_ewma += self.alpha * (observed_ms - self._observed_ewma)
            self._predicted_ewma += self.alpha * (predicted_ms - self._predicted_ewma)
        lo, hi = QUEUE_FACTOR_RANGE
        self._factor = min(max(self._observed_ewma / self._predicted_ewma, lo), hi)
        self._observations += 1


class StaticPolicy(WidthPolicy):
    """The widest width whose own predicted latency fits the budget, ignoring the queue and the time already waited
    (the runner's original rule). Requests are still recorded, so the predicted queue is reported."""

    name = "static"

    def _pick(
        self, budget_ms: float, waited_ms: float, queue_ms: float, service: Mapping[float, float], rate: float
    ) -> float:
        return _widest_within(budget_ms, service)


class LoadAwarePolicy(WidthPolicy):
    """The widest width whose predicted completion fits the budget (time already waited, plus the predicted queueing
    delay behind the admitted requests, plus its own predicted service) and that the runner sustains at the recent
    arrival rate (utilisation ``rate x service / parallelism`` at most ``utilization``). With an empty queue, nothing
    waited and no measured rate it chooses as :class:`StaticPolicy` does.

    Args:
        utilization: the highest predicted utilisation a width may run at, in (0, 1] (default 0.8: queues stay
            short under Poisson arrivals; 1.0 only refuses widths that cannot keep up at all); ``None``: no rate
            limit, the queue ahead alone decides.
        tail_quantile: predictions are scaled by this quantile of the recent observed / predicted ratios (default
            0.99: about one request in a hundred runs longer than the margin allows), at least 1; ``None``: the
            means alone.
        **kwargs: as :class:`WidthPolicy`.

    Raises:
        ValueError: ``utilization`` or ``tail_quantile`` outside (0, 1], or as :class:`WidthPolicy`.
    """

    name = "load_aware"

    def __init__(
        self, widths: Sequence[float], estimate: Callable[[float, int], float], *,
        utilization: float | None = 0.8, tail_quantile: float | None = 0.99, **kwargs: Any,
    ) -> None:  # fmt: skip
        for name, value, example in (("utilization", utilization, 0.8), ("tail_quantile", tail_quantile, 0.99)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1
            ):
                raise ValueError(f"{name} {value!r} must be in (0, 1] (e.g. {example}), or None for none")
        super().__init__(widths, estimate, **kwargs)
        self.utilization = None if utilization is None else float(utilization)
        self.tail_quantile = None if tail_quantile is None else float(tail_quantile)

    def _pick(
        self, budget_ms: float, waited_ms: float, queue_ms: float, service: Mapping[float, float], rate: float
    ) -> float:
        # completion = waited + tail x (queue + service) must fit: the measured wait is exact, the predictions not
        limit = (budget_ms - waited_ms) / self._tail - queue_ms
        if self.utilization is None:
            return _widest_within(limit, service)
        # a width the runner sustains at the recent rate: rate/s x ms/request / 1000 x 1/parallelism <= utilization
        sustained = {w: ms for w, ms in service.items() if rate * ms / (1e3 * self.parallelism) <= self.utilization}
        return _widest_within(limit, sustained or {min(service, key=lambda w: (service[w], w)): 0.0})


#: the policies by name (``SlimmableRunner(policy=NAME)``)
POLICIES: dict[str, type[WidthPolicy]] = {"load_aware": LoadAwarePolicy, "static": StaticPolicy}


def make_policy(
    name: str,
    widths: Sequence[float],
    estimate: Callable[[float, int], float],
    **kwargs: Any,
) -> WidthPolicy:
    """The policy called ``name`` (a key of :data:`POLICIES`), built with the other arguments.

    Raises:
        ValueError: an unknown name.
    """
    cls = POLICIES.get(name)
    if cls is None:
        known = ", ".join(repr(n) for n in POLICIES)
        raise ValueError(f"width policy {name!r} is not known; use one of {known} (default 'load_aware')")
    return cls(widths, estimate, **kwargs)


def interpolate_latency(points: Mapping[int, float], batch_size: int) -> float:
    """A latency (ms) at ``batch_size`` from those measured at other batch sizes (``{batch: ms}``, not empty): the
    measured one, else a line through the two nearest (at least a tenth of the smaller), or in proportion to the
    batch size when one was measured. The runner's calibration and the Triton router both estimate with it."""
    if batch_size in points:
        return points[batch_size]
    sizes = sorted(points)
    if len(sizes) == 1:
        b0 = sizes[0]
        return points[b0] * batch_size / b0
    lo, hi = sorted(sorted(sizes, key=lambda s: (abs(s - batch_size), s))[:2])
    slope = (points[hi] - points[lo]) / (hi - lo)
    est = points[lo] + slope * (batch_size - lo)
    return max(est, 0.1 * min(points[lo], points[hi]))


def _widest_within(limit_ms: float, service: Mapping[float, float]) -> float:
    """The widest width whose service fits ``limit_ms``; else the fastest (the narrowest, in any measured table)."""
    for w in sorted(service, reverse=True):
        if service[w] <= limit_ms:
            return w
    return min(service, key=lambda w: (service[w], w))


def _number(value: Any, name: str, example: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of milliseconds such as {example}, got {value!r}")
    if (value <= 0) if positive else (value < 0):
        raise ValueError(f"{name} {value!r} must be {'positive' if positive else 'zero or more'} milliseconds")
    return float(value)
