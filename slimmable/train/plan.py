"""What a run decides at start-up from the machine it runs on: numerics (a measured probe) and, for a time budget,
how many epochs fit.

The probe runs real Algorithm-1 steps of a *copy* of the model on random data under a forked random state, so it
changes neither the weights nor the run's random sequence.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from ..hardware import Numerics, choose_numerics, time_step
from .engine import train_step
from .objectives import ClassificationObjective, Objective
from .samplers import WidthSampler

__all__ = [
    "EpochPlan",
    "decide_numerics",
    "measure_step_seconds",
    "plan_epochs",
    "probe_step_factory",
    "random_batches",
    "replan",
]

#: the numerics probe's batch is the training batch up to this many images (enough to rank the candidates)
PROBE_MAX_BATCH = 128


def random_batches(input_shape: Sequence[int], num_classes: int) -> Callable[[int, torch.Generator], tuple]:
    """``make_batch(n, generator)`` of random images ``(n, *input_shape)`` and class indices below ``num_classes``
    (a classifier's step costs the same on any data)."""

    def make_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, *input_shape, generator=gen), torch.randint(0, num_classes, (n,), generator=gen)

    return make_batch


def probe_step_factory(
    model: nn.Module,
    sampler: WidthSampler,
    make_batch: Callable[[int, torch.Generator], tuple[Any, Any]],
    batch_size: int,
    device: torch.device,
    *,
    objective: Objective | None = None,
    seed: int = 0,
) -> Callable[[torch.dtype | None, bool], Callable[[], None]]:
    """Builds one training step of a copy of ``model`` for given numerics, for :func:`~slimmable.hardware.time_step`.

    Args:
        model: the model to be trained (not modified).
        sampler: its width sampler (the probe trains the widths of step 0).
        make_batch: ``make_batch(n, generator) -> (images, targets)``, a batch of ``n`` in the objective's format
            (classifiers: :func:`random_batches`; detectors: real training images, whose boxes set the cost).
        batch_size: images per step.
        device: where to run.
        objective: the training objective (default: classification).
        seed: seeds the batch.

    Returns:
        ``make_step(autocast_dtype, channels_last, batch=None)`` returning a zero-argument step (``batch``
        overrides ``batch_size``).
    """
    widths = sampler.widths_for_step(0, random.Random(seed))
    objective = objective if objective is not None else ClassificationObjective()

    def make_step(dtype: torch.dtype | None, channels_last: bool, batch: int | None = None) -> Callable[[], None]:
        n = batch or batch_size
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        with torch.random.fork_rng(devices=[]):  # drawing the batch must not move the run's random sequence
            x, y = make_batch(n, torch.Generator().manual_seed(seed))
        x, y = objective.to_device(x, y, device, channels_last)
        copy_ = copy.deepcopy(model).to(device, memory_format=fmt).train()
        opt = torch.optim.SGD(copy_.parameters(), lr=1e-3, momentum=0.9)

        def step() -> None:
            with torch.random.fork_rng(devices=[]):  # dropout must not move the run's random sequence
                train_step(copy_, opt, x, y, widths, autocast_dtype=dtype, check_finite=False, objective=objective)

        return step

    return make_step


def decide_numerics(
    amp: str,
    channels_last: bool | str,
    device: torch.device,
    make_step: Callable[[torch.dtype | None, bool], Callable[[], None]] | None,
) -> Numerics:
    """:func:`~slimmable.hardware.choose_numerics`, agreed by every process of a distributed run (rank 0's)."""
    import torch.distributed as dist

    numerics = choose_numerics(amp, channels_last, device, make_step)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box: list[Any] = [numerics]
        dist.broadcast_object_list(box, src=0)
        numerics = box[0]
    return numerics


def measure_step_seconds(step: Callable[[], None], max_seconds: float = 3.0) -> float:
    """Steady-state seconds per training step (median after a warm-up that lasts until the time settles), within
    about ``max_seconds`` of timed steps."""
    return time_step(step, max_seconds=max_seconds, max_steps=8)


@dataclass(frozen=True)
class EpochPlan:
    """How long a run with a time budget trains, and from what measurement.

    The run trains ``total_steps`` optimizer steps: ``epochs - 1`` whole epochs and the first
    ``total_steps - (epochs - 1) * steps_per_epoch`` steps of the last one, so the learning-rate schedule ends
    where the budget does (whole epochs would waste up to one epoch of it). :func:`replan` refits it as the run goes;
    the learning rate follows the budget's time (:class:`~slimmable.train.optim.TimeBudgetFactor`), not this plan.

    Attributes:
        epochs: epochs started (the last may be partial); at most the recipe's ``train.epochs``, at least 1.
        total_steps: optimizer steps of the run (at least one epoch's).
        max_epochs: the recipe's ``train.epochs``.
        budget_minutes: ``train.time_budget_min``.
        seconds_per_step: at start-up the probe's steady-state time at the training batch size with the chosen
            numerics; after a :func:`replan`, the mean of the recent steps (their slowest left out).
        steps_per_epoch: training steps per epoch.
        eval_seconds: seconds of one validation pass: estimated at start-up (a forward costs about a third of a
            step), measured after the first.
        estimated_minutes: the plan's estimated training time, validation included.
        first_total_steps: ``total_steps`` as planned at start-up, before any :func:`replan`.
    """

    epochs: int
    total_steps: int
    max_epochs: int
    budget_minutes: float
    seconds_per_step: float
    steps_per_epoch: int
    eval_seconds: float
    estimated_minutes: float
    first_total_steps: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def epochs_float(self) -> float:
        return self.total_steps / self.steps_per_epoch

    def describe(self) -> str:
        capped = " (the recipe's maximum)" if self.epochs_float >= self.max_epochs else ""
        return (
            f"{self.epochs_float:.2f} epochs ({self.total_steps} steps){capped} fit the {self.budget_minutes:g}-minute "
            f"budget: {self.seconds_per_step:.3f} s/step measured, {self.steps_per_epoch} steps + ~"
            f"{self.eval_seconds:.0f} s validation per epoch, ~{self.estimated_minutes:.1f} min"
        )


