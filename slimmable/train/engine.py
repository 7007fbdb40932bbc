"""Algorithm 1 (slimmable training) and evaluation at every width.

For each batch: for each width the sampler picks (widest first), switch the model to it, forward, compute the
loss and backpropagate; gradients accumulate over the widths; then one optimizer step. Switchable BN keeps
separate statistics and affine parameters per width, so every width is trained and evaluated with its own.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..nn import set_layer_widths, set_width, use_width
from .clock import StepClock, ThreadGovernor
from .nonfinite import (
    NonFiniteLoss,
    NonFiniteLossError,
    losses_are_finite,
    restore_buffers,
    snapshot_buffers,
    stop_message,
)
from .objectives import ClassificationObjective, Objective, soft_cross_entropy
from .samplers import WidthSampler

__all__ = [
    "RANDOM_WIDTHS",
    "EpochStats",
    "StepResult",
    "Trainer",
    "WidthMetrics",
    "evaluate",
    "format_seconds",
    "soft_cross_entropy",
    "train_step",
    "width_label",
]

_logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """Per-width loss (mean over the batch) and top-1 correct count of one training step, as device tensors (the
    count is zero for objectives that count none, e.g. detection)."""

    widths: list[float]
    losses: torch.Tensor
    correct: torch.Tensor


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Any,
    targets: Any,
    widths: Sequence[float],
    *,
    forward: Callable[..., Any] | None = None,
    ddp: nn.parallel.DistributedDataParallel | None = None,
    autocast_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    label_smoothing: float = 0.0,
    inplace_distill: bool = False,
    grad_clip: float | None = None,
    check_finite: bool = True,
    objective: Objective | None = None,
) -> StepResult:
    """One optimizer step of Algorithm 1: forward + backward at each width (gradients accumulate), one update.

    Args:
        model: the unwrapped slimmable model (its width is switched).
        optimizer: updated once, after all widths.
        images: ``(N, C, H, W)`` on the model's device (the objective's batch format: a detector takes a list of
            images).
        targets: ``(N,)`` class indices (a detector: a list of target dicts).
        widths: widths to train, widest first; an entry may be a ``{layer name: width}`` mapping (non-uniform
            widths, see :func:`slimmable.nn.set_layer_widths`).
        forward: what to call on ``images`` (a DDP or compiled wrapper of ``model``); default ``ddp``, else
            ``model``.
        ddp: the DDP wrapper, if any: all backward passes but the last run under ``no_sync()``, so gradients are
            all-reduced once per step.
        autocast_dtype: autocast dtype, or ``None`` for full precision.
        scaler: gradient scaler (fp16).
        label_smoothing, inplace_distill: the default objective's settings (see
            :class:`~slimmable.train.objectives.ClassificationObjective`); ignored when ``objective`` is given.
        grad_clip: clip the gradient norm (after unscaling) to this.
        check_finite: before the update, check that every loss is finite (one host sync per step; with ``ddp``,
            agreed by all processes with one scalar all-reduce).
        objective: what each width computes (default: classification with cross-entropy).

    Returns:
        The per-width losses and correct counts (detached).

    Raises:
        NonFiniteLoss: a loss is NaN or infinite (``check_finite``); the gradients are cleared, the parameters
            and optimizer state are unchanged (the BN running statistics are not: the forward passes ran).
    """
    if forward is None:
        forward = ddp if ddp is not None else model
    if objective is None:
        objective = ClassificationObjective(label_smoothing, inplace_distill)
    device = next(model.parameters()).device
    optimizer.zero_grad(set_to_none=True)
    objective.begin_step()
    losses, correct = [], []
    last = len(widths) - 1
    for i, w in enumerate(widths):
        if isinstance(w, Mapping):
            set_layer_widths(model, w)
        else:
            set_width(model, w)
        sync = contextlib.nullcontext() if ddp is None or i == last else ddp.no_sync()
        with sync:
            with _autocast(device, autocast_dtype):
                loss, hits = objective.width_loss(forward, images, targets, i)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        losses.append(loss.detach())
        correct.append(hits)
    if check_finite and not losses_are_finite(torch.stack(losses), all_processes=ddp is not None):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(widths, torch.stack(losses))
    if grad_clip is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return StepResult(list(widths), torch.stack(losses), torch.stack(correct))


@dataclass
class WidthMetrics:
    """Evaluation of one width: top-1/top-5 accuracy (%), mean cross-entropy, image count."""

    width: float
    top1: float
    top5: float
    loss: float
    images: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def format_seconds(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3725`` -> ``1h02m``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def width_label(key: float | str) -> str:
    """A width as text (``0.25``), or a pooled key such as ``random`` as it is."""
    return key if isinstance(key, str) else f"{key:g}"


def _all_reduce_(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    widths: Sequence[float],
    *,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = False,
) -> list[WidthMetrics]:
    """Top-1/top-5 accuracy and loss of ``model`` at each width, in eval mode (each switch's own BN statistics).

    Each batch is loaded once and run at every width. In a distributed run each process evaluates its shard and
    the counts are summed over processes.

    Args:
        model: the (unwrapped) slimmable model; its width and train/eval mode are restored afterwards.
        loader: yields ``(images, targets)``.
        widths: widths to evaluate.
        device: where to run (default: the model's).
        autocast_dtype: autocast dtype or ``None``.
        channels_last: NHWC inputs.
        progress: show a progress bar.

    Returns:
        One :class:`WidthMetrics` per width, in the order given.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    n_w = len(widths)
    sums = torch.zeros(3, n_w, dtype=torch.float64, device=device)  # loss sum, top-1, top-5
    count = torch.zeros(1, dtype=torch.float64, device=device)
    batches = _progress(loader, progress, "eval")
    try:
        for images, targets in batches:
            images, targets = _to_device(images, targets, device, channels_last)
            for j, w in enumerate(widths):
                with use_width(model, w), _autocast(device, autocast_dtype):
                    logits = model(images)
                logits = logits.float()
                k = min(5, logits.shape[1])
                top = logits.topk(k, dim=1).indices
                hit = top == targets[:, None]
                sums[0, j] += F.cross_entropy(logits, targets, reduction="sum").double()
                sums[1, j] += hit[:, 0].sum()
                sums[2, j] += hit.any(dim=1).sum()
            count += targets.shape[0]
    finally:
        model.train(was_training)
    _all_reduce_(sums)
    _all_reduce_(count)
    n = max(1.0, float(count))
    s = sums.cpu()
    return [
        WidthMetrics(float(w), 100.0 * float(s[1, j]) / n, 100.0 * float(s[2, j]) / n, float(s[0, j]) / n, int(n))
        for j, w in enumerate(widths)
    ]


def _to_device(
    images: torch.Tensor, targets: torch.Tensor, device: torch.device, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(device, non_blocking=True, memory_format=fmt)
    return images, targets.to(device, non_blocking=True)


def _progress(iterable: Iterable, enabled: bool, desc: str, total: int | None = None, initial: int = 0) -> Iterable:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, initial=initial, dynamic_ncols=True, leave=False)


RANDOM_WIDTHS = "random"


@dataclass
class EpochStats:
    """Training metrics of one epoch (this run's part of it when resumed mid-epoch).

    ``loss`` and ``top1`` are keyed by width; widths the sampler draws at random (not in its ``fixed_widths``)
    are pooled under the key ``"random"``.
    """

    epoch: int
    loss: dict[float | str, float] = field(default_factory=dict)
    top1: dict[float | str, float] = field(default_factory=dict)
    images: int = 0
    steps: int = 0
    seconds: float = 0.0
    lr: float = 0.0
    interrupted: bool = False
    batches_done: int = 0
    skipped_steps: int = 0  # steps skipped for a non-finite loss (train.nonfinite: skip)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


class _EpochSums:
    """An epoch's per-width loss, correct and image sums on the device, reduced over processes once at its end."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.keys: list[float | str] = []  # in the order first seen
        self.images = self._zero()
        self.loss: dict[float | str, torch.Tensor] = {}
        self.correct: dict[float | str, torch.Tensor] = {}
        self.count: dict[float | str, torch.Tensor] = {}  # images per key (pooled random widths count each draw)

    def _zero(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float64, device=self.device)

    def add(self, keys: Sequence[float | str], res: StepResult, batch_size: int) -> None:
        """One step's results: ``keys[j]`` is the statistics key of ``res.widths[j]``."""
        self.images += batch_size
        for j, key in enumerate(keys):
            if key not in self.loss:
                self.keys.append(key)
                self.loss[key], self.correct[key], self.count[key] = self._zero(), self._zero(), self._zero()
            self.loss[key] += res.losses[j].double() * batch_size
            self.correct[key] += res.correct[j].double()
            self.count[key] += batch_size

    def reduce_into(self, stats: EpochStats, counts_correct: bool) -> None:
        """Sum over processes (one all-reduce) and write the epoch's means into ``stats``."""
        flat = [self.images]
        for key in self.keys:
            flat += [self.loss[key], self.correct[key], self.count[key]]
        vec = _all_reduce_(torch.stack(flat)).cpu()
        for j, key in enumerate(self.keys):
            loss, correct, count = (float(v) for v in vec[1 + 3 * j : 4 + 3 * j])
            stats.loss[key] = loss / max(1.0, count)
            stats.top1[key] = 100.0 * correct / max(1.0, count) if counts_correct else math.nan
        stats.images = int(vec[0])


class Trainer:
    """Runs Algorithm 1 epoch by epoch; owns the step counter and the numerics settings.

    Args:
        model: the unwrapped slimmable model, on ``device``.
        optimizer: its optimizer.
        scheduler: a per-step LR scheduler (stepped after each optimizer step), or ``None``.
        sampler: chooses the widths of each step.
        device: the training device.
        forward: the callable used for forward passes (DDP / compiled wrapper); default ``model``.
        ddp: the DDP wrapper, for ``no_sync()``.
        autocast_dtype, scaler, grad_clip: see :func:`train_step`.
        label_smoothing, inplace_distill: the default objective's settings; ignored when ``objective`` is given.
        channels_last: NHWC inputs.
        seed: seeds the per-step width choice (identical on every process).
        log_interval: steps between ``on_log`` calls (TensorBoard scalars).
        log_seconds: seconds between progress lines without a progress bar (the first after the first step), each
            with steps per second and, given ``total_steps``, the run's ETA.
        total_steps: steps of the whole run: the ETA, and an epoch ends early when the run reaches it (a time
            budget re-planned mid-epoch).
        clock: the timer of the progress lines and of :attr:`step_clock` (tests pass a fake one).
        before_schedule_step: called before every ``scheduler.step()`` (a time budget's schedule reads the time
            spent, :class:`~slimmable.train.optim.TimeBudgetFactor`).
        objective: what each width computes (default: classification with cross-entropy); see
            :mod:`slimmable.train.objectives`.
        nonfinite: a NaN/infinite loss ``stop``s training (:class:`NonFiniteLossError`) or ``skip``s the step
            (no update, BN statistics restored, counted in :attr:`EpochStats.skipped_steps`; the buffers are copied
            before every step).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        sampler: WidthSampler,
        *,
        device: torch.device,
        forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
        ddp: nn.parallel.DistributedDataParallel | None = None,
        autocast_dtype: torch.dtype | None = None,
        scaler: torch.amp.GradScaler | None = None,
        label_smoothing: float = 0.0,
        inplace_distill: bool = False,
        grad_clip: float | None = None,
        channels_last: bool = False,
        seed: int = 0,
        log_interval: int = 50,
        log_seconds: float = 30.0,
        total_steps: int | None = None,
        nonfinite: str = "stop",
        objective: Objective | None = None,
        clock: Callable[[], float] = time.perf_counter,
        before_schedule_step: Callable[[], None] | None = None,
    ) -> None:
        self.model, self.optimizer, self.scheduler, self.sampler = model, optimizer, scheduler, sampler
        self.device = device
        self.forward = forward if forward is not None else model
        self.ddp = ddp
        self.autocast_dtype, self.scaler = autocast_dtype, scaler
        self.objective = (
            objective if objective is not None else ClassificationObjective(label_smoothing, inplace_distill)
        )
        self.grad_clip = grad_clip
        self.channels_last = channels_last
        self.seed = seed
        self.log_interval = log_interval
        self.log_seconds, self.total_steps = log_seconds, total_steps
        self.nonfinite = nonfinite
        self.step = 0
        self.clock = clock
        self.before_schedule_step = before_schedule_step
        #: seconds of the recent steps (a time budget's re-planning reads its median)
        self.step_clock = StepClock(clock=clock)
        #: the seconds per step a time budget's plan assumes: ``on_progress`` is also called (every 8 steps at most)
        #: when the recent steps leave it by more than 25%, so a plan follows a change of speed within seconds
        self.expected_step_seconds: float | None = None
        #: moves a CPU run between its full and half thread count, whichever runs the steps faster (set by a
        #: time-budgeted run; see :class:`~slimmable.train.clock.ThreadGovernor`)
        self.thread_governor: ThreadGovernor | None = None
        fixed = getattr(sampler, "fixed_widths", None)
        self._fixed = None if fixed is None else {float(w) for w in fixed}

    def _stat_key(self, width: float | Mapping[str, float]) -> float | str:
        # widths the sampler draws at random are pooled: one entry per epoch, not one per random draw
        if isinstance(width, Mapping):
            return RANDOM_WIDTHS
        return width if self._fixed is None or width in self._fixed else RANDOM_WIDTHS

    def _schedule_step(self) -> None:
        if self.scheduler is not None:
            if self.before_schedule_step is not None:
                self.before_schedule_step()
            self.scheduler.step()

    def widths_for_step(self) -> list[float]:
        """The widths of the next step: depends on (seed, step) only, so every process agrees."""
        return self.sampler.widths_for_step(self.step, random.Random(self.seed * 1_000_003 + self.step))

    def train_epoch(
        self,
        loader: Iterable,
        epoch: int,
        *,
        steps_in_epoch: int,
        start_batch: int = 0,
        should_stop: Callable[[], bool] | None = None,
        progress: bool = False,
        on_log: Callable[[int, dict[str, float]], None] | None = None,
        batches: Iterable | None = None,
        on_progress: Callable[[int], None] | None = None,
        progress_every: int | None = None,
    ) -> EpochStats:
        """Train one epoch (from ``start_batch`` when resuming), stopping early when ``should_stop()`` is true.

        Args:
            loader: yields ``(images, targets)`` batches of this process.
            epoch: 0-based epoch index (for messages).
            steps_in_epoch: batches of this epoch: the loader's length, or fewer to end it early (the last epoch of
                a run sized to a time budget).
            start_batch: batches of this epoch already done (the loader starts after them).
            should_stop: polled after every step; a true result ends the epoch early (``interrupted``).
            progress: show a progress bar instead of log lines.
            on_log: called every ``log_interval`` steps (and at the epoch's end) with ``(global_step, scalars)``.
            batches: an already created iterator over ``loader`` (to control when random states are drawn).
            on_progress: called with the global step at every progress line (every ``log_seconds``, with a bar or
                without) and when the recent steps leave :attr:`expected_step_seconds` by more than 25% (checked
                every 8 steps), or every ``progress_every`` steps when that is given (the same steps on every process
                of a distributed run); a time budget re-plans there.
            progress_every: see ``on_progress``.
        """
        self.model.train()
        sums = _EpochSums(self.device)
        stats = EpochStats(epoch, batches_done=start_batch)
        t0 = self.clock()
        next_line = t0  # the first line comes after the first step
        self.step_clock.start()
        it = batches if batches is not None else iter(loader)
        bar = _progress(it, progress, f"epoch {epoch + 1}", total=steps_in_epoch, initial=start_batch)
        for images, targets in bar:
            done_step = self._train_batch(images, targets, stats, steps_in_epoch)
            if done_step is not None:
                res, batch_size = done_step
                sums.add([self._stat_key(w) for w in res.widths], res, batch_size)
                now = self.clock()
                due = now >= next_line  # time-based, not every N steps: a line at least every log_seconds
                self._log_step(res, stats, steps_in_epoch, rate=stats.steps / (now - t0), due=due, bar=bar,
                               progress=progress, on_log=on_log)  # fmt: skip
                if due:
                    next_line = now + self.log_seconds
                if on_progress is not None:
                    if progress_every:  # the same steps on every process (a collective follows)
                        call = self.step % progress_every == 0
                    else:  # at a progress line, or as soon as the speed leaves what the caller expects
                        call = due or (self.step % 8 == 0 and self.step_clock.deviates(self.expected_step_seconds))
                    if call:
                        on_progress(self.step)
            run_ended = self.total_steps is not None and self.step >= self.total_steps
            done = stats.batches_done >= steps_in_epoch or run_ended
            if should_stop is not None and should_stop():
                stats.interrupted = not done
                break
            if done:  # the end of the epoch, or of the run's steps (a time budget's partial last epoch)
                break
        if hasattr(bar, "close"):
            bar.close()
        sums.reduce_into(stats, self.objective.counts_correct)
        stats.seconds = self.clock() - t0
        stats.lr = self.optimizer.param_groups[0]["lr"]
        return stats

    def _train_batch(
        self, images: Any, targets: Any, stats: EpochStats, steps_in_epoch: int
    ) -> tuple[StepResult, int] | None:
        """One step of Algorithm 1 on a batch, and the schedule and clock after it: the step's result and batch
        size, or ``None``: a non-finite loss skipped (``nonfinite: skip``: no update, BN statistics restored; the
        schedule and widths move on).

        Raises:
            NonFiniteLossError: a non-finite loss, not skipped (the message says where and what to do).
        """
        images, targets = self.objective.to_device(images, targets, self.device, self.channels_last)
        widths = self.widths_for_step()
        saved = snapshot_buffers(self.model) if self.nonfinite == "skip" else None
        try:
            res: StepResult | None = train_step(
                self.model, self.optimizer, images, targets, widths, forward=self.forward, ddp=self.ddp,
                autocast_dtype=self.autocast_dtype, scaler=self.scaler, grad_clip=self.grad_clip,
                objective=self.objective,
            )  # fmt: skip
        except NonFiniteLoss as err:
            if self.nonfinite != "skip":
                msg = stop_message(err, stats.epoch, self.step, stats.batches_done + 1, steps_in_epoch)
                raise NonFiniteLossError(msg) from None
            restore_buffers(self.model, saved or [])
            _logger.warning("skipped step %d (epoch %d): non-finite loss, %s", self.step, stats.epoch + 1, err)
            res = None
        self._schedule_step()
        self.step += 1
        self.step_clock.tick()
        stats.batches_done += 1
        if res is None:
            stats.skipped_steps += 1
            return None
        if self.thread_governor is not None:
            self.thread_governor.update(self.step, self.step_clock)
        stats.steps += 1
        return res, self.objective.batch_size(targets)

    def _log_step(
        self,
        res: StepResult,
        stats: EpochStats,
        steps_in_epoch: int,
        *,
        rate: float,
        due: bool,
        bar: Any,
        progress: bool,
        on_log: Callable[[int, dict[str, float]], None] | None,
    ) -> None:
        """The step's scalars to ``on_log`` every ``log_interval`` steps, and a progress line (or the bar's text)
        when ``due``."""
        interval = stats.batches_done % self.log_interval == 0 or stats.batches_done == steps_in_epoch
        if not (interval or due):
            return
        step_losses: dict[str, list[float]] = {}
        for j, w in enumerate(res.widths):
            step_losses.setdefault(width_label(self._stat_key(w)), []).append(float(res.losses[j]))
        scalars = {f"loss/{k}": sum(v) / len(v) for k, v in step_losses.items()}
        scalars["lr"] = self.optimizer.param_groups[0]["lr"]
        if on_log is not None and interval:
            on_log(self.step, scalars)
        eta = ""
        if self.total_steps is not None:
            eta = f", ETA {format_seconds((self.total_steps - self.step) / rate)}"
        if not progress and due:
            losses = " ".join(
                f"{'per-layer' if isinstance(w, Mapping) else f'{w:g}'}:{float(res.losses[j]):.3f}"
                for j, w in enumerate(res.widths)
            )
            _logger.info(
                "epoch %d step %d/%d  %.2f steps/s%s  lr %.4g  loss %s",
                stats.epoch + 1, stats.batches_done, steps_in_epoch, rate, eta, scalars["lr"], losses,
            )  # fmt: skip
        elif hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"loss {float(res.losses[0]):.3f} lr {scalars['lr']:.3g}{eta}")
