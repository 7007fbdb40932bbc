"""COCO-format detection data (boxes, instance masks, keypoints) and its evaluation with pycocotools' ``COCOeval``.

:class:`CocoDetectionDataset` reads a COCO ``instances``-style JSON with torchvision's ``CocoDetection`` and yields
what torchvision's detectors take: an image tensor ``(C, H, W)`` in [0, 1] and a target dict with ``boxes``
(``xyxy``), ``labels`` (the COCO category ids; 0 is the detectors' background), ``masks`` and ``keypoints``. Every
annotation and every image file's header are validated once, when the dataset is built (ids, numbers, masks,
keypoints, image sizes: see ``docs/reliability.md``, "COCO-format data"): bad data gives a one-line ``ValueError``
naming the file and the id, quoting at most about 200 characters of any value.

:func:`coco_evaluate` scores detections with ``COCOeval`` (the reference AP implementation): ``bbox``, ``segm`` and
``keypoints``, with ``kpt_oks_sigmas`` sized to the keypoint count.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import warnings
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

from .._utils import short_repr
from .datasets import _UnreadableImageError

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
#: the largest category id: the detector has one output per id up to the largest (and 0, the background)
MAX_CATEGORY_ID = 100_000
_INT64 = (-(2**63), 2**63 - 1)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_MAX_PATH = 4096
_QUOTE = 200  # characters of a value from the file that a message quotes as it is


def load_coco(ann_file: str | os.PathLike[str] | Mapping[str, Any]) -> COCO:
    """A pycocotools ``COCO`` index of a JSON file or an already loaded dict, without pycocotools' prints.

    The structure is checked before pycocotools indexes it (its index silently keeps one of two entries with the
    same id): ``images``, ``annotations`` and ``categories`` are lists of objects with unique integer ids, and
    every annotation has an integer ``image_id`` and ``category_id``.

    Raises:
        FileNotFoundError: no file at the path.
        ValueError: the file is not JSON (or nested too deep to be a COCO file), lacks
            ``images``/``annotations``/``categories``, or has entries without ids or with duplicate ids.
    """
    source = "annotations" if isinstance(ann_file, Mapping) else str(ann_file)
    try:
        if isinstance(ann_file, Mapping):
            data = copy.deepcopy(dict(ann_file))
        else:
            path = Path(ann_file)
            if not path.is_file():
                raise FileNotFoundError(f"COCO annotation file {path} does not exist; check the path")
            try:
                data = json.loads(path.read_bytes())
            except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an int above Python's digit limit
                raise ValueError(
                    f"{path} is not valid JSON ({short_repr(str(err))}); give a COCO annotation file"
                ) from err
    except RecursionError:
        raise ValueError(
            f"{source} is not a COCO annotation file (its JSON is nested too deep; a COCO file is a few levels deep)"
        ) from None
    _check_structure(data, source)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_id(value: Any) -> bool:
    # ids become int64 tensors (image_id) and pycocotools dict keys
    return _is_int(value) and _INT64[0] <= value <= _INT64[1]


def _check_structure(data: Any, source: str) -> None:
    """What pycocotools' index needs, and unique ids (it would silently keep one of two entries with an id)."""
    if not isinstance(data, dict):
        raise ValueError(
            f"{source} holds a JSON {type(data).__name__}, not an object: a COCO instances file is an object with "
            "images, annotations, categories"
        )
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise ValueError(
            f"{source} lacks the COCO keys {missing}; a COCO instances file has images, annotations, categories"
        )
    for key, kind in (("images", "image"), ("categories", "category"), ("annotations", "annotation")):
        entries = data[key]
        if not isinstance(entries, list):
            raise ValueError(f"{source}: {key} is {short_repr(entries)}, not a list of {kind} objects")
        first: dict[int, int] = {}
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise ValueError(f"{source}: {key}[{i}] is {short_repr(entry)}, not a {kind} object")
            eid = entry.get("id")
            if not _is_id(eid):
                raise ValueError(f"{source}: {key}[{i}] has id {short_repr(eid)}; ids are integers")
            if eid in first:
                raise ValueError(
                    f"{source}: {kind} id {eid} appears twice ({key}[{first[eid]}] and {key}[{i}]); ids must be "
                    "unique (a duplicate silently replaces the other entry)"
                )
            first[eid] = i
            if key == "annotations":
                for field in ("image_id", "category_id"):
                    if not _is_id(entry.get(field)):
                        raise ValueError(
                            f"{source}: annotation id {eid} has {field} {short_repr(entry.get(field))}; it must be "
                            "the integer id of an entry of " + ("images" if field == "image_id" else "categories")
                        )