def plan_epochs(
    budget_minutes: float,
    max_epochs: int,
    steps_per_epoch: int,
    seconds_per_step: float,
    eval_batches: int,
    eval_widths: int,
    train_widths: int,
) -> EpochPlan:
    """The most training steps (one epoch to ``max_epochs``) whose training and validation fit ``budget_minutes``.

    Args:
        budget_minutes: the time budget.
        max_epochs: upper bound (the recipe's ``train.epochs``).
        steps_per_epoch: training steps per epoch.
        seconds_per_step: measured seconds per step (all its widths).
        eval_batches: validation batches per epoch (0: no validation).
        eval_widths: widths validated per batch.
        train_widths: widths trained per step.
    """
    # a forward pass costs about a third of forward + backward; validation runs eval_widths of them per batch
    eval_seconds = eval_batches * seconds_per_step * eval_widths / max(1, train_widths) / 3
    start = EpochPlan(
        epochs=max_epochs, total_steps=max_epochs * steps_per_epoch, max_epochs=max_epochs,
        budget_minutes=budget_minutes, seconds_per_step=seconds_per_step, steps_per_epoch=steps_per_epoch,
        eval_seconds=eval_seconds, estimated_minutes=0.0,
    )  # fmt: skip
    total, minutes = _fit(start, 0, 0, 0.0, seconds_per_step, eval_seconds)
    return replace(start, epochs=math.ceil(total / steps_per_epoch), total_steps=total, estimated_minutes=minutes)


def _fit(
    plan: EpochPlan, steps_done: int, validations_done: int, spent: float, per_step: float, eval_seconds: float
) -> tuple[int, float]:
    """The most total steps whose remaining training and validations fit the budget, at least one epoch (and at
    least ``steps_done``), at most ``max_epochs``; with the estimated minutes of the whole run."""
    spe, left = plan.steps_per_epoch, plan.budget_minutes * 60 - spent
    best = max(steps_done, min(spe, plan.max_epochs * spe))
    for epochs in range(max(1, validations_done + 1), plan.max_epochs + 1):
        # every epoch still to end is validated once (the current one included)
        afford = math.floor((left - (epochs - validations_done) * eval_seconds) / per_step)
        total = min(epochs * spe, steps_done + afford)
        if total > (epochs - 1) * spe:
            best = max(best, total)
    epochs_left = max(0, math.ceil(best / spe) - validations_done)
    return best, (spent + (best - steps_done) * per_step + epochs_left * eval_seconds) / 60


#: :func:`replan` leaves the plan alone when the new total differs by less than this fraction of it
REPLAN_MIN_CHANGE = 0.01


def replan(
    plan: EpochPlan,
    *,
    steps_done: int,
    validations_done: int,
    spent_seconds: float,
    seconds_per_step: float,
    eval_seconds: float | None = None,
    min_change: float = REPLAN_MIN_CHANGE,
) -> EpochPlan | None:
    """The plan that fits what is left of the budget at the machine's current speed, or ``None`` when the current
    plan is within ``min_change`` of it.

    It shrinks when the run is behind (a busy machine, a probe that was too hopeful) and grows back, up to
    ``max_epochs``, when the run is ahead (the machine got quieter), never below ``steps_done`` nor below one
    epoch. The learning rate does not depend on it (:class:`~slimmable.train.optim.TimeBudgetFactor`).

    Args:
        plan: the current plan.
        steps_done: optimizer steps so far (the run's global step).
        validations_done: epochs ended and validated so far.
        spent_seconds: the budget spent so far: training and validation time, across resumes.
        seconds_per_step: the current speed, e.g. the mean of the last steps (not the average since the start:
            a slow minute must not weigh on the rest of the run).
        eval_seconds: the measured time of one validation (default: the plan's estimate, scaled by the change of the
            steps' speed: a probe on a busy machine overestimates both alike).
        min_change: the least relative change worth a new plan (a plan does not flicker with the noise).
    """
    if seconds_per_step <= 0:
        return None
    # not measured yet: the estimate (a share of a step's time) scales with the steps' speed
    eval_s = plan.eval_seconds * seconds_per_step / plan.seconds_per_step if eval_seconds is None else eval_seconds
    total, minutes = _fit(plan, steps_done, validations_done, spent_seconds, seconds_per_step, eval_s)
    if abs(total - plan.total_steps) < max(1.0, min_change * plan.total_steps):
        return None
    return replace(
        plan, epochs=math.ceil(total / plan.steps_per_epoch), total_steps=total, seconds_per_step=seconds_per_step,
        eval_seconds=eval_s, estimated_minutes=minutes, first_total_steps=plan.first_total_steps or plan.total_steps,
    )  # fmt: skip
