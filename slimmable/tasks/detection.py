"""Detection, instance segmentation and keypoints: torchvision's R-CNN detectors on slimmable backbones.

A detector takes a list of ``(C, H, W)`` images in [0, 1] of any size and resizes them itself, so its cost is
that of the side its transform resizes to (:func:`detector_image_size`); :func:`detector_images` builds inputs at
that side. Its RoI heads' cost depends on how many detections survive the score threshold, so profiles count
with the heads at capacity (:func:`heads_at_capacity`), and :data:`DETECTOR_PARTS` splits the MACs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._utils import input_channels, unwrap_model
from ..models.detection import is_detector
from .base import COST_HEADERS, Inputs, Task, cost_cells, with_options

__all__ = [
    "DETECTOR_PARTS",
    "DetectionTask",
    "detector_image_size",
    "detector_images",
    "heads_at_capacity",
    "is_detector",
]

#: the parts of a torchvision R-CNN detector that profiles report MACs for
DETECTOR_PARTS = ("backbone.body", "backbone.fpn", "rpn", "roi_heads")


def detector_image_size(model: nn.Module) -> int:
    """The side a detector's transform resizes a square image to: ``min(min_size, max_size)`` (800 for
    torchvision's R-50-FPN settings, 128 for the small variants). Profiling at this side measures what the
    detector really computes, whatever the size of the image it is given."""
    t = unwrap_model(model).transform
    return int(min(max(t.min_size), t.max_size))


def detector_images(
    model: nn.Module, input_size: int | Sequence[int] | None = None, batch_size: int = 1, seed: int | None = 0
) -> list[torch.Tensor]:
    """A list of ``batch_size`` random images ``(C, H, W)`` in [0, 1] for a detector, on its device and dtype.

    Args:
        model: the detector.
        input_size: a square side, or ``(C, H, W)``; default :func:`detector_image_size` with the model's input
            channels.
        batch_size: number of images.
        seed: seed of a local generator (``None``: the global RNG).
    """
    if input_size is None:
        input_size = detector_image_size(model)
    if isinstance(input_size, int):
        shape = (input_channels(model), input_size, input_size)
    else:
        shape = tuple(int(s) for s in input_size)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"input_size {tuple(input_size)} must be a side such as 128 or a (C, H, W) triple")
    p = next(iter(model.parameters()))
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return [torch.rand(shape, generator=gen).to(p.device, p.dtype) for _ in range(batch_size)]


@contextlib.contextmanager
def heads_at_capacity(detector: nn.Module) -> Iterator[None]:
    """Within the block the detector keeps every detection up to ``box_detections_per_img`` (score threshold 0):
    the RoI heads' largest cost per image, the same at every width. The threshold is restored afterwards."""
    heads = unwrap_model(detector).roi_heads
    before = heads.score_thresh
    heads.score_thresh = 0.0
    try:
        yield
    finally:
        heads.score_thresh = before


