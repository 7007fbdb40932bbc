"""COCO-format detection data (boxes, instance masks, keypoints) and its evaluation with pycocotools' ``COCOeval``.

:class:`CocoDetectionDataset` reads a COCO ``instances``-style JSON with torchvision's ``CocoDetection`` and yields
what torchvision's detectors take: an image tensor ``(C, H, W)`` in [0, 1] and a target dict with ``boxes``
(``xyxy``), ``labels`` (the COCO category ids; 0 is the detectors' background), ``masks`` and ``keypoints``. Every
annotation is validated once, when the dataset is built: a missing image file, a box outside its image, a keypoint
list of the wrong length, an unknown category or image give a ``ValueError`` naming the file and the annotation id.

:func:`coco_evaluate` scores detections with ``COCOeval`` (the reference AP implementation): ``bbox``, ``segm`` and
``keypoints``, with ``kpt_oks_sigmas`` sized to the keypoint count.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.datasets import CocoDetection
from torchvision.transforms.functional import pil_to_tensor

__all__ = [
    "COCO_PERSON_SIGMAS",
    "DEFAULT_KEYPOINT_SIGMA",
    "IOU_TYPES",
    "CocoDetectionDataset",
    "coco_evaluate",
    "collate_detection",
    "detections_to_coco",
    "load_coco",
]

IOU_TYPES = ("bbox", "segm", "keypoints")
#: COCO's per-keypoint OKS constants for its 17 person keypoints (used when the results have 17 keypoints)
COCO_PERSON_SIGMAS = (
    0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089,
    0.089,
)  # fmt: skip
#: the OKS constant of every keypoint for other keypoint counts (about the mean of COCO's person constants)
DEFAULT_KEYPOINT_SIGMA = 0.072
# tolerance for box edges beyond the image (annotation tools round to pixel edges)
_EDGE_TOL = 1.0


def load_coco(ann_file: str | os.PathLike[str] | Mapping[str, Any]) -> COCO:
    """A pycocotools ``COCO`` index of a JSON file or an already loaded dict, without pycocotools' prints.

    Raises:
        FileNotFoundError: no file at the path.
        ValueError: the file is not JSON or lacks ``images``/``annotations``/``categories``.
    """
    if isinstance(ann_file, Mapping):
        data, source = copy.deepcopy(dict(ann_file)), "annotations"
    else:
        path = Path(ann_file)
        if not path.is_file():
            raise FileNotFoundError(f"COCO annotation file {path} does not exist; check the path")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); give a COCO annotation file") from err
        source = str(path)
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise ValueError(
            f"{source} lacks the COCO keys {missing}; a COCO instances file has images, annotations, categories"
        )
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoDetectionDataset(CocoDetection):
    """COCO-format detection data as torchvision's detectors take it, validated when built.

    Args:
        root: the folder the images' ``file_name`` entries are relative to.
        ann_file: the COCO JSON file.
        channels: convert every image to 1 (grey) or 3 (RGB) channels; ``None`` keeps each file's (grey PNGs give
            one channel, RGB files three).
        keypoints: include ``keypoints`` in the targets (default: when the categories declare keypoints).
        masks: include ``masks`` in the targets (default: when every annotation has a segmentation).
        hflip: a probability of flipping an image horizontally, with its boxes, masks and keypoints (keypoints swap
            by the categories' ``keypoint_flip_map``, a list of 0-based index pairs). Uses torch's global RNG.

    ``dataset[i]`` returns ``(image, target)``: ``image`` ``(C, H, W)`` float32 in [0, 1]; ``target`` with
    ``boxes`` ``(N, 4)`` float32 ``x0, y0, x1, y1``, ``labels`` ``(N,)`` int64 category ids, ``image_id``,
    ``area``, ``iscrowd``, ``masks`` ``(N, H, W)`` uint8 and ``keypoints`` ``(N, K, 3)`` float32 where present.
    Crowd annotations (``iscrowd: 1``) are left out of the targets (``COCOeval`` still reads them from the file).

    Raises:
        FileNotFoundError: the annotation file or ``root`` does not exist.
        ValueError: a bad annotation; the message names the file, the annotation id and what is wrong.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        ann_file: str | os.PathLike[str],
        *,
        channels: int | None = None,
        keypoints: bool | None = None,
        masks: bool | None = None,
        hflip: float = 0.0,
    ) -> None:
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1, 3 or None (keep the file's), got {channels!r}")
        if not Path(root).is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist; give the folder the file_name entries are in")
        self.root = str(root)
        self.ann_file = str(ann_file)
        self.coco = load_coco(ann_file)
        self.ids = sorted(self.coco.imgs)
        self.transforms = self.transform = self.target_transform = None
        self.channels = channels
        self.hflip = float(hflip)
        cats = self.coco.dataset["categories"]
        counts = {len(c.get("keypoints", [])) for c in cats}
        self.num_keypoints = max(counts) if counts else 0
        self.with_keypoints = bool(self.num_keypoints) if keypoints is None else keypoints
        anns = self.coco.dataset["annotations"]
        self.with_masks = all("segmentation" in a for a in anns) and bool(anns) if masks is None else masks
        self.flip_map = _flip_permutation(cats, self.num_keypoints)
        self._validate()

    def _where(self, ann: Mapping[str, Any]) -> str:
        img = self.coco.imgs.get(ann.get("image_id"), {})
        return f"{self.ann_file}: annotation id {ann.get('id')} (image {img.get('file_name', ann.get('image_id'))})"

    def _validate(self) -> None:
        for img in self.coco.dataset["images"]:
            if not {"id", "file_name", "width", "height"} <= set(img):
                raise ValueError(f"{self.ann_file}: image entry {img} lacks id, file_name, width or height")
            path = Path(self.root) / img["file_name"]
            if not path.is_file():
                raise ValueError(
                    f"{self.ann_file}: image id {img['id']} file {path} does not exist; fix file_name or the root "
                    f"folder ({self.root})"
                )
        cat_kpts = {c["id"]: len(c.get("keypoints", [])) for c in self.coco.dataset["categories"]}
        for ann in self.coco.dataset["annotations"]:
            where = self._where(ann)
            if ann.get("image_id") not in self.coco.imgs:
                raise ValueError(f"{where}: image_id {ann.get('image_id')} is not in images")
            if ann.get("category_id") not in cat_kpts:
                raise ValueError(
                    f"{where}: category_id {ann.get('category_id')} is not in categories {sorted(cat_kpts)}"
                )
            bbox = ann.get("bbox")
            if not isinstance(bbox, list) or len(bbox) != 4:
                raise ValueError(f"{where}: bbox {bbox!r} is not [x, y, width, height]")
            img = self.coco.imgs[ann["image_id"]]
            x, y, w, h = (float(v) for v in bbox)
            if w <= 0 or h <= 0:
                raise ValueError(f"{where}: bbox {bbox} has no area (width and height must be > 0)")
            if (
                x < -_EDGE_TOL
                or y < -_EDGE_TOL
                or x + w > img["width"] + _EDGE_TOL
                or y + h > img["height"] + _EDGE_TOL
            ):
                raise ValueError(
                    f"{where}: bbox {bbox} (x, y, width, height) lies outside the {img['width']}x{img['height']} "
                    "image; clip or drop the annotation"
                )
            if self.with_keypoints:
                kp = ann.get("keypoints")
                want = 3 * cat_kpts[ann["category_id"]]
                if kp is None or len(kp) != want or want != 3 * self.num_keypoints:
                    got = "no keypoints" if kp is None else f"{len(kp)} keypoint values"
                    raise ValueError(
                        f"{where}: {got}, but category {ann['category_id']} declares {want // 3} keypoints (3 values "
                        f"each: x, y, v) and the dataset {self.num_keypoints}"
                    )
            if self.with_masks:
                seg = ann.get("segmentation")
                if isinstance(seg, dict) and list(seg.get("size", [])) != [img["height"], img["width"]]:
                    raise ValueError(
                        f"{where}: RLE size {seg.get('size')} is not the image's [{img['height']}, {img['width']}]"
                    )
                if not isinstance(seg, (dict, list)) or (isinstance(seg, list) and not seg):
                    raise ValueError(f"{where}: segmentation must be polygons or an RLE, got {type(seg).__name__}")

    def _load_image(self, id: int) -> Image.Image:
        # torchvision's _load_image converts every image to RGB; keep one-channel files as they are
        with Image.open(Path(self.root) / self.coco.imgs[id]["file_name"]) as f:
            if self.channels is not None:
                return f.convert("L" if self.channels == 1 else "RGB")
            return f.convert("L") if f.mode in ("L", "1", "I;16", "I", "F") else f.convert("RGB")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image_id = self.ids[index]
        pil = self._load_image(image_id)
        anns = [a for a in self._load_target(image_id) if not a.get("iscrowd", 0)]
        image = pil_to_tensor(pil).float().div_(255)
        target = self.make_target(image_id, anns, pil.height, pil.width)
        if self.hflip > 0 and float(torch.rand(())) < self.hflip:
            image, target = _flip(image, target, self.flip_map)
        return image, target

    def make_target(self, image_id: int, anns: Sequence[Mapping[str, Any]], height: int, width: int) -> dict:
        """The target dict of one image from its (non-crowd) COCO annotations."""
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(0, width)
        boxes[:, 1::2].clamp_(0, height)
        target: dict[str, torch.Tensor] = {
            "boxes": boxes,
            "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
            "image_id": torch.tensor(image_id),
            "area": torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32),
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
        }
        if self.with_masks:
            masks = [self.coco.annToMask(a) for a in anns]
            target["masks"] = (
                torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), dtype=torch.uint8)
            )
        if self.with_keypoints:
            kp = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32)
            target["keypoints"] = kp.reshape(len(anns), self.num_keypoints, 3)
        return target


