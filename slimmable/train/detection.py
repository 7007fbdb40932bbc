"""Algorithm 1 for detectors, and COCO evaluation at every width.

:func:`detection_train_step` is the paper's training step for slimmable detectors (Yu et al., ICLR 2019, Alg. 1
and Sec. 4.2): for each width, a forward pass of the whole detector on the batch and a backward pass of its summed
losses (RPN objectness and box regression, RoI classification and box regression, plus mask or keypoint losses);
the gradients of all widths accumulate; then optional gradient clipping by norm and one optimizer step.

:func:`evaluate_detector` runs a detector at each width over a COCO-format dataset and scores it with
``COCOeval`` (:func:`slimmable.data.coco.coco_evaluate`). Under ``torch.distributed`` each process runs every
``world_size``-th image and the detections are gathered, so every process scores the whole dataset once.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .._utils import unwrap_model
from ..data.coco import IOU_TYPES, CocoDetectionDataset, coco_evaluate, collate_detection, detections_to_coco
from ..nn import get_widths, use_width
from .engine import train_step
from .nonfinite import NonFiniteLoss
from .objectives import DetectionObjective

__all__ = ["detection_iou_types", "detection_train_step", "evaluate_detector"]


def _widths_of(model: nn.Module, widths: Sequence[float] | None) -> tuple[float, ...]:
    if widths is not None:
        return tuple(float(w) for w in widths)
    ws = get_widths(model)
    if ws.is_range:
        raise ValueError("a universally slimmable model has no fixed widths; pass widths=...")
    return ws.switches


def detection_train_step(
    model: nn.Module,
    images: Sequence[torch.Tensor],
    targets: Sequence[Mapping[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    widths: Sequence[float] | None = None,
    *,
    max_grad_norm: float | None = None,
) -> dict[float, dict[str, float]]:
    """One step of Algorithm 1 on a slimmable detector, with each width's loss terms: :func:`train_step` with a
    :class:`~slimmable.train.objectives.DetectionObjective` (every width's summed losses backward, then clipping
    and one step); the model's width is restored.

    Args:
        model: a slimmable torchvision detector in training mode (e.g. ``create_model("slim_maskrcnn_resnet18_fpn")``).
        images: the batch, ``(C, H, W)`` tensors in [0, 1] (sizes may differ).
        targets: one target dict per image (``boxes`` ``xyxy``, ``labels``, and ``masks``/``keypoints`` as the
            model needs), as :class:`~slimmable.data.coco.CocoDetectionDataset` yields them.
        optimizer: the optimizer over the model's parameters.
        widths: the widths to train, in order (default all of the model's).
        max_grad_norm: clip the accumulated gradient to this total norm before the step (the paper: 35).

    Returns:
        ``{width: {loss name: value, ..., "loss": sum}}`` (values before the step).

    Raises:
        FloatingPointError: a width's loss is not finite; the optimizer has not stepped (its gradients are
            discarded).
        ValueError: the model is not in training mode (torchvision detectors then return detections, no losses).
    """
    if not model.training:
        raise ValueError("detection_train_step needs the model in training mode (call model.train() first)")
    ws = _widths_of(model, widths)
    objective = DetectionObjective(record_components=True)
    try:
        with use_width(model, ws[0]):
            res = train_step(model, optimizer, images, targets, ws, grad_clip=max_grad_norm, objective=objective)
    except NonFiniteLoss as err:
        bad = next(w for w, v in zip(err.widths, err.losses.tolist()) if not math.isfinite(v))
        raise FloatingPointError(
            f"non-finite detection loss at width {bad:g}: {err}; lower the learning rate, add warm-up or clip "
            "gradients (max_grad_norm)"
        ) from None
    return {w: {**objective.components[i], "loss": float(res.losses[i])} for i, w in enumerate(ws)}


def detection_iou_types(model: nn.Module) -> tuple[str, ...]:
    """The COCO IoU types a torchvision detector predicts: ``bbox``, plus ``segm`` (masks) or ``keypoints``."""
    heads = unwrap_model(model).roi_heads
    types = ["bbox"]
    if getattr(heads, "mask_predictor", None) is not None:
        types.append("segm")
    if getattr(heads, "keypoint_predictor", None) is not None:
        types.append("keypoints")
    return tuple(types)


@torch.no_grad()
def evaluate_detector(
    model: nn.Module,
    dataset: CocoDetectionDataset,
    widths: Sequence[float] | None = None,
    *,
    iou_types: Sequence[str] | None = None,
    batch_size: int = 8,
    kpt_oks_sigmas: Sequence[float] | None = None,
    batches: Iterable[tuple[list[torch.Tensor], list[dict]]] | None = None,
) -> dict[float, dict[str, dict[str, float]]]:
    """COCO AP of a detector at each width on a COCO-format dataset (eval mode; the model's mode is restored).

    Args:
        model: a slimmable torchvision detector, or a dense one (an export: evaluated once, under the key
            ``None``).
        dataset: the COCO-format dataset (its ``coco`` index is the ground truth).
        widths: the widths to evaluate (default all of the model's).
        iou_types: any of ``bbox``, ``segm``, ``keypoints`` (default what the model predicts).
        batch_size: images per forward pass.
        kpt_oks_sigmas: per-keypoint OKS constants (see :func:`~slimmable.data.coco.coco_evaluate`).
        batches: ``(images, targets)`` batches to use instead of iterating ``dataset`` in order (targets need
            ``image_id``). They are run as given: not sharded over a distributed run's processes.

    Returns:
        ``{width: {iou_type: {"AP": ..., "AP50": ..., "AP75": ...}}}``, the same in every process of a
        distributed run (a collective: every process must call it).
    """
    types = tuple(iou_types) if iou_types is not None else detection_iou_types(model)
    bad = [t for t in types if t not in IOU_TYPES]
    if bad:
        raise ValueError(f"iou_types {bad} are not among {IOU_TYPES}")
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    model.eval()
    try:
        ws: tuple[float | None, ...] = _widths_of(model, widths) if _is_slim(model) else (None,)
        rank, world = _shard() if batches is None else (0, 1)
        out: dict = {}
        for w in ws:
            results: list[dict] = []
            with use_width(model, w) if w is not None else contextlib.nullcontext():
                for images, targets in batches if batches is not None else _batches(dataset, batch_size, rank, world):
                    dets = model([img.to(device, non_blocking=True) for img in images])
                    for t, det in zip(targets, dets):
                        results += detections_to_coco(int(t["image_id"]), det)
            if world > 1:  # every process scores all of them: COCOeval is cheap next to the forward passes
                parts: list[Any] = [None] * world
                dist.all_gather_object(parts, results)
                results = [r for part in parts for r in part]
            out[w] = coco_evaluate(dataset.coco, results, types, kpt_oks_sigmas=kpt_oks_sigmas, image_ids=dataset.ids)
        return out
    finally:
        model.train(was_training)


def _is_slim(model: nn.Module) -> bool:
    from ..nn import SlimModule

    return any(isinstance(m, SlimModule) for m in model.modules())


def _shard() -> tuple[int, int]:
    """This process's rank and the world size (0, 1 outside a distributed run)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _batches(
    dataset: CocoDetectionDataset, batch_size: int, rank: int = 0, world: int = 1
) -> Iterable[tuple[list[torch.Tensor], list[dict]]]:
    """The images ``rank, rank + world, ...`` of ``dataset`` in batches."""
    indices = range(rank, len(dataset), world)
    for start in range(0, len(indices), batch_size):
        yield collate_detection([dataset[i] for i in indices[start : start + batch_size]])
