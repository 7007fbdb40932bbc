"""Semantic segmentation: the confusion matrix, mIoU and pixel accuracy, evaluation at every width, and the loss.

The models are torchvision-style segmenters: ``model(images)`` returns a dict whose ``"out"`` holds logits
``(N, K, H, W)`` at the input's resolution (and ``"aux"`` the auxiliary head's, in training). Masks hold class
indices ``0 .. K - 1`` and :data:`~slimmable.data.segmentation.IGNORE_INDEX` (255) for pixels that count nowhere.

Scores follow the usual definitions (torchvision's segmentation reference, the PASCAL VOC and Cityscapes
benchmarks): from the confusion matrix ``C`` summed over the whole dataset (``C[t, p]``: pixels of class ``t``
predicted ``p``), class ``k``'s IoU is ``C[k, k] / (row k + column k - C[k, k])``; the mIoU averages it over the
classes with a non-empty union (present in the targets or the predictions); the pixel accuracy is
``trace(C) / sum(C)``. All in percent.

:func:`evaluate_segmenter` shards a dataset's images over the processes of a ``torch.distributed`` run (as
:func:`~slimmable.train.detection.evaluate_detector` does) and all-reduces the confusion matrices, so every process
returns the scores of the whole dataset.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from ..data.segmentation import IGNORE_INDEX
from ..nn import use_width
from .detection import _is_slim, _shard, _widths_of

__all__ = ["confusion_matrix", "evaluate_segmenter", "segmentation_loss", "segmentation_scores"]


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """The ``(num_classes, num_classes)`` int64 confusion matrix of predictions against targets.

    Args:
        pred: predicted class indices, the shape of ``target``; or logits with a class dimension after the batch
            dimension (``(N, K, H, W)`` for targets ``(N, H, W)``), reduced by ``argmax``.
        target: true class indices; pixels equal to ``ignore_index`` are not counted.
        num_classes: ``K``.
        ignore_index: the target value of pixels to leave out.

    Returns:
        ``C`` with ``C[t, p]`` the number of pixels of class ``t`` predicted as ``p``, on ``target``'s device.

    Raises:
        ValueError: shapes that do not match, or a (non-ignored) class index outside ``0 .. num_classes - 1``.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if pred.dim() == target.dim() + 1 and pred.is_floating_point():
        if pred.shape[1] != num_classes:
            raise ValueError(
                f"logits of shape {tuple(pred.shape)} have {pred.shape[1]} classes, not num_classes {num_classes}"
            )
        pred = pred.argmax(1)
    if pred.shape != target.shape:
        raise ValueError(
            f"predictions of shape {tuple(pred.shape)} do not match targets of shape {tuple(target.shape)}; give one "
            "class index per target pixel (or logits (N, K, H, W) for targets (N, H, W))"
        )
    if pred.is_floating_point() or target.is_floating_point():
        raise ValueError("predictions and targets must be integer class indices (targets: int64 masks)")
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    if t.numel():
        for name, v in (("target", t), ("prediction", p)):
            lo, hi = int(v.min()), int(v.max())
            if lo < 0 or hi >= num_classes:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"{name} class index {bad} is outside 0..{num_classes - 1} (num_classes {num_classes}; "
                    f"{ignore_index} is ignored in targets); check num_classes and the masks"
                )
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(confusion: torch.Tensor) -> dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU (percent) of a confusion matrix (see the module's description).

    Args:
        confusion: ``(K, K)`` counts, rows the true classes, columns the predicted ones (:func:`confusion_matrix`).

    Returns:
        ``{"miou": float, "pixel_acc": float, "per_class_iou": [float | None] * K}``; a class with an empty union
        (in neither the targets nor the predictions) has IoU ``None`` and is left out of the mean. With no pixels
        at all, mIoU and pixel accuracy are 0.

    Raises:
        ValueError: not a square matrix, or negative counts.
    """
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"a confusion matrix is square (K, K), got shape {tuple(confusion.shape)}")
    c = confusion.detach().double().cpu()
    if (c < 0).any():
        raise ValueError("a confusion matrix counts pixels; it has negative entries")
    tp = c.diag()
    union = c.sum(0) + c.sum(1) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp_min(1), torch.zeros_like(tp)) * 100
    total = float(c.sum())
    return {
        "miou": float(iou[present].mean()) if bool(present.any()) else 0.0,
        "pixel_acc": 100.0 * float(tp.sum()) / total if total else 0.0,
        "per_class_iou": [float(v) if ok else None for v, ok in zip(iou.tolist(), present.tolist())],
    }


def _logits(output: Any, key: str = "out") -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and key in output:
        return output[key]
    keys = f" with keys {sorted(output)}" if isinstance(output, Mapping) else ""
    raise ValueError(
        f"a segmenter's output is a dict with {key!r} logits (N, K, H, W) (torchvision's segmentation models) or "
        f"that tensor, got {type(output).__name__}{keys}"
    )


def segmentation_loss(
    output: Mapping[str, torch.Tensor] | torch.Tensor,
    target: torch.Tensor,
    aux_weight: float = 0.5,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Pixel-wise cross-entropy of a segmenter's output, as torchvision's segmentation reference computes it:
    ``CE(out) + aux_weight * CE(aux)`` (the ``aux`` term only where the output has one).

    Each cross-entropy is the mean over the pixels whose target is not ``ignore_index``; a batch whose pixels are
    all ignored gives 0 (with gradients) rather than NaN.

    Args:
        output: the model's dict with ``out`` (and optionally ``aux``) logits ``(N, K, H, W)``, or the ``out``
            logits.
        target: ``(N, H, W)`` int64 class indices.
        aux_weight: the weight of the auxiliary loss.
        ignore_index: the target value of pixels left out.

    Raises:
        ValueError: an output without ``out``, or logits whose shape does not match the target's.
    """
    heads = {"out": _logits(output)}
    if isinstance(output, Mapping) and output.get("aux") is not None:
        heads["aux"] = output["aux"]
    valid = (target != ignore_index).sum().clamp_min(1)
    losses = {}
    for name, logits in heads.items():
        if logits.dim() != target.dim() + 1 or logits.shape[2:] != target.shape[1:] or len(logits) != len(target):
            raise ValueError(
                f"{name} logits of shape {tuple(logits.shape)} do not match targets of shape {tuple(target.shape)}; "
                "the model must return (N, K, H, W) logits at the masks' resolution"
            )
        losses[name] = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum") / valid
    return losses["out"] + aux_weight * losses["aux"] if "aux" in losses else losses["out"]


def _dataset_batches(
    dataset: Dataset, batch_size: int, rank: int, world: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The images ``rank, rank + world, ...`` of ``dataset`` as stacked batches; images of different sizes go in
    separate batches."""
    indices = range(rank, len(dataset), world)  # type: ignore[arg-type]
    for start in range(0, len(indices), batch_size):
        groups: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for i in indices[start : start + batch_size]:
            image, mask = dataset[i]
            groups.setdefault(tuple(image.shape), []).append((image, mask))
        for items in groups.values():
            yield torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def evaluate_segmenter(
    model: nn.Module,
    data: Dataset | Iterable[tuple[torch.Tensor, torch.Tensor]],
    widths: Sequence[float] | None = None,
    *,
    batch_size: int = 8,
    ignore_index: int = IGNORE_INDEX,
) -> dict[float | None, dict[str, Any]]:
    """mIoU, pixel accuracy and per-class IoU (:func:`segmentation_scores`) of a segmenter at each width.

    The model runs in eval mode under ``torch.inference_mode`` (its mode and width are restored); the confusion
    matrices of all images are summed and scored once per width.

    Args:
        model: a slimmable segmenter returning ``{"out": logits (N, K, H, W)}`` at the input's resolution (or the
            logits), or a dense one (an export: evaluated once, under the key ``None``).
        data: a map-style dataset of ``(image (C, H, W), mask (H, W))`` (e.g.
            :class:`~slimmable.data.segmentation.SegmentationDataset`), run in batches of ``batch_size`` and, in a
            distributed run, sharded: each process runs every ``world_size``-th image. Anything else is iterated as
            ``(images (N, C, H, W), masks (N, H, W))`` batches as given (a ``DataLoader``; shard it with its
            sampler).
        widths: the widths to evaluate (default all of the model's).
        batch_size: images per forward pass (datasets only).
        ignore_index: the mask value of pixels not counted.

    Returns:
        ``{width: {"miou", "pixel_acc", "per_class_iou"}}``, the same in every process of a distributed run (a
        collective: every process must call it, with the same widths).

    Raises:
        ValueError: logits not at the masks' resolution, a mask class index the model has no output for.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    is_dataset = isinstance(data, Dataset) and not isinstance(data, IterableDataset)
    rank, world = _shard()
    model.eval()
    try:
        ws: tuple[float | None, ...] = _widths_of(model, widths) if _is_slim(model) else (None,)
        out: dict[float | None, dict[str, Any]] = {}
        for w in ws:
            confusion: torch.Tensor | None = None
            with use_width(model, w) if w is not None else contextlib.nullcontext(), torch.inference_mode():
                batches = _dataset_batches(data, batch_size, rank, world) if is_dataset else data
                for images, masks in batches:  # type: ignore[union-attr]
                    masks = masks.to(device, non_blocking=True)
                    logits = _logits(model(images.to(device, non_blocking=True)))
                    if logits.dim() != 4 or logits.shape[2:] != masks.shape[-2:] or len(logits) != len(masks):
                        raise ValueError(
                            f"the model's logits have shape {tuple(logits.shape)} for masks {tuple(masks.shape)}; "
                            "a segmenter returns (N, K, H, W) logits at the input's resolution (upsample them)"
                        )
                    part = confusion_matrix(logits.argmax(1), masks, logits.shape[1], ignore_index)
                    confusion = part if confusion is None else confusion + part
            confusion = _all_reduce_confusion(confusion, device)
            out[w] = segmentation_scores(confusion)
        return out
    finally:
        model.train(was_training)


def _all_reduce_confusion(confusion: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """This process's confusion matrix summed over the processes of a distributed run (a process that ran no
    image contributes zeros)."""
    _, world = _shard()
    if world > 1:
        # every process must agree on the size: a process without images learns it from the others
        size = torch.tensor([0 if confusion is None else confusion.shape[0]], device=device)
        dist.all_reduce(size, op=dist.ReduceOp.MAX)
        k = int(size)
        total = torch.zeros((k, k), dtype=torch.int64, device=device)
        if confusion is not None:
            total += confusion  # a normal tensor: inference-mode tensors cannot be all-reduced in place
        dist.all_reduce(total)
        confusion = total if k else None
    if confusion is None:
        raise ValueError("there are no images to evaluate; give a non-empty dataset or loader")
    return confusion
