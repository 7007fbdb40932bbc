"""Divergence: a non-finite training loss stops the run (or, on request, skips the step) before the update.

The check costs one device-to-host copy per optimizer step (of one flag computed from the stacked per-width
losses), plus one scalar all-reduce per step in a DDP run so that every process takes the same decision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "NONFINITE_MODES",
    "NonFiniteLoss",
    "NonFiniteLossError",
    "losses_are_finite",
    "restore_buffers",
    "snapshot_buffers",
    "with_checkpoint_note",
]

#: ``train.nonfinite``: ``stop`` raises :class:`NonFiniteLossError`; ``skip`` drops the step and counts it
NONFINITE_MODES = ("stop", "skip")


class NonFiniteLoss(Exception):
    """Raised by :func:`~slimmable.train.train_step` before the optimizer step when a loss is NaN or infinite.

    The gradients are cleared; the parameters and the optimizer state are unchanged, but the buffers (BatchNorm
    running statistics) hold what the non-finite forward pass left (see :func:`snapshot_buffers`).
    :class:`~slimmable.train.Trainer` turns it into :class:`NonFiniteLossError` (``train.nonfinite: stop``) or
    skips the step (``skip``).

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


def losses_are_finite(losses: torch.Tensor, all_processes: bool = False) -> bool:
    """Whether every loss is finite (one host sync).

    Args:
        losses: the step's per-width losses.
        all_processes: agree over all processes of the default group (one scalar all-reduce): a DDP step, where
            one process's NaN gradients reach every process.
    """
    bad = (~torch.isfinite(losses)).any().float().reshape(1)
    if all_processes and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


def snapshot_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """Copies of ``model``'s buffers (BN running statistics: small), taken before a step that may be skipped."""
    return [b.detach().clone() for b in model.buffers()]


@torch.no_grad()
def restore_buffers(model: torch.nn.Module, snapshot: Sequence[torch.Tensor]) -> None:
    """Put back what :func:`snapshot_buffers` copied (a skipped step's forward passes updated the BN statistics)."""
    for b, saved in zip(model.buffers(), snapshot):
        b.copy_(saved)


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
