"""Optimizer and learning-rate schedule factories.

Weight decay skips BatchNorm parameters and biases by default (and, like the official recipes, can skip
depthwise convolutions). Every schedule is a function of the optimizer step, so warm-up and decay are smooth
within an epoch and a resumed run continues on the same curve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

__all__ = ["TimeBudgetFactor", "create_optimizer", "create_scheduler", "lr_factor", "param_groups"]

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
SCHEDULES = ("constant", "multistep", "cosine", "linear", "exponential")


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels


def param_groups(
    model: nn.Module, weight_decay: float, *, decay_norm_and_bias: bool = False, decay_depthwise: bool = True
) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed group.

    Args:
        model: the (unwrapped) model.
        weight_decay: decay of the decayed group.
        decay_norm_and_bias: decay normalisation weights and biases too.
        decay_depthwise: decay depthwise convolution weights (the official slimmable recipes do not).

    Returns:
        ``[{"params": decayed, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]``
        (empty groups left out).
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            skip = (not decay_norm_and_bias and (isinstance(module, _NORM_TYPES) or name == "bias")) or (
                not decay_depthwise and _is_depthwise(module)
            )
            (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def create_optimizer(
    model: nn.Module,
    name: str = "sgd",
    lr: float = 0.1,
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    decay_norm_and_bias: bool = False,
    decay_depthwise: bool = True,
) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW over :func:`param_groups`.

    Raises:
        ValueError: unknown optimizer name.
    """
    groups = param_groups(model, weight_decay, decay_norm_and_bias=decay_norm_and_bias, decay_depthwise=decay_depthwise)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    raise ValueError(f"optimizer {name!r} is not one of sgd, adamw")


#: the schedules that decay over the run's length (the others depend on the epoch alone)
_DECAYS = ("cosine", "linear")


def _decay(schedule: str, t: float, min_factor: float) -> float:
    """The ``cosine`` or ``linear`` factor at progress ``t`` in [0, 1]: from 1 down to ``min_factor``."""
    if schedule == "cosine":
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))
    return 1.0 - (1.0 - min_factor) * t


def lr_factor(
    step: int,
    *,
    schedule: str,
    steps_per_epoch: int,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_factor: float = 0.0,
    milestones: Sequence[float] = (),
    gamma: float = 0.1,
    min_factor: float = 0.0,
) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Warm-up rises linearly from ``warmup_factor`` to 1 over ``warmup_steps``; then ``cosine`` and ``linear``
    decay to ``min_factor`` at ``total_steps``, ``multistep`` multiplies by ``gamma`` at each milestone epoch, and
    ``exponential`` by ``gamma`` every epoch.
    """
    if step < warmup_steps:
        return warmup_factor + (1.0 - warmup_factor) * (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule in _DECAYS:
        return _decay(schedule, min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)), min_factor)
    epoch = step / steps_per_epoch
    if schedule == "multistep":
        return gamma ** sum(1 for m in milestones if epoch >= m)
    if schedule == "exponential":
        return gamma ** math.floor(epoch)
    raise ValueError(f"schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")


class TimeBudgetFactor:
    """The learning-rate factor of a run sized to a time budget: the ``cosine`` / ``linear`` decay follows the budget's
    *time*, not a step count.

    A run re-planned to the machine's speed does not know its step count in advance, and a step-based decay refitted
    to a shorter plan while the machine is busy would spend its high rates on a few slow steps and keep them low
    after the machine is quiet again. Here the progress of the decay is ``max(spent / (budget_seconds - reserve),
    step / total_steps)``: the share of the budget spent so far (training and validation; :attr:`spent`, set by the
    caller before every ``scheduler.step()``) up to the last step (:attr:`reserve`: the final validation's seconds),
    or of the most steps the run may take (``train.epochs``), whichever is further. It rises steadily with time, so
    the rate never jumps, a slow minute costs that minute and no more, and the rate reaches its end with the budget
    or with the last allowed step. Warm-up is over steps, as in
    :func:`lr_factor`; the decay starts where the warm-up ends. Other schedules (``constant``, ``multistep``,
    ``exponential``) do not depend on the run's length and follow :func:`lr_factor`.

    Its attributes are plain numbers (and a dict of them), so ``LambdaLR.state_dict()`` saves them and a resumed
    run continues on the same curve.

    Args:
        budget_seconds: the time budget.
        schedule: the keyword arguments of :func:`lr_factor` (its ``total_steps``: the most steps the run may take).
    """

    def __init__(self, budget_seconds: float, schedule: dict[str, Any]) -> None:
        if budget_seconds <= 0 or schedule["total_steps"] < 1:
            raise ValueError(
                f"a time budget needs budget_seconds > 0 and total_steps >= 1, got {budget_seconds}, "
                f"{schedule['total_steps']}"
            )
        self.budget_seconds = float(budget_seconds)
        self.lr_factor_kwargs = dict(schedule)
        #: seconds of the budget spent so far (the caller sets it before every ``scheduler.step()``)
        self.spent = 0.0
        #: seconds the budget keeps after the last step (the final validation; the caller may update it)
        self.reserve = 0.0
        #: the progress when the warm-up ended (the decay runs from there to 1)
        self.warmup_end: float | None = None

    def progress(self, step: int) -> float:
        """The run's progress in [0, 1]: the larger of its share of the budget spent and of its most steps."""
        usable = max(1e-9, self.budget_seconds - self.reserve)
        return min(1.0, max(self.spent / usable, step / self.lr_factor_kwargs["total_steps"]))

    def __call__(self, step: int) -> float:
        kw = self.lr_factor_kwargs
        if step < kw.get("warmup_steps", 0) or kw["schedule"] not in _DECAYS:
            return lr_factor(step, **kw)
        p = self.progress(step)
        if self.warmup_end is None:
            self.warmup_end = p
        t = 1.0 if self.warmup_end >= 1.0 else min(1.0, (p - self.warmup_end) / (1.0 - self.warmup_end))
        return _decay(kw["schedule"], t, kw.get("min_factor", 0.0))


def create_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str = "cosine",
    *,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    warmup_factor: float = 0.0,
    milestones: Sequence[float] = (),
    gamma: float = 0.1,
    min_lr: float = 0.0,
    total_steps: int | None = None,
    budget_seconds: float | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` (call ``scheduler.step()`` after every optimizer step).

    ``total_steps`` (default ``epochs * steps_per_epoch``) ends the schedule early. With ``budget_seconds`` (a run
    sized to a time budget), the factor is a :class:`TimeBudgetFactor` whose decay follows the budget's time, with
    ``total_steps`` the most steps the run may take; set ``scheduler.lr_lambdas[0].spent`` before every step.

    Raises:
        ValueError: unknown schedule, or ``min_lr`` above the learning rate.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    base = optimizer.param_groups[0]["lr"]
    if min_lr > base:
        raise ValueError(f"optim.min_lr {min_lr} is above optim.lr {base}; lower it")
    kw = {
        "schedule": schedule,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps if total_steps is not None else epochs * steps_per_epoch,
        "warmup_steps": round(warmup_epochs * steps_per_epoch),
        "warmup_factor": warmup_factor,
        "milestones": list(milestones),  # plain: a time budget's factor is saved in the scheduler's state
        "gamma": gamma,
        "min_factor": min_lr / base,
    }
    fn = TimeBudgetFactor(budget_seconds, kw) if budget_seconds is not None else partial(lr_factor, **kw)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