class DetectionTask(Task):
    """Detection, instance segmentation and keypoints with torchvision's R-CNN detectors on slimmable backbones:
    lists of ``(C, H, W)`` images of any size in, one dict of boxes, labels, scores (masks, keypoints) per image
    out; COCOeval AP per width."""

    name = "detection"
    metric = "ap"
    metric_label = "box AP"
    row_key = "bbox_AP"
    datasets = ("fmnist_scenes", "coco")
    answer_field = "detections"
    resizes_inputs = True

    def claims(self, model: nn.Module) -> bool:
        return is_detector(model)

    @staticmethod
    def _iou_types(rows: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
        """The IoU types the rows were scored for (what the model predicts: the rows carry ``{type}_AP``)."""
        from ..data.coco import IOU_TYPES

        return tuple(t for t in IOU_TYPES if rows and f"{t}_AP" in rows[0])

    def columns(self, rows: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
        per_type = tuple(f"{t}_{k}" for t in self._iou_types(rows) for k in ("AP", "AP50", "AP75"))
        return ("width", *per_type, "images", "macs", "params", "latency_ms")

    def table(self, rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[tuple]]:
        types = self._iou_types(rows)
        headers = ["width", *(f"{t} AP / AP50 / AP75" for t in types), *COST_HEADERS]
        cells = [
            (f"{r['width']:g}", *(f"{r[f'{t}_AP']:.1f} / {r[f'{t}_AP50']:.1f} / {r[f'{t}_AP75']:.1f}" for t in types),
             *cost_cells(r))
            for r in rows
        ]  # fmt: skip
        return headers, cells

    def load_data(self, cfg: Any, cache_dir: str | os.PathLike[str] | None, load_train: bool = True) -> Any:
        from ..data.detection import create_detection_datasets

        dc = cfg.data
        return create_detection_datasets(
            dc.dataset, dc.root, image_size=dc.image_size, hflip=dc.hflip, val_size=dc.val_size,
            split_seed=dc.split_seed, scenes_train=dc.scenes_train, scenes_test=dc.scenes_test, cache_dir=cache_dir,
            load_train=load_train,
        )  # fmt: skip

    def model_kwargs(self, cfg: Any, data: Any) -> dict[str, Any]:
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
        return with_options(kwargs, options)

    def objective(self, cfg: Any) -> Any:
        if cfg.train.inplace_distill or cfg.train.label_smoothing:
            raise ValueError("train.inplace_distill and train.label_smoothing are classification settings; turn them "
                             "off for a detector")  # fmt: skip
        from ..train.objectives import DetectionObjective

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
        from ..train.detection import detection_iou_types, evaluate_detector

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

    # -- inputs, profiling, serving, export -----------------------------------------------------------------------

    def default_input_size(self, model: nn.Module) -> int:
        return detector_image_size(model)

    def example_inputs(
        self, model: nn.Module, shape: Sequence[int], batch_size: int = 1, seed: int | None = 0
    ) -> Inputs:
        return detector_images(model, tuple(shape), batch_size, seed=seed)

    def check_inputs(
        self, x: Any, shape: Sequence[int], device: torch.device, dtype: torch.dtype
    ) -> tuple[Inputs, int]:
        c = shape[0]
        if isinstance(x, torch.Tensor):
            x = [x] if x.dim() == 3 else list(x)
        if not isinstance(x, (list, tuple)) or not x:
            raise TypeError(f"a detector takes a non-empty list of ({c}, H, W) image tensors, got {type(x).__name__}")
        out = []
        for i, img in enumerate(x):
            if not isinstance(img, torch.Tensor) or not img.is_floating_point():
                raise TypeError(f"image {i} must be a floating-point tensor ({c}, H, W) in [0, 1]")
            if img.dim() != 3 or img.shape[0] != c or min(img.shape[1:]) < 1:
                raise ValueError(
                    f"image {i} has shape {tuple(img.shape)}; this detector takes ({c}, H, W) images in [0, 1] "
                    f"(any H and W; convert to {c} channel{'s' if c > 1 else ''})"
                )
            out.append(img.to(device=device, dtype=dtype))
        return out, len(out)

    def profile_parts(self, model: nn.Module) -> tuple[str, ...] | None:
        return DETECTOR_PARTS

    def part_label(self, part: str) -> str:
        return {"backbone.body": "backbone", "backbone.fpn": "FPN", "rpn": "RPN", "roi_heads": "RoI heads"}[part]

    def profile_caption(self, model: nn.Module, side: int | None) -> str:
        heads = unwrap_model(model).roi_heads
        return (
            f"on one {side}x{side} image (the side its transform resizes to), {model.num_classes} classes; RoI heads "
            f"at capacity (score threshold 0 while profiling: {heads.detections_per_img} detections per image at "
            "every width)"
        )

    def profile_inputs(
        self, model: nn.Module, input_size: int | Sequence[int] | None, batch_size: int
    ) -> tuple[Inputs, int | None]:
        side = input_size if input_size is not None else detector_image_size(model)
        return detector_images(model, side, batch_size, seed=0), detector_image_size(model)

    def profiling(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        return heads_at_capacity(model)

    def request_options(self, params: Mapping[str, Any], number: Callable[..., float | None]) -> dict[str, Any]:
        return {"min_score": number(params, "min_score", zero=True) or 0.0}

    def decode_tensor(self, obj: Any, shape: Sequence[int], max_batch: int, max_pixels: int) -> Inputs:
        from ..serve._decode import decode_detection_tensor

        return decode_detection_tensor(obj, shape[0], max_batch, max_pixels)

    def decode_image(self, data: bytes, shape: Sequence[int], preprocess: Mapping[str, Any]) -> torch.Tensor:
        from ..serve._decode import decode_detection_image

        return decode_detection_image(data, shape[0])  # as it is: the detector normalises and resizes

    def answer(self, output: Any, options: Mapping[str, Any], labels: Sequence[str] | None, top_k: int) -> list:
        return [_detections(d, float(options.get("min_score") or 0.0), labels) for d in output]

    def v2_outputs(self, model: nn.Module, output: Any) -> list[tuple[str, str, torch.Tensor]]:
        """Not supported yet: a detector's outputs vary in length per image, which V2 tensors with one batch
        dimension do not hold (the server answers 400)."""
        from ..serve._decode import BadRequest

        raise BadRequest(
            "detectors are not supported over the V2 inference protocol yet (their boxes, labels and scores vary in "
            "number per image); use POST /predict, which answers them as JSON"
        )

    def output_names(self, model: nn.Module) -> list[str]:
        from ..export.detection import detector_output_names

        return detector_output_names(model)


def _detections(det: Mapping[str, torch.Tensor], min_score: float, labels: Sequence[str] | None) -> list[dict]:
    """One image's detections as JSON objects (masks as COCO RLE with ``counts`` a str)."""
    keep = det["scores"] >= min_score
    boxes = det["boxes"][keep].float().tolist()
    classes = det["labels"][keep].tolist()
    scores = det["scores"][keep].float().tolist()
    out = []
    for b, c, sc in zip(boxes, classes, scores):
        entry: dict[str, Any] = {"box": [round(v, 3) for v in b], "label": int(c)}
        if labels is not None and 0 <= c < len(labels):
            entry["label_name"] = labels[c]
        entry["score"] = round(float(sc), 6)
        out.append(entry)
    if "masks" in det:
        import numpy as np
        from pycocotools import mask as mask_utils

        masks = (det["masks"][keep][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
        for entry, m in zip(out, masks):
            rle = mask_utils.encode(np.asfortranarray(m))
            entry["mask"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
    if "keypoints" in det:
        kps = det["keypoints"][keep].float().tolist()
        kp_scores = det["keypoints_scores"][keep].float().tolist() if "keypoints_scores" in det else None
        for i, (entry, kp) in enumerate(zip(out, kps)):
            entry["keypoints"] = [[round(x, 3), round(y, 3), int(v > 0)] for x, y, v in kp]
            if kp_scores is not None:
                entry["keypoint_scores"] = [round(v, 4) for v in kp_scores[i]]
    return out