def _name(value: Any) -> str:
    """A string from a file as it reads when it is short and printable, else its :func:`short_repr`."""
    return value if isinstance(value, str) and len(value) <= _QUOTE and value.isprintable() else short_repr(value)


def _numbers(values: Any, length: int | None = None) -> bool:
    """``values`` is a list (of ``length`` items) of finite numbers that fit a float32."""
    if not isinstance(values, list) or (length is not None and len(values) != length):
        return False
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if isinstance(v, int) and not -_FLOAT32_MAX < v < _FLOAT32_MAX:  # before float(): no overflow
            return False
        if not -_FLOAT32_MAX < float(v) < _FLOAT32_MAX:  # NaN fails both comparisons
            return False
    return True


def _inside(x0: float, y0: float, x1: float, y1: float, img: Mapping[str, Any]) -> bool:
    """The extent ``x0..x1, y0..y1`` lies in the image, up to the edge tolerance."""
    return x0 >= -_EDGE_TOL and y0 >= -_EDGE_TOL and x1 <= img["width"] + _EDGE_TOL and y1 <= img["height"] + _EDGE_TOL


def _rle_string_counts(counts: str) -> list[int] | None:
    """The run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``), or ``None`` when it is not
    one (a character outside ``0``-``o``, or a last run cut short)."""
    if not counts.isascii():
        return None
    data = counts.encode("ascii")
    if data and (min(data) < 48 or max(data) >= 48 + 64):
        return None
    out: list[int] = []
    x = k = 0
    for byte in data:
        c = byte - 48
        x |= (c & 0x1F) << (5 * k)
        k += 1
        if c & 0x20:  # more characters of this run follow
            if k > 13:  # more than pycocotools' 64-bit run length (and no unbounded big-int growth)
                return None
            continue
        if c & 0x10:
            x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
        x = k = 0
    return None if k else out  # k: the last run is cut short


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

    Everything the targets are made from is validated when the dataset is built, so that bad data fails before
    training, never silently or mid-epoch: unique image, annotation and category ids; category ids from 1 (0 is
    the background); every image file's header (it exists, is an image, is at most ``PIL.Image.MAX_IMAGE_PIXELS``
    pixels and has the JSON's width and height; pixels are not decoded); boxes, polygons, RLEs and keypoints
    (finite numbers, inside the image, well formed); the keypoint flip map.

    Raises:
        FileNotFoundError: the annotation file or ``root`` does not exist.
        ValueError: bad data; one line naming the annotation file, the entry's id and what is wrong, quoting at
            most about 200 characters of any value.
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
        self._validate_categories(cats)
        counts = {len(c.get("keypoints", [])) for c in cats}
        self.num_keypoints = max(counts) if counts else 0
        self.with_keypoints = bool(self.num_keypoints) if keypoints is None else keypoints
        anns = self.coco.dataset["annotations"]
        self.with_masks = all("segmentation" in a for a in anns) and bool(anns) if masks is None else masks
        self.flip_map = _flip_permutation(cats, self.num_keypoints, self.ann_file)
        self._validate_images()
        self._validate()

    def _where(self, ann: Mapping[str, Any]) -> str:
        img = self.coco.imgs.get(ann.get("image_id"), {})
        return (
            f"{self.ann_file}: annotation id {ann.get('id')} (image {_name(img.get('file_name', ann.get('image_id')))})"
        )

    def _path(self, image_id: int) -> Path:
        return Path(self.root) / self.coco.imgs[image_id]["file_name"]

    def _validate_categories(self, cats: Sequence[Mapping[str, Any]]) -> None:
        for c in cats:
            where = f"{self.ann_file}: category id {c['id']}"
            if not 1 <= c["id"] <= MAX_CATEGORY_ID:
                raise ValueError(
                    f"{where}: category ids run from 1 to {MAX_CATEGORY_ID} (0 is the detectors' background, and "
                    "the detector has one output per id up to the largest); renumber the categories"
                )
            if not isinstance(c.get("name"), str):
                raise ValueError(f"{where}: name {short_repr(c.get('name'))} is not a string")
            kps = c.get("keypoints", [])
            if not isinstance(kps, list):
                raise ValueError(f"{where}: keypoints {short_repr(kps)} is not a list of keypoint names")

    def _validate_images(self) -> None:
        """Each image entry's fields, and its file's header (size and format; the pixels are not decoded)."""
        seen: dict[str, int] = {}
        for img in self.coco.dataset["images"]:
            where = f"{self.ann_file}: image id {img['id']}"
            name = img.get("file_name")
            if not isinstance(name, str) or not name or "\0" in name or len(name) > _MAX_PATH:
                raise ValueError(f"{where}: file_name {short_repr(name)} is not a file name")
            path = Path(self.root) / name
            where = f"{where} file {_name(str(path))}"
            width, height = img.get("width"), img.get("height")
            if not (_is_int(width) and _is_int(height) and width >= 1 and height >= 1):
                raise ValueError(
                    f"{where}: width {short_repr(width)} and height {short_repr(height)} must be positive integers"
                )
            key = os.path.normpath(name)
            if key in seen:
                raise ValueError(
                    f"{where}: image id {seen[key]} names the same file; one image's annotations would be split "
                    "between two entries (merge them)"
                )
            seen[key] = img["id"]
            size = self._header(path, where)
            if size != (width, height):
                raise ValueError(
                    f"{where} is {size[0]}x{size[1]} pixels but the JSON says width {short_repr(width)}, height "
                    f"{short_repr(height)}; fix width and height (masks and boxes are made at the JSON's size)"
                )

    def _header(self, path: Path, where: str) -> tuple[int, int]:
        """An image file's size from its header, refusing a missing, unreadable or oversized file."""
        try:
            missing = "is not a file" if path.exists() and not path.is_file() else None
            if not path.exists():
                missing = "is a link to a missing file" if path.is_symlink() else "does not exist"
        except OSError as err:  # a name too long for the file system, a loop of links
            missing = f"cannot be looked up ({err.strerror})"
        if missing:
            raise ValueError(f"{where} {missing}; fix file_name or the root folder ({self.root})")
        limit = Image.MAX_IMAGE_PIXELS
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with the reason
                with Image.open(path) as f:
                    size = f.size
        except Image.DecompressionBombError as err:  # above twice PIL's limit: PIL refuses before the size is known
            pixels = re.search(r"\((\d+) pixels\)", str(err))
            size, big = None, f"{pixels.group(1)} pixels" if pixels else "too many pixels"
        except (OSError, ValueError) as err:  # not an image, a truncated header, no permission
            raise ValueError(
                f"{where} cannot be read as an image ({type(err).__name__}: {short_repr(str(err))}); replace or "
                "remove it"
            ) from None
        else:
            big = f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels"
        if size is None or (limit is not None and size[0] * size[1] > limit):
            raise ValueError(
                f"{where} is {big}, above the limit of {limit} pixels (PIL.Image.MAX_IMAGE_PIXELS, a guard against "
                "decompression bombs); raise PIL.Image.MAX_IMAGE_PIXELS before building the dataset if it is genuine"
            )
        return size

    def _validate(self) -> None:
        cat_kpts = {c["id"]: len(c.get("keypoints", [])) for c in self.coco.dataset["categories"]}
        for ann in self.coco.dataset["annotations"]:
            where = self._where(ann)
            if ann["image_id"] not in self.coco.imgs:
                raise ValueError(f"{where}: image_id {ann['image_id']} is not in images")
            if ann["category_id"] not in cat_kpts:
                raise ValueError(
                    f"{where}: category_id {ann['category_id']} is not in categories {short_repr(sorted(cat_kpts))}"
                )
            img = self.coco.imgs[ann["image_id"]]
            self._check_box(ann, img, where)
            area, crowd = ann.get("area", 0), ann.get("iscrowd", 0)
            if not _numbers([area]) or area < 0:
                raise ValueError(f"{where}: area {short_repr(area)} is not a finite number >= 0")
            if not _is_int(crowd) or crowd not in (0, 1):
                raise ValueError(f"{where}: iscrowd {short_repr(crowd)} is not 0 or 1")
            want = 3 * cat_kpts[ann["category_id"]]
            if "keypoints" in ann or self.with_keypoints:
                self._check_keypoints(ann.get("keypoints"), want, img, where)
            if "segmentation" in ann or self.with_masks:
                self._check_segmentation(ann.get("segmentation"), img, where)

    @staticmethod
    def _check_box(ann: Mapping[str, Any], img: Mapping[str, Any], where: str) -> None:
        bbox = ann.get("bbox")
        if not _numbers(bbox, 4):
            raise ValueError(f"{where}: bbox {short_repr(bbox)} is not [x, y, width, height] of finite numbers")
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            raise ValueError(f"{where}: bbox {short_repr(bbox)} has no area (width and height must be > 0)")
        if not _inside(x, y, x + w, y + h, img):
            raise ValueError(
                f"{where}: bbox {short_repr(bbox)} (x, y, width, height) lies outside the {img['width']}x"
                f"{img['height']} image; clip or drop the annotation"
            )
        # the target's box as make_target builds it (float32, clamped to the image): torchvision's detectors stop
        # on a box without width or height (one on the image's edge, or thinner than float32 resolves)
        box = np.array(bbox, dtype=np.float32)
        box[2:] += box[:2]
        box = box.clip(0, np.array([img["width"], img["height"]] * 2, dtype=np.float32))
        if not (box[2] > box[0] and box[3] > box[1]):
            raise ValueError(
                f"{where}: bbox {short_repr(bbox)} (x, y, width, height) has no area inside the {img['width']}x"
                f"{img['height']} image; drop the annotation"
            )

    def _check_keypoints(self, kp: Any, want: int, img: Mapping[str, Any], where: str) -> None:
        if self.with_keypoints and (not isinstance(kp, list) or len(kp) != want or want != 3 * self.num_keypoints):
            got = f"{len(kp)} keypoint values" if isinstance(kp, list) else f"keypoints {short_repr(kp)}"
            raise ValueError(
                f"{where}: {got}, but its category declares {want // 3} keypoints (3 values each: x, y, v) and the "
                f"dataset {self.num_keypoints}"
            )
        if not _numbers(kp) or len(kp) % 3:
            raise ValueError(f"{where}: keypoints {short_repr(kp)} are not finite numbers x, y, v per keypoint")
        for i in range(0, len(kp), 3):
            x, y, v = kp[i : i + 3]
            if v not in (0, 1, 2):
                raise ValueError(f"{where}: keypoint {i // 3} has visibility {short_repr(v)}; it is 0, 1 or 2")
            if v and not _inside(x, y, x, y, img):
                raise ValueError(
                    f"{where}: visible keypoint {i // 3} at ({short_repr(x)}, {short_repr(y)}) lies outside the "
                    f"{img['width']}x{img['height']} image"
                )

    @staticmethod
    def _check_segmentation(seg: Any, img: Mapping[str, Any], where: str) -> None:
        height, width = img["height"], img["width"]
        if isinstance(seg, list) and seg:
            for i, poly in enumerate(seg):
                if not _numbers(poly) or len(poly) < 6 or len(poly) % 2:
                    raise ValueError(
                        f"{where}: polygon {i} {short_repr(poly)} is not x, y pairs of finite numbers (at least "
                        "3 points: 6 numbers)"
                    )
                xs, ys = poly[0::2], poly[1::2]
                if not _inside(min(xs), min(ys), max(xs), max(ys), img):
                    raise ValueError(f"{where}: polygon {i} {short_repr(poly)} lies outside the {width}x{height} image")
            return
        if not isinstance(seg, dict):
            raise ValueError(
                f"{where}: segmentation must be polygons or an RLE, got {type(seg).__name__} {short_repr(seg)}"
            )
        if seg.get("size") != [height, width]:
            raise ValueError(f"{where}: RLE size {short_repr(seg.get('size'))} is not the image's [{height}, {width}]")
        counts = seg.get("counts")
        if isinstance(counts, str):
            runs = _rle_string_counts(counts)
            if runs is None:
                raise ValueError(f"{where}: RLE counts {short_repr(counts)} is not a compressed COCO RLE string")
        elif isinstance(counts, list) and all(_is_int(c) for c in counts):
            runs = counts
        else:
            raise ValueError(
                f"{where}: RLE counts {short_repr(counts)} is neither a list of run lengths nor an RLE string"
            )
        if any(c < 0 for c in runs):
            raise ValueError(f"{where}: RLE counts {short_repr(counts)} has a negative run length")
        if sum(runs) != height * width:
            raise ValueError(
                f"{where}: RLE run lengths sum to {sum(runs)}, not the image's {height}x{width} = {height * width} "
                "pixels"
            )

    def _load_image(self, id: int) -> Image.Image:
        # torchvision's _load_image converts every image to RGB; keep one-channel files as they are. A file that
        # became unreadable since the dataset was built gives one line naming it, also from a DataLoader worker.
        path = self._path(id)
        try:
            with Image.open(path) as f:
                if f.size != (self.coco.imgs[id]["width"], self.coco.imgs[id]["height"]):
                    raise ValueError(f"it is {f.size[0]}x{f.size[1]} pixels now, not the JSON's width and height")
                if self.channels is not None:
                    return f.convert("L" if self.channels == 1 else "RGB")
                return f.convert("L") if f.mode in ("L", "1", "I;16", "I", "F") else f.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise _UnreadableImageError(
                f"{self.ann_file}: image id {id} file {_name(str(path))} cannot be read ({type(err).__name__}: "
                f"{short_repr(str(err))}); it changed since the dataset was built: replace or restore it"
            ) from err

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


