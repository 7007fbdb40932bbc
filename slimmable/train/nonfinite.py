"""Divergence: a non-finite training loss stops the run (or, on request, skips the step) before the update.

The check costs one device-to-host copy per optimizer step (of one flag computed from the stacked per-width
losses), plus one scalar all-reduce per step in a distributed run so that every process takes the same decision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["NONFINITE_MODES", "NonFiniteLoss", "NonFiniteLossError", "losses_are_finite", "with_checkpoint_note"]

#: ``train.nonfinite``: ``stop`` raises :class:`NonFiniteLossError`; ``skip`` drops the step and counts it
NONFINITE_MODES = ("stop", "skip")


class NonFiniteLoss(Exception):
    """Raised by :func:`~slimmable.train.train_step` before the optimizer step when a loss is NaN or infinite.

    The gradients are cleared and the parameters are unchanged. :class:`~slimmable.train.Trainer` turns it into
    :class:`NonFiniteLossError` (``train.nonfinite: stop``) or skips the step (``skip``).

    Attributes:
        widths: the widths of the step.
        losses: their losses (on the CPU).
    """

    def __init__(self, widths: Sequence[Any], losses: torch.Tensor) -> None:
        self.widths = list(widths)
        self.losses = losses.detach().float().cpu()
        super().__init__(describe_losses(self.widths, self.losses))


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite: the run stopped without saving the diverged weights."""


def _label(width: Any) -> str:
    return "per-layer" if isinstance(width, Mapping) else f"{width:g}"


def describe_losses(widths: Sequence[Any], losses: torch.Tensor) -> str:
    """``"width 1: nan, width 0.5: inf"``: the widths whose loss is not finite, with their values."""
    bad = [f"width {_label(w)}: {float(v)}" for w, v in zip(widths, losses.tolist()) if not math.isfinite(v)]
    if not bad:  # another process diverged (distributed)
        return "a non-finite loss on another process"
    return ", ".join(bad)


def losses_are_finite(losses: torch.Tensor) -> bool:
    """Whether every loss is finite, agreed by all processes (one host sync; one all-reduce when distributed)."""
    bad = (~torch.isfinite(losses)).any().float().reshape(1)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


def stop_message(err: NonFiniteLoss, epoch: int, step: int, batch: int, steps_in_epoch: int) -> str:
    """The one-line message of :class:`NonFiniteLossError` for a step that diverged."""
    return (
        f"training diverged: non-finite loss at epoch {epoch + 1}, batch {batch}/{steps_in_epoch} (step {step}), "
        f"{err}. The weights were not updated with it. Lower optim.lr, set optim.grad_clip, or set "
        "train.nonfinite=skip to skip such steps"
    )


def with_checkpoint_note(err: NonFiniteLossError, last_checkpoint: Path) -> NonFiniteLossError:
    """``err`` with a sentence saying which checkpoint the run kept (nothing diverged was saved)."""
    if last_checkpoint.exists():
        note = f"Nothing was saved; {last_checkpoint} holds the last good state (resume with --resume)"
    else:
        note = "Nothing was saved (no epoch finished)"
    return NonFiniteLossError(f"{err} {note}")