def _flip_permutation(categories: Sequence[Mapping[str, Any]], k: int) -> list[int]:
    perm = list(range(k))
    for c in categories:
        for a, b in c.get("keypoint_flip_map", []):
            perm[a], perm[b] = b, a
    return perm


def _flip(image: torch.Tensor, target: dict, perm: list[int]) -> tuple[torch.Tensor, dict]:
    w = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
    target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    if "keypoints" in target:
        kp = target["keypoints"][:, perm].clone()
        kp[..., 0] = w - kp[..., 0]
        target["keypoints"] = kp
    return image.flip(-1), target


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """``DataLoader`` collate for detection: images and targets as lists (torchvision detectors batch them)."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


def detections_to_coco(
    image_id: int, detections: Mapping[str, torch.Tensor], mask_threshold: float = 0.5
) -> list[dict[str, Any]]:
    """One image's detector output as COCO result entries (``xywh`` boxes; masks as RLE; keypoints flat).

    Args:
        image_id: the COCO image id.
        detections: a torchvision detector's output dict for the image (``boxes``, ``scores``, ``labels``, and
            ``masks`` ``(N, 1, H, W)`` probabilities / ``keypoints`` ``(N, K, 3)`` where the model has them).
        mask_threshold: probability above which a mask pixel is on.
    """
    boxes = detections["boxes"].detach().cpu().float()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
    scores = detections["scores"].detach().cpu().tolist()
    labels = detections["labels"].detach().cpu().tolist()
    out = [
        {"image_id": int(image_id), "category_id": int(c), "bbox": b, "score": float(s)}
        for b, s, c in zip(xywh, scores, labels)
    ]
    if "masks" in detections:
        masks = (detections["masks"].detach().cpu()[:, 0] > mask_threshold).numpy().astype(np.uint8)
        for entry, m in zip(out, masks):
            rle = mask_utils.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode("ascii")
            entry["segmentation"] = rle
    if "keypoints" in detections:
        kps = detections["keypoints"].detach().cpu().float()
        for entry, kp in zip(out, kps):
            flat = kp.clone()
            flat[:, 2] = 1.0
            entry["keypoints"] = flat.reshape(-1).tolist()
    return out


def coco_evaluate(
    coco_gt: COCO | str | os.PathLike[str] | Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    iou_types: Sequence[str] = ("bbox",),
    *,
    kpt_oks_sigmas: Sequence[float] | None = None,
    image_ids: Sequence[int] | None = None,
) -> dict[str, dict[str, float]]:
    """AP, AP50 and AP75 of COCO-format results with pycocotools' ``COCOeval``.

    Args:
        coco_gt: the ground truth (a ``COCO`` index, a JSON path or its dict).
        results: COCO result entries (:func:`detections_to_coco`).
        iou_types: any of ``bbox``, ``segm``, ``keypoints``.
        kpt_oks_sigmas: per-keypoint OKS constants; default COCO's for 17 keypoints, else
            :data:`DEFAULT_KEYPOINT_SIGMA` each. Must have one per keypoint.
        image_ids: evaluate these images only (default: every image of the ground truth).

    Returns:
        ``{iou_type: {"AP": ..., "AP50": ..., "AP75": ...}}`` in [0, 1]; 0 for every metric when there are no
        results.

    Raises:
        ValueError: an unknown IoU type, or sigmas of the wrong length.
    """
    gt = coco_gt if isinstance(coco_gt, COCO) else load_coco(coco_gt)
    bad = [t for t in iou_types if t not in IOU_TYPES]
    if bad:
        raise ValueError(f"iou_types {bad} are not among {IOU_TYPES}")
    out: dict[str, dict[str, float]] = {}
    for iou_type in iou_types:
        entries = [r for r in results if iou_type == "bbox" or _result_key(iou_type) in r]
        if not entries:
            out[iou_type] = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes([dict(r) for r in entries])
            ev = COCOeval(gt, dt, iou_type)
            if image_ids is not None:
                ev.params.imgIds = list(image_ids)
            if iou_type == "keypoints":
                k = len(entries[0]["keypoints"]) // 3
                sigmas = kpt_oks_sigmas
                if sigmas is None:
                    sigmas = COCO_PERSON_SIGMAS if k == 17 else (DEFAULT_KEYPOINT_SIGMA,) * k
                if len(sigmas) != k:
                    raise ValueError(
                        f"kpt_oks_sigmas has {len(sigmas)} values for {k} keypoints; give one per keypoint"
                    )
                ev.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        stats = [max(0.0, float(s)) for s in ev.stats[:3]]  # -1: no ground truth
        out[iou_type] = {"AP": stats[0], "AP50": stats[1], "AP75": stats[2]}
    return out


def _result_key(iou_type: str) -> str:
    return {"segm": "segmentation", "keypoints": "keypoints"}[iou_type]
