"""What one width of an Algorithm-1 step computes, per task: the loss to backpropagate and what to count.

:func:`slimmable.train.train_step` owns the algorithm (switch width, forward and backward per width with the
gradients accumulating, one optimizer step; DDP ``no_sync``, autocast, the gradient scaler, non-finite checks,
clipping). An objective owns the task: how a batch is moved to the device, how the model is called and what its
loss is. The :class:`Objective` protocol lives with the tasks (:mod:`slimmable.tasks.base`): a new task writes its
objective in its own module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..tasks.base import Objective

__all__ = ["ClassificationObjective", "DetectionObjective", "Objective", "soft_cross_entropy"]


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a probability distribution (in-place distillation), averaged over the batch.

    Args:
        logits: ``(N, K)`` student logits.
        target_probs: ``(N, K)`` teacher probabilities (no gradient flows into them).
    """
    return -(target_probs * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


class ClassificationObjective(Objective):
    """Cross-entropy on class indices, with optional label smoothing and in-place distillation.

    Args:
        label_smoothing: label smoothing of the cross-entropy.
        inplace_distill: widths after the first learn the first (widest) width's detached soft predictions
            (US-Nets' in-place distillation) instead of the labels.
    """

    def __init__(self, label_smoothing: float = 0.0, inplace_distill: bool = False) -> None:
        self.label_smoothing, self.inplace_distill = label_smoothing, inplace_distill
        self._teacher: torch.Tensor | None = None

    def begin_step(self) -> None:
        self._teacher = None

    def width_loss(
        self, forward: Callable[..., Any], images: torch.Tensor, targets: torch.Tensor, index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = forward(images).float()
        if self._teacher is not None:
            loss = soft_cross_entropy(logits, self._teacher)
        else:
            loss = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        if self.inplace_distill and index == 0:
            self._teacher = F.softmax(logits.detach(), dim=1)
        return loss, (logits.detach().argmax(dim=1) == targets).sum()


class DetectionObjective(Objective):
    """A torchvision detector's summed losses (RPN objectness and box regression, RoI classification and box
    regression, and mask or keypoint losses), as the paper trains slimmable detectors.

    Batches are ``(list of (C, H, W) images, list of target dicts)``, as
    :func:`slimmable.data.coco.collate_detection` makes them; the detector normalises and resizes them itself, so
    ``channels_last`` does not apply to its inputs.
    """

    counts_correct = False

    def __init__(self, record_components: bool = False) -> None:
        self.record_components = record_components
        #: with ``record_components``: each width's loss terms of the last step, in order (one host sync each)
        self.components: list[dict[str, float]] = []

    def begin_step(self) -> None:
        self.components = []

    def width_loss(
        self,
        forward: Callable[..., Any],
        images: Sequence[torch.Tensor],
        targets: Sequence[Mapping[str, torch.Tensor]],
        index: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        losses = forward(list(images), [dict(t) for t in targets])
        if not isinstance(losses, Mapping):
            raise TypeError(
                f"the detector returned {type(losses).__name__}, not a dict of losses: it must be in training mode"
            )
        loss = torch.stack([v.float() for v in losses.values()]).sum()
        if self.record_components:
            self.components.append({k: float(v.detach()) for k, v in losses.items()})
        return loss, torch.zeros((), device=loss.device)

    def to_device(
        self,
        images: Sequence[torch.Tensor],
        targets: Sequence[Mapping[str, torch.Tensor]],
        device: torch.device,
        channels_last: bool,
    ) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        moved = [img.to(device, non_blocking=True) for img in images]
        return moved, [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]

    def batch_size(self, targets: Sequence[Any]) -> int:
        return len(targets)
