"""Optimizer and learning-rate schedule factories.

Weight decay skips BatchNorm parameters and biases by default (and, like the official recipes, can skip
depthwise convolutions). Every schedule is a function of the optimizer step, so warm-up and decay are smooth
within an epoch and a resumed run continues on the same curve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

__all__ = ["create_optimizer", "create_scheduler", "lr_factor", "param_groups", "set_total_steps"]

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
    anchor: tuple[int, float] | None = None,
) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Warm-up rises linearly from ``warmup_factor`` to 1 over ``warmup_steps``; then ``cosine`` and ``linear``
    decay to ``min_factor`` at ``total_steps``, ``multistep`` multiplies by ``gamma`` at each milestone epoch, and
    ``exponential`` by ``gamma`` every epoch.

    ``cosine`` and ``linear`` follow a progress ``t`` from 0 (end of warm-up) to 1 (``total_steps``). ``anchor =
    (s, t_s)`` says the schedule was refitted at step ``s``, where its progress was ``t_s``: from there ``t`` runs
    linearly from ``t_s`` to 1 at ``total_steps``, so a run whose length changes keeps a continuous rate
    (:func:`set_total_steps`).
    """
    if step < warmup_steps:
        return warmup_factor + (1.0 - warmup_factor) * (step + 1) / warmup_steps
    s0, t0 = anchor if anchor is not None and anchor[0] > warmup_steps else (warmup_steps, 0.0)
    if step >= s0:
        t = min(1.0, t0 + (1.0 - t0) * (step - s0) / max(1, total_steps - s0))
    else:  # before the anchor (only asked for when looking back): the line that led to it
        t = t0 * (step - warmup_steps) / max(1, s0 - warmup_steps)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "linear":
        return 1.0 - (1.0 - min_factor) * t
    epoch = step / steps_per_epoch
    if schedule == "multistep":
        return gamma ** sum(1 for m in milestones if epoch >= m)
    if schedule == "exponential":
        return gamma ** math.floor(epoch)
    raise ValueError(f"schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")


def set_total_steps(
    scheduler: torch.optim.lr_scheduler.LambdaLR, total_steps: int, at_step: int | None = None
) -> tuple[int, float] | None:
    """End a :func:`create_scheduler` schedule at ``total_steps`` (a run sized to a time budget that is re-planned:
    the cosine / linear decay then reaches its end with the run).

    With ``at_step`` (the next step to run), the schedule is refitted there without a jump: the rate at
    ``at_step`` is the one the old schedule gave, and the decay continues from it to the new end.

    Returns:
        The schedule's new ``anchor`` (see :func:`lr_factor`), to be recorded for a resume; ``None`` without
        ``at_step``.
    """
    fn = scheduler.lr_lambdas[0]
    if not isinstance(fn, partial) or "total_steps" not in fn.keywords:
        raise TypeError("set_total_steps needs a scheduler made by create_scheduler")
    kw = dict(fn.keywords)
    anchor = None
    if at_step is not None:
        anchor = (int(at_step), schedule_progress(int(at_step), kw))
        kw["anchor"] = anchor
    kw["total_steps"] = int(total_steps)
    scheduler.lr_lambdas[0] = partial(fn.func, *fn.args, **kw)
    return anchor


def schedule_progress(step: int, keywords: dict) -> float:
    """The progress ``t`` in [0, 1] of a :func:`lr_factor` schedule (its keyword arguments) at ``step``."""
    w, total = keywords.get("warmup_steps", 0), keywords["total_steps"]
    if step <= w:
        return 0.0
    s0, t0 = keywords.get("anchor") or (w, 0.0)
    if s0 <= w:
        s0, t0 = w, 0.0
    if step >= s0:
        return min(1.0, t0 + (1.0 - t0) * (step - s0) / max(1, total - s0))
    return t0 * (step - w) / max(1, s0 - w)


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
    anchor: tuple[int, float] | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` (call ``scheduler.step()`` after every optimizer step).

    ``total_steps`` (default ``epochs * steps_per_epoch``) ends the schedule early, e.g. within a partial last
    epoch of a run sized to a time budget; ``anchor`` is where :func:`set_total_steps` last refitted it (a resumed
    run passes its plan's).

    Raises:
        ValueError: unknown schedule, or ``min_lr`` above the learning rate.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    base = optimizer.param_groups[0]["lr"]
    if min_lr > base:
        raise ValueError(f"optim.min_lr {min_lr} is above optim.lr {base}; lower it")
    fn = partial(
        lr_factor,
        schedule=schedule,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps if total_steps is not None else epochs * steps_per_epoch,
        warmup_steps=round(warmup_epochs * steps_per_epoch),
        warmup_factor=warmup_factor,
        milestones=tuple(milestones),
        gamma=gamma,
        min_factor=min_lr / base,
        anchor=tuple(anchor) if anchor is not None else None,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
