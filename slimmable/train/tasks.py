"""What a training run does differently per task: its data, model arguments, objective, validation and report.

:class:`slimmable.train.run._Run` owns the run (numerics, plan, Algorithm 1, checkpoints, resume, signals); a
:class:`Task` owns the task-specific parts, so classification and detection share everything else:

=================  ==========================================  ===============================================
                   :class:`ClassificationTask`                 :class:`DetectionTask`
=================  ==========================================  ===============================================
data               Fashion-MNIST, CIFAR, image folders         Fashion-MNIST scenes, COCO-format folders
objective          cross-entropy (smoothing, distillation)     the detector's summed losses
validation metric  top-1 per width (``top1``)                  COCOeval box AP per width (``ap``)
report             top-1/top-5/loss, MACs, params, latency     AP per IoU type, MACs, params, latency
=================  ==========================================  ===============================================
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..config import DETECTION_DATASETS, RunConfig
from ..data import DatasetSplits, create_datasets
from ..models import create_model
from ..models._registry import model_task
from .engine import evaluate
from .objectives import ClassificationObjective, DetectionObjective, Objective
from .plan import random_batches

__all__ = ["ClassificationTask", "DetectionTask", "Task", "create_task", "mean_metric", "model_kwargs_from_config"]


def model_kwargs_from_config(cfg: RunConfig, num_classes: int, in_chans: int) -> dict[str, Any]:
    """The ``create_model`` keyword arguments of a run (``None`` model fields take the dataset's values)."""
    mc = cfg.model
    kwargs: dict[str, Any] = {
        "num_classes": mc.num_classes or num_classes,
        "in_chans": mc.in_chans or in_chans,
        "small_input": mc.small_input,
        "drop_rate": mc.drop_rate,
    }
    if mc.stem_stride is not None:
        kwargs["stem_stride"] = mc.stem_stride
    if mc.widths is not None:
        kwargs["widths"] = tuple(mc.widths)
    if mc.width_range is not None:
        kwargs["width_range"] = tuple(mc.width_range)
    if mc.stat_widths is not None:
        kwargs["stat_widths"] = tuple(mc.stat_widths)
    if mc.channels is not None:
        from ..search.autoslim import load_channel_spec

        kwargs["channels"] = load_channel_spec(mc.channels)
    return _with_options(kwargs, mc.options)


def _with_options(kwargs: dict[str, Any], options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``kwargs`` plus ``model.options``, which may not repeat a key the recipe sets elsewhere."""
    clash = sorted(set(options or {}) & set(kwargs))
    if clash:
        raise ValueError(f"model.options repeats {clash}: set them as model.{clash[0]} instead")
    return {**kwargs, **(options or {})}


class Task:
    """The task side of a training run (see the module docstring)."""

    #: the validation metric: rows carry it per width; a run selects its best checkpoint by its mean over widths
    metric: str = ""

    def load_data(self, cfg: RunConfig, cache_dir: str | os.PathLike[str] | None) -> Any:
        """The recipe's data: an object with ``train``, ``val``, ``test``, ``num_classes``, ``in_chans``,
        ``image_size``, ``name``, ``root`` and ``preprocess()``."""
        raise NotImplementedError

    def model_kwargs(self, cfg: RunConfig, data: Any) -> dict[str, Any]:
        """The ``create_model`` keyword arguments (``None`` model fields take the data's values)."""
        raise NotImplementedError

    def objective(self, cfg: RunConfig) -> Objective:
        raise NotImplementedError

    def collate_fn(self) -> Callable[..., Any] | None:
        """How the loaders batch items (``None``: stacked tensors)."""
        return None

    def probe_batches(self, data: Any, num_classes: int) -> Callable[[int, torch.Generator], tuple[Any, Any]]:
        """``make_batch(n, generator)`` for the start-up probe of the training step."""
        raise NotImplementedError

    def auto_channels_last(self, setting: bool | str) -> bool | str:
        """The ``channels_last`` setting handed to the numerics decision."""
        return setting

    def validate(
        self, model: nn.Module, dataset: Any, loader: Any, widths: Sequence[float], **numerics: Any
    ) -> list[dict[str, Any]]:
        """One row per width with :attr:`metric` (and more), in eval mode."""
        raise NotImplementedError

    def describe(self, rows: Sequence[Mapping[str, Any]]) -> str:
        """The validation rows in one log line."""
        return " ".join(f"{r['width']:g}:{r[self.metric]:.2f}" for r in rows)

    def report(self, model: nn.Module, rows: list[dict[str, Any]], data: Any, latency_runs: int) -> list[dict]:
        """The test rows with each width's cost (MACs, parameters, latency), with :meth:`columns`."""
        raise NotImplementedError

    def columns(self, rows: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
        """The columns of a report made of ``rows``."""
        raise NotImplementedError


class ClassificationTask(Task):
    """Image classification: the S-Nets / US-Nets / AutoSlim experiments."""

    metric = "top1"

    def columns(self, rows: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
        from .report import REPORT_COLUMNS

        return tuple(REPORT_COLUMNS)

    def load_data(self, cfg: RunConfig, cache_dir: str | os.PathLike[str] | None) -> DatasetSplits:
        dc = cfg.data
        return create_datasets(
            dc.dataset, dc.root, image_size=dc.image_size, eval_resize=dc.eval_resize, augment=dc.augment,
            crop_scale_min=dc.crop_scale_min, crop_padding=dc.crop_padding, hflip=dc.hflip, val_size=dc.val_size,
            split_seed=dc.split_seed, download=dc.download, cache_dir=cache_dir,
        )  # fmt: skip

    def model_kwargs(self, cfg: RunConfig, data: DatasetSplits) -> dict[str, Any]:
        kwargs = model_kwargs_from_config(cfg, data.num_classes, data.in_chans)
        _check_fits(kwargs, data)
        return kwargs

    def objective(self, cfg: RunConfig) -> Objective:
        return ClassificationObjective(cfg.train.label_smoothing, cfg.train.inplace_distill)

    def probe_batches(self, data: DatasetSplits, num_classes: int) -> Callable[[int, torch.Generator], tuple]:
        return random_batches((data.in_chans, data.image_size, data.image_size), num_classes)

    def validate(
        self, model: nn.Module, dataset: Any, loader: Any, widths: Sequence[float], **numerics: Any
    ) -> list[dict[str, Any]]:
        return [m.to_dict() for m in evaluate(model, loader, widths, **numerics)]

    def report(self, model: nn.Module, rows: list[dict[str, Any]], data: DatasetSplits, latency_runs: int) -> list:
        from .engine import WidthMetrics
        from .report import width_report

        shape = (data.in_chans, data.image_size, data.image_size)
        return width_report(model, [WidthMetrics(**r) for r in rows], shape, latency_runs=latency_runs)


class DetectionTask(Task):
    """Detection, instance segmentation and keypoints with torchvision's detectors on slimmable backbones."""

    metric = "ap"

    @staticmethod
    def _iou_types(rows: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
        """The IoU types the rows were scored for (what the model predicts: the rows carry ``{type}_AP``)."""
        from ..data.coco import IOU_TYPES

        return tuple(t for t in IOU_TYPES if rows and f"{t}_AP" in rows[0])

    def columns(self, rows: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
        per_type = tuple(f"{t}_{k}" for t in self._iou_types(rows) for k in ("AP", "AP50", "AP75"))
        return ("width", *per_type, "images", "macs", "params", "latency_ms")

    def load_data(self, cfg: RunConfig, cache_dir: str | os.PathLike[str] | None) -> Any:
        from ..data.detection import create_detection_datasets

        dc = cfg.data
        return create_detection_datasets(
            dc.dataset, dc.root, image_size=dc.image_size, hflip=dc.hflip, val_size=dc.val_size,
            split_seed=dc.split_seed, scenes_train=dc.scenes_train, scenes_test=dc.scenes_test, cache_dir=cache_dir,
        )  # fmt: skip

    def model_kwargs(self, cfg: RunConfig, data: Any) -> dict[str, Any]:
        mc = cfg.model
        for key in ("width_range", "stat_widths", "channels"):
            if getattr(mc, key) is not None:
                raise ValueError(f"model.{key} does not apply to detectors ({mc.name}); set it to null")
        kwargs: dict[str, Any] = {"num_classes": mc.num_classes or data.num_classes, "in_chans": mc.in_chans or
                                  data.in_chans}  # fmt: skip
        if mc.widths is not None:
            kwargs["widths"] = tuple(mc.widths)
        options = dict(mc.options or {})
        if "keypointrcnn" in mc.name and "num_keypoints" not in options and data.num_keypoints:
            options["num_keypoints"] = data.num_keypoints
        if kwargs["num_classes"] < data.num_classes:
            raise ValueError(
                f"model.num_classes {kwargs['num_classes']} is below the data's {data.num_classes} (category ids up "
                f"to {data.num_classes - 1} plus the background); set model.num_classes to null"
            )
        return _with_options(kwargs, options)

    def objective(self, cfg: RunConfig) -> Objective:
        if cfg.train.inplace_distill or cfg.train.label_smoothing:
            raise ValueError("train.inplace_distill and train.label_smoothing are classification settings; turn them "
                             "off for a detector")  # fmt: skip
        return DetectionObjective()

    def collate_fn(self) -> Callable[..., Any]:
        from ..data.coco import collate_detection

        return collate_detection

    def probe_batches(self, data: Any, num_classes: int) -> Callable[[int, torch.Generator], tuple]:
        from ..data.coco import collate_detection

        source = data.val if data.val is not None else data.test  # no flips: the probe draws no random numbers

        def make_batch(n: int, gen: torch.Generator) -> tuple[list, list]:
            return collate_detection([source[i % len(source)] for i in range(n)])

        return make_batch

    def auto_channels_last(self, setting: bool | str) -> bool | str:
        # the detector batches and normalises its images itself: NHWC inputs do not reach its convolutions
        return False if setting == "auto" else setting

    def validate(
        self, model: nn.Module, dataset: Any, loader: Any, widths: Sequence[float], **numerics: Any
    ) -> list[dict[str, Any]]:
        from .detection import detection_iou_types, evaluate_detector

        iou_types = detection_iou_types(model)
        scores = evaluate_detector(model, dataset, widths, batch_size=loader.batch_sampler.batch_size)
        rows = []
        for w in widths:
            row: dict[str, Any] = {"width": float(w)}
            for t in iou_types:
                row.update({f"{t}_{k}": 100.0 * float(v) for k, v in scores[w][t].items()})
            row["ap"] = row["bbox_AP"]  # selection: box AP, what every detector predicts
            row["images"] = len(dataset)
            rows.append(row)
        return rows

    def describe(self, rows: Sequence[Mapping[str, Any]]) -> str:
        types = self._iou_types(rows)
        parts = []
        for r in rows:
            aps = "/".join(f"{r[f'{t}_AP']:.1f}" for t in types)
            parts.append(f"{r['width']:g}:{aps}")
        return f"AP ({'/'.join(types)}) " + " ".join(parts)

    def report(self, model: nn.Module, rows: list[dict[str, Any]], data: Any, latency_runs: int) -> list:
        from ..search.cost import profile_widths

        costs = profile_widths(model, (data.in_chans, data.image_size, data.image_size),
                               [r["width"] for r in rows], latency_runs=latency_runs)  # fmt: skip
        columns = self.columns(rows)
        out = []
        for r, c in zip(rows, costs):
            row = {**r, "macs": c.macs, "params": c.params, "latency_ms": c.latency_ms}
            out.append({k: row.get(k) for k in columns})
        return out


def create_task(cfg: RunConfig) -> Task:
    """The task of a recipe, from its model and its data (which must agree).

    Raises:
        ValueError: a detection model on classification data or the reverse, or an unknown model name.
    """
    try:
        task = model_task(cfg.model.name)
    except ValueError:
        create_model(cfg.model.name)  # raises the registry's error, with close names
        raise
    detection_data = cfg.data.dataset in DETECTION_DATASETS
    if (task == "detection") != detection_data:
        kind = "detection" if detection_data else "classification"
        raise ValueError(
            f"model.name {cfg.model.name} is a {task} model but data.dataset {cfg.data.dataset} is {kind} data; "
            f"pair detectors with {' or '.join(DETECTION_DATASETS)} and classifiers with the others"
        )
    return DetectionTask() if task == "detection" else ClassificationTask()


def _check_fits(kwargs: Mapping[str, Any], data: DatasetSplits) -> None:
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


def mean_metric(rows: Sequence[Mapping[str, Any]], metric: str) -> float:
    """The mean of ``metric`` over the rows (widths); NaN for none."""
    return sum(float(r[metric]) for r in rows) / len(rows) if rows else math.nan
