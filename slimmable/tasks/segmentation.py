"""Semantic segmentation: torchvision's FCN, DeepLabV3 and LR-ASPP on slimmable backbones.

A segmenter takes ``(N, C, H, W)`` images in [0, 1] and returns ``{"out": logits (N, K, H, W)}`` (and ``"aux"``
when built with an auxiliary head) at the input's resolution. Class 0 is the background; mask pixels of
:data:`~slimmable.data.segmentation.IGNORE_INDEX` (255) count in neither the loss nor the metrics. Validation is
mIoU and pixel accuracy per width; the server answers each image's class map as a PNG (or COCO RLE per class).
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._utils import unwrap_model
from .base import COST_HEADERS, Objective, Task, cost_cells, with_options

__all__ = ["MASK_FORMATS", "OutLogits", "SegmentationObjective", "SegmentationTask", "encode_mask"]

#: how the server encodes a class map: a PNG of class indices (base64), or COCO RLE per class present
MASK_FORMATS = ("png", "rle")


class SegmentationObjective(Objective):
    """Pixel-wise cross-entropy on the ``out`` logits, plus ``aux_weight`` times that of the ``aux`` logits where
    the model has an auxiliary head (torchvision's reference recipe); ignored pixels (255) count in neither."""

    counts_correct = False

    def __init__(self, aux_weight: float = 0.5) -> None:
        self.aux_weight = aux_weight

    def width_loss(
        self, forward: Callable[..., Any], images: torch.Tensor, targets: torch.Tensor, index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from ..train.segmentation import segmentation_loss

        loss = segmentation_loss(forward(images), targets, aux_weight=self.aux_weight)
        return loss, torch.zeros((), device=loss.device)


class SegmentationTask(Task):
    """Per-pixel classes from ``(N, C, H, W)`` images: pixel cross-entropy, mIoU and pixel accuracy per width."""

    name = "segmentation"
    metric = "miou"
    metric_label = "mIoU"
    row_key = "miou"
    datasets = ("fmnist_scenes", "coco", "mask_folder")
    answer_field = "masks"

    def claims(self, model: nn.Module) -> bool:
        from torchvision.models.segmentation._utils import _SimpleSegmentationModel
        from torchvision.models.segmentation.lraspp import LRASPP

        return isinstance(unwrap_model(model), (_SimpleSegmentationModel, LRASPP))

    # -- training ---------------------------------------------------------------------------------------------------

    def load_data(self, cfg: Any, cache_dir: str | os.PathLike[str] | None, load_train: bool = True) -> Any:
        from ..data.segmentation import create_segmentation_datasets

        dc = cfg.data
        name = "folder" if dc.dataset == "mask_folder" else dc.dataset
        return create_segmentation_datasets(
            name, dc.root, image_size=dc.image_size, hflip=dc.hflip, val_size=dc.val_size, split_seed=dc.split_seed,
            scenes_train=dc.scenes_train, scenes_test=dc.scenes_test, cache_dir=cache_dir, load_train=load_train,
            num_classes=cfg.model.num_classes if dc.dataset == "mask_folder" else None,
        )  # fmt: skip

    def model_kwargs(self, cfg: Any, data: Any) -> dict[str, Any]:
        mc = cfg.model
        for key in ("width_range", "stat_widths", "channels", "stem_stride"):
            if getattr(mc, key) is not None:
                raise ValueError(f"model.{key} does not apply to segmenters ({mc.name}); set it to null")
        kwargs: dict[str, Any] = {"num_classes": mc.num_classes or data.num_classes,
                                  "in_chans": mc.in_chans or data.in_chans}  # fmt: skip
        if mc.widths is not None:
            kwargs["widths"] = tuple(mc.widths)
        if mc.small_input:
            kwargs["small_input"] = True
        if kwargs["num_classes"] < data.num_classes:
            raise ValueError(
                f"model.num_classes {kwargs['num_classes']} is below the data's {data.num_classes} (classes 0.."
                f"{data.num_classes - 1}, 0 the background); set model.num_classes to null"
            )
        if kwargs["in_chans"] != data.in_chans:
            raise ValueError(
                f"model.in_chans is {kwargs['in_chans']} but the images have {data.in_chans} channels; set "
                "model.in_chans to null"
            )
        return with_options(kwargs, mc.options)

    def check_model(self, model: nn.Module, data: Any) -> None:
        classes = _num_classes(model)
        if classes is not None and classes < data.num_classes:
            raise ValueError(
                f"{data.root} has {data.num_classes} classes but the model predicts {classes}: class indices out "
                "of range; evaluate on the dataset the model was trained on"
            )

    def objective(self, cfg: Any) -> Objective:
        if cfg.train.inplace_distill or cfg.train.label_smoothing:
            raise ValueError("train.inplace_distill and train.label_smoothing are classification settings; turn them "
                             "off for a segmenter")  # fmt: skip
        return SegmentationObjective()

    def probe_batches(self, data: Any, num_classes: int) -> Callable[[int, torch.Generator], tuple]:
        side = data.image_size

        def make_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            images = torch.rand((n, data.in_chans, side, side), generator=gen)
            return images, torch.randint(0, num_classes, (n, side, side), generator=gen)

        return make_batch

    def validate(
        self, model: nn.Module, dataset: Any, loader: Any, widths: Sequence[float], **numerics: Any
    ) -> list[dict[str, Any]]:
        from ..train.segmentation import evaluate_segmenter

        scores = evaluate_segmenter(model, dataset, widths, batch_size=loader.batch_sampler.batch_size)
        return [
            {"width": float(w), "miou": float(scores[w]["miou"]), "pixel_acc": float(scores[w]["pixel_acc"]),
             "images": len(dataset)}
            for w in widths
        ]  # fmt: skip

    def describe(self, rows: Sequence[Mapping[str, Any]]) -> str:
        return "mIoU " + " ".join(f"{r['width']:g}:{r['miou']:.2f}" for r in rows)

    def columns(self, rows: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
        return ("width", "miou", "pixel_acc", "images", "macs", "params", "latency_ms")

    def table(self, rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[tuple]]:
        headers = ["width", "mIoU %", "pixel acc %", *COST_HEADERS]
        return headers, [(f"{r['width']:g}", f"{r['miou']:.2f}", f"{r['pixel_acc']:.2f}", *cost_cells(r)) for r in rows]

    def report(self, model: nn.Module, rows: list[dict[str, Any]], data: Any, latency_runs: int) -> list:
        from ..search.cost import profile_widths

        shape = (data.in_chans, data.image_size, data.image_size)
        costs = profile_widths(model, shape, [r["width"] for r in rows], latency_runs=latency_runs)
        columns = self.columns(rows)
        out = []
        for r, c in zip(rows, costs):
            row = {**r, "macs": c.macs, "params": c.params, "latency_ms": c.latency_ms}
            out.append({k: row.get(k) for k in columns})
        return out

    # -- inputs, serving, export ----------------------------------------------------------------------------------

    def example_inputs(
        self, model: nn.Module, shape: Sequence[int], batch_size: int = 1, seed: int | None = 0
    ) -> torch.Tensor:
        p = next(iter(model.parameters()))
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        return torch.rand((batch_size, *shape), generator=gen).to(p.device, p.dtype)  # images in [0, 1]

    def request_options(self, params: Mapping[str, Any], number: Callable[..., float | None]) -> dict[str, Any]:
        from ..serve._decode import BadRequest

        fmt = params.get("mask_format", "png")
        if fmt not in MASK_FORMATS:
            raise BadRequest(f"mask_format {fmt!r} is not one of {', '.join(MASK_FORMATS)}")
        return {"mask_format": fmt}

    def decode_image(self, data: bytes, shape: Sequence[int], preprocess: Mapping[str, Any]) -> torch.Tensor:
        """The whole image resized to the calibrated ``(H, W)`` (no crop: the answer's mask covers all of it), in
        [0, 1] as the segmenter trained on."""
        from torchvision.transforms import functional as TF

        from ..serve._decode import BadRequest, _open_image

        c, h, w = (int(s) for s in shape)
        if c not in (1, 3):
            raise BadRequest(f"this model takes {c}-channel inputs, which are not images; send a tensor instead")
        img = TF.resize(_open_image(data, c), [h, w], antialias=True)
        return TF.to_tensor(img).unsqueeze(0)

    def answer(self, output: Any, options: Mapping[str, Any], labels: Sequence[str] | None, top_k: int) -> list:
        logits = output["out"] if isinstance(output, Mapping) else output
        maps = logits.argmax(dim=1).to(torch.uint8).cpu()
        out = []
        for m in maps:
            present = [int(k) for k in torch.unique(m).tolist()]
            entry: dict[str, Any] = {"size": [int(m.shape[0]), int(m.shape[1])], "classes": present}
            if labels is not None:
                entry["class_names"] = [labels[k] if 0 <= k < len(labels) else None for k in present]
            entry["mask"] = encode_mask(m, options.get("mask_format", "png"))
            out.append(entry)
        return out

    def output_names(self, model: nn.Module) -> list[str]:
        return ["out"]

    def v2_outputs(self, model: nn.Module, output: Any) -> list[tuple[str, str, torch.Tensor]]:
        """``out``: the logits ``FP32 (N, K, H, W)`` (what an export computes); ``class_map``: their argmax over
        classes, ``INT64 (N, H, W)`` (class indices, as torch's argmax gives them)."""
        logits = output["out"] if isinstance(output, Mapping) else output
        return [(self.output_names(model)[0], "FP32", logits), ("class_map", "INT64", logits.argmax(dim=1))]

    def export_module(self, dense: nn.Module) -> nn.Module:
        return dense if isinstance(dense, OutLogits) else OutLogits(dense)


class OutLogits(nn.Module):
    """A segmenter whose forward returns its ``out`` logits ``(N, K, H, W)`` only: what an exported file computes
    (the auxiliary head is for training; it is not run)."""

    def __init__(self, segmenter: nn.Module) -> None:
        super().__init__()
        self.segmenter = segmenter
        self.slimmable_task = "segmentation"
        for key in ("model_name", "model_kwargs"):
            if hasattr(segmenter, key):
                setattr(self, key, getattr(segmenter, key))
        inner = unwrap_model(segmenter)
        if getattr(inner, "aux_classifier", None) is not None:
            inner.aux_classifier = None  # torchvision's segmenters skip the aux head when it is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segmenter(x)["out"]


def encode_mask(class_map: torch.Tensor, fmt: str = "png") -> dict[str, Any]:
    """A ``(H, W)`` map of class indices (< 256) for JSON: ``{"format": "png", "data": base64 PNG}`` (8-bit grey,
    pixel = class), or ``{"format": "rle", "rle": {class: {"size", "counts"}}}`` (COCO RLE per class present)."""
    import numpy as np

    arr = class_map.cpu().numpy().astype(np.uint8)
    if fmt == "png":
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(arr, mode="L").save(buf, format="PNG")
        return {"format": "png", "data": base64.b64encode(buf.getvalue()).decode("ascii")}
    if fmt == "rle":
        from pycocotools import mask as mask_utils

        rles = {}
        for k in np.unique(arr).tolist():
            rle = mask_utils.encode(np.asfortranarray((arr == k).astype(np.uint8)))
            rles[str(k)] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
        return {"format": "rle", "rle": rles}
    raise ValueError(f"mask format {fmt!r} is not one of {', '.join(MASK_FORMATS)}")


def _num_classes(model: nn.Module) -> int | None:
    """The classes of a segmenter: the output channels of its last classifier convolution."""
    convs = [m for m in unwrap_model(model).modules() if isinstance(m, nn.Conv2d)]
    head = getattr(unwrap_model(model), "classifier", None)
    if head is not None:
        convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)] or convs
    return int(convs[-1].out_channels) if convs else None
