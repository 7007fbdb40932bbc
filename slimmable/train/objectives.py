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
from torch import nn

from ..tasks.base import Objective

__all__ = ["ClassificationObjective", "DetectionObjective", "Objective", "distillation_kl", "soft_cross_entropy"]


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a probability distribution (in-place distillation), averaged over the batch.

    Args:
        logits: ``(N, K)`` student logits.
        target_probs: ``(N, K)`` teacher probabilities (no gradient flows into them).
    """
    return -(target_probs * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def distillation_kl(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(logits / T))``, averaged over the batch (Hinton et al. 2015).

    The ``T^2`` factor keeps the gradients on the scale of a cross-entropy's whatever the temperature.

    Args:
        logits: ``(N, K)`` student logits.
        teacher_logits: ``(N, K)`` teacher logits (no gradient flows into them).
        temperature: ``T > 0``.
    """
    t = float(temperature)
    log_p = F.log_softmax(logits.float() / t, dim=1)
    log_q = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * (t * t)


class ClassificationObjective(Objective):
    """Cross-entropy on class indices, with optional label smoothing, in-place distillation and a teacher.

    How a width's loss is made: its *target loss* is the labels' cross-entropy, or, with in-place distillation,
    for every width after the first (widest) one, the soft cross-entropy with the widest width's detached
    predictions. With a teacher (:meth:`set_teacher`) the loss is ``alpha * T^2 * KL(teacher || width) +
    (1 - alpha) * target loss``: every width learns the teacher, and in-place distillation still decides what the
    rest of the loss follows. The teacher runs once per step, on the first width's call, under the same autocast.

    Args:
        label_smoothing: label smoothing of the cross-entropy.
        inplace_distill: widths after the first learn the first (widest) width's detached soft predictions
            (US-Nets' in-place distillation) instead of the labels.
    """

    def __init__(self, label_smoothing: float = 0.0, inplace_distill: bool = False) -> None:
        self.label_smoothing, self.inplace_distill = label_smoothing, inplace_distill
        self._widest: torch.Tensor | None = None  # in-place distillation's target of this step
        self.teacher: nn.Module | None = None
        self.temperature, self.teacher_weight = 4.0, 0.5
        self._teacher_logits: torch.Tensor | None = None  # the teacher's logits of this step's batch

    def set_teacher(self, teacher: nn.Module, temperature: float, weight: float) -> None:
        if not 0 < weight <= 1 or temperature <= 0:
            raise ValueError(f"teacher weight {weight} must be in (0, 1] and temperature {temperature} above 0")
        self.teacher, self.temperature, self.teacher_weight = teacher, float(temperature), float(weight)

    def begin_step(self) -> None:
        self._widest = None
        self._teacher_logits = None

    def width_loss(
        self, forward: Callable[..., Any], images: torch.Tensor, targets: torch.Tensor, index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = forward(images).float()
        loss = self._target_loss(logits, targets)
        if self.teacher is not None:
            kd = distillation_kl(logits, self._teacher_output(images, logits), self.temperature)
            alpha = self.teacher_weight
            loss = kd if alpha == 1.0 else alpha * kd + (1.0 - alpha) * loss
        if self.inplace_distill and index == 0:
            self._widest = F.softmax(logits.detach(), dim=1)
        return loss, (logits.detach().argmax(dim=1) == targets).sum()

    def _target_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self._widest is not None:
            return soft_cross_entropy(logits, self._widest)
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    def _teacher_output(self, images: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self._teacher_logits is None:  # once per step: every width learns the same teacher output
            assert self.teacher is not None
            with torch.no_grad():
                out = self.teacher(images).float()
            if out.shape != logits.shape:
                raise ValueError(
                    f"train.teacher answers {tuple(out.shape)} logits but the model {tuple(logits.shape)}: the teacher "
                    "must predict the same classes (num_classes)"
                )
            self._teacher_logits = out
        return self._teacher_logits


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