def _flip_permutation(categories: Sequence[Mapping[str, Any]], k: int, source: str) -> list[int]:
    """The keypoint permutation of a horizontal flip, from the categories' ``keypoint_flip_map`` index pairs.

    Raises:
        ValueError: a pair that is not two indices in ``0..k-1``, or an index paired with two others.
    """
    partner: dict[int, int] = {}
    for c in categories:
        pairs = c.get("keypoint_flip_map", [])
        if not isinstance(pairs, list):
            raise ValueError(f"{source}: category id {c['id']}: keypoint_flip_map {short_repr(pairs)} is not a list")
        for pair in pairs:
            if not (isinstance(pair, list) and len(pair) == 2 and all(_is_int(i) and 0 <= i < k for i in pair)):
                raise ValueError(
                    f"{source}: category id {c['id']}: keypoint_flip_map entry {short_repr(pair)} is not a pair of "
                    f"0-based keypoint indices in 0..{k - 1} ({k} keypoints)"
                )
            a, b = pair
            for x, y in ((a, b), (b, a)):
                if partner.setdefault(x, y) != y:
                    raise ValueError(
                        f"{source}: category id {c['id']}: keypoint_flip_map pairs keypoint {x} with both "
                        f"{partner[x]} and {y}; a flip swaps each keypoint with one other"
                    )
    return [partner.get(i, i) for i in range(k)]


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
