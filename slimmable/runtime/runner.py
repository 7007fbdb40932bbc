"""Run-time width switching under a latency budget: :class:`SlimmableRunner`.

Design. A slimmable model keeps its width as module state, so two threads that want different widths at the
same time would overwrite each other's width. The runner therefore never switches a shared model: at start-up it
exports one dense copy per width (:func:`slimmable.export.export_width`, BN folded by default) and a call at
width ``w`` simply runs copy ``w``. The copies are read-only (eval mode, no parameter updates, no width state),
so any number of threads may call the runner at any widths concurrently and each gets exactly the output a
single thread would. Switching is a dictionary lookup (microseconds). The price is memory: the copies hold
about ``sum_w (params at w)`` instead of one full weight set (tensors that are identical in several copies, such
as an unslimmed classifier, are stored once); :meth:`SlimmableRunner.memory_bytes` reports both.

Latency. Start-up calibration measures the median latency of every width at each batch size (interleaved
rounds, bounded by ``calibration_s``) and caches it in a JSON file keyed by model, architecture, input shape,
batch size, device, thread count and torch version. Estimates adapt to drift (another process loading the CPU,
thermal throttling): every call's measured latency updates an exponential moving average of ``measured /
calibrated``, one factor shared by all widths, so a slowdown seen at one width also lowers the choice at the
others, and the factor recovers when the load goes away.

Budgets under load. A budget counts from the request's arrival, and under load the wait behind other requests
dominates. So by default (``policy="load_aware"``, :class:`~slimmable.runtime.policy.LoadAwarePolicy`) a budgeted
call runs the widest width whose predicted *completion* fits: the time it already spent before the runner
(``waited_ms``, e.g. decoding), plus the predicted remaining work of the requests admitted ahead of it (running or
waiting for a slot, each at the width chosen for it) divided by the parallelism (``max_concurrency``, 1 without a
limit), plus its own drift-adjusted latency. The queue prediction is corrected online by the ratio of moving
averages of observed to predicted queueing delay. When no width fits, the narrowest runs (``predicted_met`` and,
almost surely, ``budget_met`` are then ``False``); a call is never refused for load. ``policy="static"`` keeps the
earlier rule: the widest width whose own estimate fits, whatever the queue. Either way a budget below the
narrowest width's *calibrated* latency is an error: no load makes it feasible. Each :class:`RunResult` reports the
predicted and measured queueing delay next to the predicted and measured latency.

Detectors. A slimmable torchvision R-CNN detector (:mod:`slimmable.models.detection`) is served the same way:
the dense copies are plain torchvision detectors (:func:`slimmable.export.export_width`), a call takes a list of
``(C, H, W)`` images in [0, 1] of any size (or an ``(N, C, H, W)`` tensor), and the output is torchvision's list
of dicts (``boxes``, ``labels``, ``scores``, plus ``masks`` or ``keypoints``). Latency is calibrated on square
images at the side the detector resizes to (its transform resizes every image there, so the cost hardly depends
on the size sent); with random or untrained weights the heads' work, and so the latency, varies with the number
of detections.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._utils import unwrap_model
from ..export._io import model_label, tensor_bytes, write_json
from ..export.dense import default_widths, export_width, input_shape
from ..nn.channels import width_key
from ..tasks import task_of
from .allocator import freed_memory_retained
from .policy import POLICIES, Admission, WidthPolicy, interpolate_latency, make_policy

__all__ = ["AdmittedRequest", "RunResult", "SlimmableRunner"]

_logger = logging.getLogger(__name__)

_CACHE_VERSION = 1
#: a single observation moves the drift factor by at most this ratio (one GC pause must not flip the choice)
_RATIO_CLIP = (0.2, 10.0)


@dataclass(frozen=True)
class RunResult:
    """One call of the runner.

    Attributes:
        output: the model's output, ``(N, num_classes)`` (an inference-mode tensor); a detector's: one dict per
            image (``boxes``, ``labels``, ``scores``, ``masks``/``keypoints``).
        width: the width that ran.
        latency_ms: measured wall time of the forward pass (excludes waiting for a concurrency slot).
        predicted_ms: the drift-adjusted estimate for this width and batch size (``None`` before calibration).
        budget_ms: the requested budget, if any, counted from the request's arrival.
        queue_ms: measured time between the call and the start of the forward pass (waiting for a slot).
        predicted_queue_ms: the queueing delay the width policy predicted (``None`` before calibration).
        waited_ms: time the request had spent before the call (the caller's ``waited_ms``).
        predicted_met: whether the policy predicted the budget met (``None`` without a budget); ``False`` when no
            width fitted and the narrowest ran.
        forward_batch_size: the items in the forward pass that computed ``output``: the request's own, plus those
            of the requests it ran with when :meth:`SlimmableRunner.run_admitted` batched several (0: not recorded).
    """

    output: Any
    width: float
    latency_ms: float
    predicted_ms: float | None
    budget_ms: float | None
    queue_ms: float = 0.0
    predicted_queue_ms: float | None = None
    waited_ms: float = 0.0
    predicted_met: bool | None = None
    forward_batch_size: int = 0

    @property
    def total_ms(self) -> float:
        """Measured time from the request's arrival to the end of its forward pass: waited + queue + latency."""
        return self.waited_ms + self.queue_ms + self.latency_ms

    @property
    def budget_met(self) -> bool | None:
        """Whether the request finished within its budget, counted from arrival (:attr:`total_ms`; ``None``
        without a budget)."""
        return None if self.budget_ms is None else self.total_ms <= self.budget_ms


@dataclass(eq=False)
class AdmittedRequest:
    """A request admitted by :meth:`SlimmableRunner.admit`: its checked input, and the width it will run at.

    Run it with :meth:`SlimmableRunner.run_admitted` (with others: same-width requests share a forward pass), or
    drop it with :meth:`SlimmableRunner.discard`; until then it counts in the queue the width policy sees.

    Attributes:
        x: the input, checked by the model's task and on the runner's device.
        batch_size: its number of items.
        admission: the policy's record (:attr:`~slimmable.runtime.policy.Admission.width` is the width chosen).
    """

    x: Any
    batch_size: int
    admission: Admission

    @property
    def width(self) -> float:
        """The width it runs at."""
        return self.admission.width


class SlimmableRunner:
    """Serve a slimmable model at any of its widths, or at the widest width that fits a latency budget.

    Example:
        >>> runner = SlimmableRunner(create_model("slim_mobilenet_v2"), input_size=224)
        >>> logits = runner(x, width=0.5)
        >>> result = runner.run(x, budget_ms=8.0)  # result.width, result.latency_ms, result.predicted_queue_ms

    Args:
        model: a slimmable model (not modified; the runner keeps dense copies).
        widths: widths to serve (default: the model's switches; at most 8 statistics widths of a US model).
        input_size: image side or ``(C, H, W)``; inputs must have exactly this shape after the batch dimension
            (default 224). A detector: the side of the calibration images (default the side it resizes to);
            inputs may have any height and width.
        batch_sizes: batch sizes to calibrate; other batch sizes are estimated by linear inter/extrapolation.
        fold_bn: fold BN into convolutions in the dense copies (faster, same outputs up to float rounding).
        device: where the copies run (default: the model's device).
        calibrate: measure (or load from ``cache_path``) latencies now; otherwise call :meth:`calibrate` before
            using budgets.
        calibration_s: time budget of the measurement for all batch sizes (at least 3 rounds always run).
        cache_path: JSON file of calibrated latencies (read and updated); ``None`` disables caching.
        name: model name for the cache key (default: the model's registered or class name).
        drift_alpha: weight of each new observation in the drift factor's moving average, in (0, 1].
        max_concurrency: at most this many forward passes at once (others wait); ``None`` for no limit.
        clock: a ``perf_counter``-like function returning seconds (tests inject a fake clock).
        policy: how a budget picks the width: ``"load_aware"`` (default; the predicted wait behind the requests
            ahead counts, see the module docstring) or ``"static"`` (the widest width whose own estimate fits).

    Raises:
        ValueError: a width the model cannot run, empty ``batch_sizes``, a bad ``drift_alpha``, or an unknown
            ``policy``.
    """

    def __init__(
        self,
        model: nn.Module,
        widths: Sequence[float] | None = None,
        *,
        input_size: int | Sequence[int] | None = None,
        batch_sizes: Sequence[int] = (1,),
        fold_bn: bool = True,
        device: torch.device | str | None = None,
        calibrate: bool = True,
        calibration_s: float = 5.0,
        cache_path: str | os.PathLike[str] | None = None,
        name: str | None = None,
        drift_alpha: float = 0.2,
        max_concurrency: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
        policy: str = "load_aware",
    ) -> None:
        src = unwrap_model(model)
        if not 0 < drift_alpha <= 1:
            raise ValueError(f"drift_alpha {drift_alpha!r} must be in (0, 1], e.g. 0.2")
        sizes = sorted({int(b) for b in batch_sizes})
        if not sizes or sizes[0] < 1:
            raise ValueError(f"batch_sizes {tuple(batch_sizes)} must hold positive ints, e.g. (1, 8)")
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency {max_concurrency!r} must be a positive int or None")
        if policy not in POLICIES:
            known = ", ".join(repr(n) for n in POLICIES)
            raise ValueError(f"width policy {policy!r} is not known; use one of {known} (default 'load_aware')")
        ws = sorted({width_key(w) for w in (widths if widths is not None else default_widths(src))})
        p = next(iter(src.parameters()))
        self.device = torch.device(device) if device is not None else p.device
        self.dtype = p.dtype
        self.name = name or model_label(src)
        #: what the model does (:class:`slimmable.tasks.Task`): its inputs, answers and exported outputs
        self.task = task_of(src)
        if input_size is None:
            input_size = self.task.default_input_size(src)
        self.input_shape = input_shape(src, input_size)
        self.fold_bn = fold_bn
        self.batch_sizes = tuple(sizes)
        self.drift_alpha = float(drift_alpha)
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self._clock = clock
        self._source_bytes = tensor_bytes(src)
        self._dense: dict[float, nn.Module] = {}
        for w in ws:
            dense = export_width(src, w, fold_bn=fold_bn).to(self.device).eval()
            dense.requires_grad_(False)
            self._dense[w] = dense
        self._shared_tensors = _share_identical(list(self._dense.values()))
        self._widths = tuple(ws)
        self._base: dict[int, dict[float, float]] = {}
        self._drift = 1.0
        self._observations = 0
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_concurrency) if max_concurrency else None
        #: the width policy that budgeted calls go through (:mod:`slimmable.runtime.policy`)
        self.policy: WidthPolicy = make_policy(
            policy,
            self._widths,
            self._policy_estimate,
            parallelism=max_concurrency or 1,
            alpha=drift_alpha,
            clock=clock,
        )
        self.calibration_seconds: float | None = None
        self.calibrated_from_cache = False
        if calibrate:
            self.calibrate(calibration_s)

    # ------------------------------------------------------------------ properties

    @property
    def widths(self) -> tuple[float, ...]:
        """The served widths, ascending."""
        return self._widths

    @property
    def calibrated(self) -> bool:
        """Whether latencies are known (measured or loaded from the cache)."""
        return bool(self._base)

    @property
    def drift(self) -> float:
        """Current ratio of observed to calibrated latency (1.0: as calibrated; 2.0: everything twice as slow)."""
        return self._drift

    def module(self, width: float) -> nn.Module:
        """The dense copy that serves ``width`` (read-only: do not train or modify it)."""
        return self._dense[self._check_width(width)]

    # ------------------------------------------------------------------ calibration

    def calibrate(self, seconds: float = 5.0, *, use_cache: bool = True) -> float:
        """Measure the latency of every width at every calibrated batch size (or load it from the cache).

        Args:
            seconds: time budget of the measurement (at least 3 interleaved rounds always run).
            use_cache: read ``cache_path`` first and skip batch sizes found there.

        Returns:
            Seconds spent (≈0 on a full cache hit).
        """
        t0 = time.perf_counter()
        cache = self._read_cache() if (use_cache and self.cache_path is not None) else {}
        base: dict[int, dict[float, float]] = {}
        missing = []
        for b in self.batch_sizes:
            hit = cache.get(self._cache_key(b))
            table = self._parse_cached(hit) if hit is not None else None
            if table is not None:
                base[b] = table
            else:
                missing.append(b)
        per_batch = max(0.0, seconds) / max(1, len(missing))
        for b in missing:
            base[b] = self._measure(b, per_batch)
        with self._lock:
            self._base = base
            self._drift = 1.0
            self._observations = 0
        self.policy.reset_correction()
        self.calibrated_from_cache = not missing
        if missing and self.cache_path is not None:
            self._write_cache({self._cache_key(b): base[b] for b in missing})
        self.calibration_seconds = time.perf_counter() - t0
        _logger.info(
            "calibrated %s on %s in %.2f s%s: %s",
            self.name,
            self.device,
            self.calibration_seconds,
            " (cache)" if self.calibrated_from_cache else "",
            {b: {w: round(ms, 3) for w, ms in t.items()} for b, t in base.items()},
        )
        return self.calibration_seconds

    def load_latencies(self, table: Mapping[int, Mapping[float, float]]) -> None:
        """Use latencies measured elsewhere (e.g. a bundle manifest, or a previous run) instead of calibrating.

        Args:
            table: ``{batch_size: {width: milliseconds}}`` covering every served width for each batch size.

        Raises:
            ValueError: a batch size is not a positive int, a served width is missing, or a latency is not a
                positive finite number.
        """
        base: dict[int, dict[float, float]] = {}
        for b, row in table.items():
            if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                raise ValueError(f"batch size {b!r} in the latency table must be a positive int")
            got = {width_key(w): float(ms) for w, ms in row.items()}
            missing = [w for w in self._widths if w not in got]
            if missing:
                raise ValueError(f"the latency table for batch {b} lacks widths {missing}; give every served width")
            bad = {w: got[w] for w in self._widths if not (math.isfinite(got[w]) and got[w] > 0)}
            if bad:
                raise ValueError(f"latencies {bad} for batch {b} must be positive finite milliseconds")
            base[b] = {w: got[w] for w in self._widths}
        if not base:
            raise ValueError("the latency table is empty; give {batch_size: {width: ms}}")
        with self._lock:
            self._base = base
            self._drift = 1.0
            self._observations = 0
        self.policy.reset_correction()

    @torch.inference_mode()
    def _measure(self, batch_size: int, seconds: float) -> dict[float, float]:
        x = self.task.example_inputs(next(iter(self._dense.values())), self.input_shape, batch_size, seed=0)
        deadline = time.perf_counter() + seconds
        for w in self._widths:
            self._dense[w](x)  # warm-up: allocator, oneDNN primitive cache
        samples: dict[float, list[float]] = {w: [] for w in self._widths}
        rounds = 0
        # Rounds over all widths until the time budget is spent: at least 3 (a median needs them), at most 30;
        # past the budget, stop after 3 rounds even if the machine is so loaded that they took much longer.
        while rounds < 30 and (rounds < 3 or time.perf_counter() < deadline):
            # Alternate the order so that no width always runs right after the same neighbour.
            for w in self._widths if rounds % 2 else reversed(self._widths):
                samples[w].append(self._timed(self._dense[w], x))
            rounds += 1
        return {w: 1e3 * statistics.median(s) for w, s in samples.items()}

    def _timed(self, module: nn.Module, x: Any) -> float:
        t0 = time.perf_counter()
        module(x)
        self._sync()
        return time.perf_counter() - t0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _device_label(self) -> str:
        if self.device.type == "cuda":
            return f"cuda:{torch.cuda.get_device_name(self.device)}"
        return f"{self.device.type}:{platform.machine()}:{os.cpu_count()}cpus"

    def _cache_key(self, batch_size: int) -> str:
        arch = {f"{w:g}": [list(t.shape) for t in m.state_dict().values()] for w, m in self._dense.items()}
        digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]
        c, h, w = self.input_shape
        return (
            f"{self.name}|arch={digest}|input={c}x{h}x{w}|batch={batch_size}|device={self._device_label()}"
            f"|threads={torch.get_num_threads()}|fold_bn={int(self.fold_bn)}|dtype={self.dtype}|torch={torch.__version__}"
            f"|malloc={'retained' if freed_memory_retained() else 'default'}"
        )

    def _parse_cached(self, entry: Any) -> dict[float, float] | None:
        try:
            table = {width_key(float(w)): float(ms) for w, ms in entry["latency_ms"].items()}
        except (TypeError, KeyError, ValueError, AttributeError):
            return None
        if not all(w in table and math.isfinite(table[w]) and table[w] > 0 for w in self._widths):
            return None
        return {w: table[w] for w in self._widths}

    def _read_cache(self) -> dict[str, Any]:
        assert self.cache_path is not None
        try:
            data = json.loads(self.cache_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            _logger.warning("latency cache %s is unreadable (%s); recalibrating", self.cache_path, err)
            return {}
        if not isinstance(data, dict) or data.get("format_version") != _CACHE_VERSION:
            return {}
        entries = data.get("entries")
        return entries if isinstance(entries, dict) else {}

    def _write_cache(self, new: Mapping[str, dict[float, float]]) -> None:
        assert self.cache_path is not None
        entries = self._read_cache()
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        for key, table in new.items():
            entries[key] = {"latency_ms": {f"{w:g}": round(ms, 5) for w, ms in table.items()}, "measured": stamp}
        try:
            write_json(self.cache_path, {"format_version": _CACHE_VERSION, "entries": entries})
        except OSError as err:
            _logger.warning("could not write the latency cache %s: %s", self.cache_path, err)

    # ------------------------------------------------------------------ estimates and choice

    def base_latency(self, width: float, batch_size: int) -> float:
        """Calibrated latency (ms) of ``width`` at ``batch_size``, without drift.

        Batch sizes that were not calibrated are estimated linearly from the two nearest calibrated ones (or in
        proportion to the batch size when only one was calibrated).

        Raises:
            RuntimeError: the runner is not calibrated.
        """
        w = self._check_width(width)
        base = self._base
        if not base:
            raise RuntimeError("the runner has no latencies yet; call calibrate() (or build it with calibrate=True)")
        return interpolate_latency({b: table[w] for b, table in base.items()}, batch_size)

    def estimate(self, width: float, batch_size: int = 1) -> float:
        """Expected latency (ms) of ``width`` at ``batch_size`` now: calibrated latency times the drift factor."""
        return self.base_latency(width, batch_size) * self._drift

    def latency_table(self, batch_size: int = 1) -> dict[float, float]:
        """Expected latency (ms, drift included) of every width at ``batch_size``."""
        return {w: self.estimate(w, batch_size) for w in self._widths}

    def select_width(self, budget_ms: float, batch_size: int = 1) -> tuple[float, float]:
        """The widest width whose expected latency fits ``budget_ms``, and that expectation, ignoring the queue
        (the ``"static"`` policy's choice for an idle runner; :meth:`run` asks :attr:`policy`).

        A budget below the fastest width's *calibrated* latency can never be met and is an error. When drift
        makes every width too slow for a feasible budget, the fastest width is chosen (best effort; the
        result's ``budget_met`` then tells whether it fitted).

        Raises:
            ValueError: ``budget_ms`` is not a positive number, or below the fastest width's calibrated latency.
            RuntimeError: the runner is not calibrated.
        """
        base = self._check_budget(budget_ms, batch_size)
        fastest = min(base, key=base.__getitem__)
        drift = self._drift
        for w in reversed(self._widths):
            if base[w] * drift <= budget_ms:
                return w, base[w] * drift
        return fastest, base[fastest] * drift

    def _check_budget(self, budget_ms: float, batch_size: int) -> dict[float, float]:
        """The calibrated latencies at ``batch_size``, once ``budget_ms`` is known to be feasible on an idle runner."""
        if isinstance(budget_ms, bool) or not isinstance(budget_ms, (int, float)):
            raise ValueError(f"budget_ms must be a number of milliseconds such as 10.0, got {budget_ms!r}")
        if not math.isfinite(budget_ms) or budget_ms <= 0:
            raise ValueError(f"budget_ms {budget_ms!r} must be a positive finite number of milliseconds")
        base = {w: self.base_latency(w, batch_size) for w in self._widths}
        fastest = min(base, key=base.__getitem__)
        if budget_ms < base[fastest]:
            raise ValueError(
                f"budget_ms {budget_ms:g} is below the fastest width: width {fastest:g} takes {base[fastest]:.3g} ms "
                f"at batch {batch_size} on {self.device} (calibrated). Use a budget of at least "
                f"{base[fastest]:.3g} ms" + (", or a smaller batch" if batch_size > 1 else "")
            )
        return base

    def _policy_estimate(self, width: float, batch_size: int) -> float:
        """The policy's service estimate: :meth:`estimate`, or 0 before calibration (a pinned width's request then
        adds no predicted work; budgets need calibration anyway)."""
        return self.estimate(width, batch_size) if self._base else 0.0

    def observe(self, width: float, batch_size: int, latency_ms: float) -> None:
        """Feed a measured latency into the drift factor (the runner calls this after every forward pass).

        Args:
            width: the width that ran.
            batch_size: its batch size.
            latency_ms: the measured wall time.
        """
        if not self._base or not math.isfinite(latency_ms) or latency_ms <= 0:
            return
        ratio = min(max(latency_ms / self.base_latency(width, batch_size), _RATIO_CLIP[0]), _RATIO_CLIP[1])
        with self._lock:
            self._drift += self.drift_alpha * (ratio - self._drift)
            self._observations += 1

    def reset_drift(self) -> None:
        """Forget observed drift (estimates return to the calibrated latencies)."""
        with self._lock:
            self._drift = 1.0
            self._observations = 0

    # ------------------------------------------------------------------ inference

    def __call__(self, x: Any, *, width: float | None = None, budget_ms: float | None = None) -> Any:
        """Run ``x`` ``(N, C, H, W)`` at ``width`` or within ``budget_ms``; returns the output ``(N, classes)`` (a
        detector: a list of images, and one detection dict per image)."""
        return self.run(x, width=width, budget_ms=budget_ms).output

    def run(
        self, x: Any, *, width: float | None = None, budget_ms: float | None = None, waited_ms: float = 0.0
    ) -> RunResult:
        """Run ``x`` at ``width``, at the width :attr:`policy` picks for ``budget_ms``, or (neither given) at the
        widest width.

        Thread-safe: concurrent calls at different widths run different read-only copies. Every call, budgeted or
        not, is admitted to :attr:`policy`, so the budgeted calls after it see it in the queue.

        Args:
            x: input ``(N, C, H, W)`` with ``(C, H, W)`` equal to :attr:`input_shape`; moved to the runner's device.
                A detector: a list of ``(C, H, W)`` images in [0, 1] (any height and width), or a tensor
                ``(N, C, H, W)`` / ``(C, H, W)``.
            width: one of :attr:`widths`.
            budget_ms: latency budget in milliseconds for this batch, counted from the request's arrival.
            waited_ms: milliseconds the request has already spent since it arrived (e.g. reading and decoding
                it); the load-aware policy takes them off the budget, and :attr:`RunResult.budget_met` counts them.

        Returns:
            A :class:`RunResult` with the output, the width used, the measured latency and queueing delay and
            their predictions.

        Raises:
            TypeError: ``x`` is not a floating-point tensor.
            ValueError: wrong input shape, unknown width, both ``width`` and ``budget_ms``, a budget below the
                fastest width's calibrated latency, or a negative ``waited_ms``.
        """
        return self.run_admitted([self.admit(x, width=width, budget_ms=budget_ms, waited_ms=waited_ms)])[0]

    def admit(
        self, x: Any, *, width: float | None = None, budget_ms: float | None = None, waited_ms: float = 0.0
    ) -> AdmittedRequest:
        """Check ``x`` and admit it to :attr:`policy`, which fixes its width, without running it yet.

        The first half of :meth:`run`, for servers that batch requests: admit each request when it arrives (so the
        ones after it see it in the queue), then run the admitted ones together with :meth:`run_admitted`, or
        :meth:`discard` one that will not run. Arguments and errors are :meth:`run`'s.
        """
        x, batch = self.task.check_inputs(x, self.input_shape, self.device, self.dtype)
        if width is not None and budget_ms is not None:
            raise ValueError("give either width or budget_ms, not both")
        if isinstance(waited_ms, bool) or not isinstance(waited_ms, (int, float)) or not 0 <= waited_ms < math.inf:
            raise ValueError(f"waited_ms must be zero or more milliseconds, such as 1.5, got {waited_ms!r}")
        if budget_ms is not None:
            self._check_budget(budget_ms, batch)
            admission = self.policy.choose(budget_ms, batch, waited_ms=waited_ms)
        else:
            w = self._check_width(width) if width is not None else self._widths[-1]
            admission = self.policy.admit(w, batch, waited_ms=waited_ms)
        return AdmittedRequest(x, batch, admission)

    def run_admitted(self, requests: Sequence[AdmittedRequest]) -> list[RunResult]:
        """Run admitted requests, one forward pass per width: the requests at a width are joined into one batch
        (:meth:`slimmable.tasks.Task.join_inputs`) and its output split back (``split_outputs``).

        Each result reports the pass it ran in: its ``latency_ms`` and ``forward_batch_size`` are the pass's, its
        queueing delay runs from its own admission to the pass's start. Widths run narrowest first.

        Args:
            requests: from :meth:`admit`, each given once.

        Returns:
            One :class:`RunResult` per request, in the order given.

        Raises:
            Exception: whatever a forward pass raised; every request not yet run is then discarded.
        """
        groups: dict[float, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(request.width, []).append(i)
        results: list[RunResult | None] = [None] * len(requests)
        try:
            for w in sorted(groups):
                members = [requests[i] for i in groups[w]]
                for i, result in zip(groups[w], self._execute(w, members)):
                    results[i] = result
        except BaseException:
            for request in requests:
                self.discard(request)
            raise
        return [r for r in results if r is not None]

    def discard(self, request: AdmittedRequest) -> None:
        """Take an admitted request that will not run out of the policy's queue (a no-op once it ran)."""
        self.policy.finished(request.admission, failed=True)

    def _execute(self, w: float, requests: Sequence[AdmittedRequest]) -> list[RunResult]:
        """Run admitted requests at width ``w`` in one forward pass and close their admissions, whatever happens."""
        module = self._dense[w]
        sizes = [r.batch_size for r in requests]
        admissions = [r.admission for r in requests]
        try:
            x = requests[0].x if len(requests) == 1 else self.task.join_inputs([r.x for r in requests])
            with self._slot():
                t0 = self._clock()
                for a in admissions:
                    self.policy.started(a, t0)
                with torch.inference_mode():
                    y = module(x)
                    self._sync()
                t1 = self._clock()
            outputs = [y] if len(requests) == 1 else self.task.split_outputs(y, sizes)
        except BaseException:
            for a in admissions:
                self.policy.finished(a, failed=True)
            raise
        for a in admissions:
            self.policy.finished(a, t1)
        ms = 1e3 * (t1 - t0)
        total = sum(sizes)
        self.observe(w, total, ms)
        calibrated = bool(self._base)
        return [
            RunResult(
                out,
                w,
                ms,
                a.service_ms if calibrated else None,
                a.budget_ms,
                queue_ms=max(0.0, 1e3 * (t0 - a.admitted_at)),
                predicted_queue_ms=a.queue_ms if calibrated else None,
                waited_ms=a.waited_ms,
                predicted_met=a.predicted_met if calibrated else None,
                forward_batch_size=total,
            )
            for out, a in zip(outputs, admissions)
        ]

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        if self._slots is None:
            yield
            return
        with self._slots:
            yield

    def _check_width(self, width: float) -> float:
        if isinstance(width, bool) or not isinstance(width, (int, float)):
            raise ValueError(f"width must be a number such as 0.5, got {width!r}")
        k = width_key(width)
        if k not in self._dense:
            served = ", ".join(f"{w:g}" for w in self._widths)
            raise ValueError(
                f"width {width:g} is not served by this runner; its widths are ({served}). Use one of them, or build "
                "the runner with widths=[...] including it"
            )
        return k

    # ------------------------------------------------------------------ reporting

    def memory_bytes(self) -> dict[str, Any]:
        """Memory of the dense copies compared with one weight set of the slimmable model.

        Returns:
            ``{"source_weight_set": bytes, "dense_total": bytes, "per_width": {width: bytes}, "ratio": total/source}``
            (parameters and buffers; ``source_weight_set`` includes every switch's BN; ``dense_total`` counts
            tensors that the copies share, such as an unslimmed classifier, once, ``per_width`` each copy whole).
        """
        per = {w: tensor_bytes(m) for w, m in self._dense.items()}
        total = tensor_bytes(nn.ModuleList(self._dense.values()))  # tensors shared between copies count once
        return {
            "source_weight_set": self._source_bytes,
            "dense_total": total,
            "per_width": per,
            "ratio": total / self._source_bytes if self._source_bytes else math.nan,
        }

    def info(self) -> dict[str, Any]:
        """A JSON-ready summary: name, widths, input shape, device, latency tables, drift, memory."""
        mem = self.memory_bytes()
        tables = {}
        if self._base:
            for b in self.batch_sizes:
                tables[str(b)] = {f"{w:g}": round(self.base_latency(w, b), 4) for w in self._widths}
        info = {
            "model": self.name,
            "widths": list(self._widths),
            "input_shape": list(self.input_shape),
            "device": str(self.device),
            "fold_bn": self.fold_bn,
            "calibrated_latency_ms": tables,
            "calibration_seconds": self.calibration_seconds,
            "calibrated_from_cache": self.calibrated_from_cache,
            "drift": round(self._drift, 4),
            "observations": self._observations,
            "width_policy": self.policy.stats(),
            "memory_bytes": {
                "source_weight_set": mem["source_weight_set"],
                "dense_total": mem["dense_total"],
                "per_width": {f"{w:g}": b for w, b in mem["per_width"].items()},
            },
        }
        info["task"] = self.task.name
        return info


def _share_identical(modules: Sequence[nn.Module]) -> int:
    """Make parameters and buffers that are equal across ``modules`` one shared tensor (the copies are read-only).

    Returns:
        The number of tensors replaced by a shared one.
    """
    seen: dict[tuple, list[torch.Tensor]] = {}
    shared = 0
    for root in modules:
        for mod in root.modules():
            for table in (mod._parameters, mod._buffers):
                for name, t in list(table.items()):
                    if t is None:
                        continue
                    bucket = seen.setdefault((tuple(t.shape), t.dtype, t.device, type(t)), [])
                    match = next((u for u in bucket if u is t or torch.equal(u, t)), None)
                    if match is None:
                        bucket.append(t)
                    elif match is not t:
                        table[name] = match
                        shared += 1
    return shared
