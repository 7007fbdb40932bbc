"""Image classification: the S-Nets / US-Nets / AutoSlim experiments, and converted timm/torchvision CNNs."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..data.datasets import DATASETS
from .base import COST_HEADERS, Task, cost_cells, model_kwargs_from_config

__all__ = ["ClassificationTask"]


class ClassificationTask(Task):
    """Logits ``(N, num_classes)`` from ``(N, C, H, W)`` images: cross-entropy, top-1/top-5 per width."""

    name = "classification"
    metric = "top1"
    metric_label = "top-1"
    row_key = "top1"
    datasets = DATASETS
    augmentations = ("crop_flip", "basic", "mobile", "none")
    answer_field = "predictions"

    def columns(self, rows: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
        from ..train.report import REPORT_COLUMNS

        return tuple(REPORT_COLUMNS)

    def table(self, rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[tuple]]:
        headers = ["width", "top-1 %", "top-5 %", "loss", *COST_HEADERS]
        cells = [(f"{r['width']:g}", f"{r['top1']:.2f}", f"{r['top5']:.2f}", f"{r['loss']:.4f}", *cost_cells(r))
                 for r in rows]  # fmt: skip
        return headers, cells

    def load_data(self, cfg: Any, cache_dir: str | os.PathLike[str] | None, load_train: bool = True) -> Any:
        from ..data import create_datasets

        dc = cfg.data
        return create_datasets(
            dc.dataset, dc.root, image_size=dc.image_size, eval_resize=dc.eval_resize, augment=dc.augment,
            crop_scale_min=dc.crop_scale_min, crop_padding=dc.crop_padding, hflip=dc.hflip, val_size=dc.val_size,
            split_seed=dc.split_seed, download=dc.download, cache_dir=cache_dir, load_train=load_train,
        )  # fmt: skip

    def model_kwargs(self, cfg: Any, data: Any) -> dict[str, Any]:
        kwargs = model_kwargs_from_config(cfg, data.num_classes, data.in_chans)
        _check_fits(kwargs, data)
        return kwargs

    def describe(self, rows: Sequence[Mapping[str, Any]]) -> str:
        return "top-1 " + super().describe(rows)

    def check_model(self, model: nn.Module, data: Any) -> None:
        num_classes = getattr(model, "num_classes", None)
        if num_classes is not None and num_classes < data.num_classes:
            raise ValueError(
                f"{data.root} has {data.num_classes} classes but the model predicts {num_classes}: labels out of "
                "range; evaluate on the dataset the model was trained on"
            )

    def objective(self, cfg: Any) -> Any:
        from ..train.objectives import ClassificationObjective

        return ClassificationObjective(cfg.train.label_smoothing, cfg.train.inplace_distill)

    def probe_batches(self, data: Any, num_classes: int) -> Callable[[int, torch.Generator], tuple]:
        from ..train.plan import random_batches

        return random_batches((data.in_chans, data.image_size, data.image_size), num_classes)

    def validate(
        self, model: nn.Module, dataset: Any, loader: Any, widths: Sequence[float], **numerics: Any
    ) -> list[dict[str, Any]]:
        from ..train.engine import evaluate

        return [m.to_dict() for m in evaluate(model, loader, widths, **numerics)]

    def report(self, model: nn.Module, rows: list[dict[str, Any]], data: Any, latency_runs: int) -> list:
        from ..train.engine import WidthMetrics
        from ..train.report import width_report

        shape = (data.in_chans, data.image_size, data.image_size)
        return width_report(model, [WidthMetrics(**r) for r in rows], shape, latency_runs=latency_runs)

    def answer(self, output: Any, options: Mapping[str, Any], labels: Sequence[str] | None, top_k: int) -> list:
        probs = torch.softmax(output.float(), dim=1)
        asked = options.get("top_k")
        k = max(1, min(int(asked) if asked else top_k, probs.shape[1]))
        values, indices = probs.topk(k, dim=1)
        preds = []
        for row_p, row_i in zip(values.tolist(), indices.tolist()):
            top = [_named({"index": i, "prob": round(p, 6)}, i, labels) for p, i in zip(row_p, row_i)]
            preds.append(_named({"class_index": row_i[0]}, row_i[0], labels) | {"top_k": top})
        return preds


def _named(d: dict[str, Any], index: int, labels: Sequence[str] | None) -> dict[str, Any]:
    if labels is not None and 0 <= index < len(labels):
        d["label"] = labels[index]
    return d


def _check_fits(kwargs: Mapping[str, Any], data: Any) -> None:
    if kwargs["num_classes"] < data.num_classes:
        raise ValueError(
            f"the data in {data.root} has {data.num_classes} classes (labels 0..{data.num_classes - 1}) but "
            f"model.num_classes is {kwargs['num_classes']}: labels would be out of range. Set model.num_classes to "
            f"{data.num_classes} or null"
        )
    if kwargs["in_chans"] != data.in_chans:
        raise ValueError(
            f"model.in_chans is {kwargs['in_chans']} but the images of {data.root} have {data.in_chans} channels; "
            "set model.in_chans to null"
        )
