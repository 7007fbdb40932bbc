"""Fashion-MNIST scenes: synthetic detection data in COCO format, composed from real Fashion-MNIST items.

**These are synthetic compositions, not COCO.** No annotated detection set can be installed on our machines, so
:func:`make_scenes` pastes real Fashion-MNIST items (rescaled at random) onto a black 128x128 canvas, 2-6 per
image, and derives every annotation from the pixels it pasted:

* instance masks: each item's pixels above :data:`INK_THRESHOLD` that stay visible; later items occlude earlier
  ones. A placement that would leave an earlier item less than ``min_visible`` of its pixels is retried elsewhere
  (and the item skipped after ``max_tries``), so no annotated item is mostly hidden and no visible item is left
  unannotated;
* boxes: the tight box of the visible mask (COCO ``[x, y, w, h]``, pixel edges);
* 5 keypoints per object from the visible mask (:data:`KEYPOINT_NAMES`: its top, bottom, left and right extreme
  pixels and the visible pixel nearest its centroid), all visible (``v = 2``), at pixel centres; horizontal flips
  swap ``left`` and ``right`` (:data:`KEYPOINT_FLIP_MAP`);
* categories: the 10 Fashion-MNIST classes, ids 1-10 (0 stays the detectors' background);
* semantic masks (:func:`scene_semantic_mask`, for segmentation): an ``(H, W)`` class map derived from the instance
  masks, 0 for the background and the category id (Fashion-MNIST class + 1, 1-10) on each item's visible pixels;
  where items overlap the one drawn last wins (the visible masks are disjoint, so every inked pixel has exactly one
  item). 255 is reserved as the ignore index (:data:`slimmable.data.segmentation.IGNORE_INDEX`); scenes never
  contain it. The masks are computed from ``annotations.json`` when read, so the files below are all there is.

Training scenes use Fashion-MNIST's training images and test scenes its test images. The output is deterministic
for a given ``(split, num_images, seed, ...)``: ``out_dir/annotations.json`` (COCO instances with keypoints) and
``out_dir/images/NNNNNN.png`` (8-bit grey).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from .._utils import write_text
from .datasets import load_fashion_mnist

__all__ = [
    "FASHION_MNIST_CLASSES",
    "INK_THRESHOLD",
    "KEYPOINT_FLIP_MAP",
    "KEYPOINT_NAMES",
    "make_scenes",
    "scene_semantic_mask",
]

_logger = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
KEYPOINT_NAMES = ("top", "bottom", "left", "right", "center")
#: pairs of keypoint indices (0-based) that swap under a horizontal flip
KEYPOINT_FLIP_MAP = ((2, 3),)
#: a pasted pixel belongs to the item when its grey value exceeds this (of 255)
INK_THRESHOLD = 24


def make_scenes(
    out_dir: str | os.PathLike[str],
    split: str = "train",
    num_images: int = 500,
    seed: int = 0,
    *,
    image_size: int = 128,
    items: tuple[int, int] = (2, 6),
    scale: tuple[float, float] = (0.8, 2.0),
    min_visible: float = 0.6,
    max_tries: int = 10,
    root: str | os.PathLike[str] | None = None,
) -> Path:
    """Write ``num_images`` Fashion-MNIST scenes with COCO annotations (boxes, masks, keypoints) to ``out_dir``.

    Args:
        out_dir: output folder (created); holds ``annotations.json`` and ``images/``.
        split: ``train`` (scenes from Fashion-MNIST's training images) or ``test`` (from its test images).
        num_images: scenes to write.
        seed: the random seed; the same arguments give the same files.
        image_size: the square canvas side in pixels.
        items: the inclusive range of items per scene.
        scale: the range of each item's size relative to its 28x28 source (uniform).
        min_visible: the fraction of an item's pixels that must stay visible after later items are placed.
        max_tries: placements tried per item before it is skipped.
        root: a Fashion-MNIST folder (default: where :func:`~slimmable.data.load_fashion_mnist` finds it).

    Returns:
        The path of ``annotations.json``.

    Raises:
        ValueError: bad arguments (a range the wrong way round, items larger than the canvas, ...).
        FileNotFoundError: Fashion-MNIST is not installed (see :func:`~slimmable.data.load_fashion_mnist`).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split {split!r} is not one of train, test")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if not 1 <= items[0] <= items[1]:
        raise ValueError(f"items {items} must be (lo, hi) with 1 <= lo <= hi")
    if not 0 < scale[0] <= scale[1] or round(28 * scale[1]) > image_size:
        raise ValueError(f"scale {scale} must satisfy 0 < lo <= hi with 28 * hi <= image_size {image_size}")
    if not 0 < min_visible <= 1:
        raise ValueError(f"min_visible {min_visible} must be in (0, 1]")
    images, labels, _ = load_fashion_mnist(root, split, download=False)
    pool = images[:, 0].numpy()
    pool_labels = labels.numpy()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    coco_images, annotations = [], []
    ann_id = 1
    for image_id in range(1, num_images + 1):
        canvas, objects = _compose(rng, pool, pool_labels, image_size, items, scale, min_visible, max_tries)
        file_name = f"images/{image_id:06d}.png"
        Image.fromarray(canvas, mode="L").save(out / file_name, compress_level=1)
        coco_images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        for label, mask in objects:
            annotations.append(_annotation(ann_id, image_id, label, mask))
            ann_id += 1
    categories = [
        {
            "id": i + 1,
            "name": name,
            "supercategory": "fashion",
            "keypoints": list(KEYPOINT_NAMES),
            "skeleton": [[1, 5], [2, 5], [3, 5], [4, 5]],
            "keypoint_flip_map": [list(p) for p in KEYPOINT_FLIP_MAP],
        }
        for i, name in enumerate(FASHION_MNIST_CLASSES)
    ]
    info = {
        "description": (
            f"Fashion-MNIST scenes ({split}): SYNTHETIC compositions of real Fashion-MNIST {split} items pasted on a "
            f"{image_size}x{image_size} black canvas; NOT COCO. Boxes, masks and keypoints are derived from the "
            "pasted pixels."
        ),
        "version": "1",
        "seed": seed,
        "split": split,
        "generator": "slimmable.data.scenes.make_scenes",
    }
    data = {"info": info, "images": coco_images, "annotations": annotations, "categories": categories}
    path = out / "annotations.json"
    write_text(path, json.dumps(data))  # atomic: its presence means the scenes are complete
    _logger.info("wrote %d scenes with %d objects to %s", num_images, len(annotations), out)
    return path


def scene_semantic_mask(annotations: Sequence[Mapping[str, Any]], height: int, width: int) -> np.ndarray:
    """The ``(height, width)`` uint8 class map of one scene from its annotations (in ``annotations.json``'s order,
    the order the items were drawn): 0 for the background, the category id (Fashion-MNIST class + 1) on each
    item's mask, a later item winning where masks overlap.

    Raises:
        ValueError: an annotation with a category id outside 1-10.
    """
    from .segmentation import coco_semantic_mask

    return coco_semantic_mask(annotations, height, width, {i + 1: i + 1 for i in range(len(FASHION_MNIST_CLASSES))})


def _compose(
    rng: np.random.Generator,
    pool: np.ndarray,
    pool_labels: np.ndarray,
    size: int,
    items: tuple[int, int],
    scale: tuple[float, float],
    min_visible: float,
    max_tries: int,
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One scene: the canvas and ``(category id, visible mask)`` of each item kept."""
    canvas = np.zeros((size, size), np.uint8)
    owner = np.zeros((size, size), np.int16)  # 0: background, k: the k-th kept item
    full_area: list[int] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(items[0], items[1] + 1))):
        idx = int(rng.integers(len(pool)))
        side = round(28 * float(rng.uniform(*scale)))
        item = np.asarray(Image.fromarray(pool[idx]).resize((side, side), Image.BILINEAR))
        ink = item > INK_THRESHOLD
        if ink.sum() < 16:
            continue
        for _try in range(max_tries):
            y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            window = owner[y : y + side, x : x + side]
            covered = np.bincount(window[ink].ravel(), minlength=len(labels) + 1)[1:]
            visible = np.bincount(owner.ravel(), minlength=len(labels) + 1)[1:] - covered
            if all(v >= min_visible * a for v, a in zip(visible, full_area)):
                break
        else:
            continue  # every placement hid an earlier item: skip this one
        k = len(labels) + 1
        window[ink] = k
        canvas[y : y + side, x : x + side][ink] = item[ink]
        full_area.append(int(ink.sum()))
        labels.append(int(pool_labels[idx]) + 1)
    return canvas, [(labels[k - 1], owner == k) for k in range(1, len(labels) + 1)]


def _annotation(ann_id: int, image_id: int, label: int, mask: np.ndarray) -> dict:
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": label,
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "area": int(mask.sum()),
        "segmentation": rle,
        "iscrowd": 0,
        "keypoints": _keypoints(xs, ys),
        "num_keypoints": len(KEYPOINT_NAMES),
    }


def _keypoints(xs: np.ndarray, ys: np.ndarray) -> list[float]:
    """Top, bottom, left, right extreme pixels (the middle one where several tie) and the visible pixel nearest
    the centroid, as COCO ``[x, y, v] * 5`` at pixel centres."""

    def middle(sel: np.ndarray) -> int:
        cand = np.nonzero(sel)[0]
        return int(cand[len(cand) // 2])

    top = middle(ys == ys.min())
    bottom = middle(ys == ys.max())
    left = middle(xs == xs.min())
    right = middle(xs == xs.max())
    cx, cy = xs.mean(), ys.mean()
    center = int(np.argmin((xs - cx) ** 2 + (ys - cy) ** 2))
    out: list[float] = []
    for i in (top, bottom, left, right, center):
        out += [float(xs[i]) + 0.5, float(ys[i]) + 0.5, 2]
    return out
