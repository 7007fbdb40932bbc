"""Semantic segmentation data: images with a class index per pixel, from Fashion-MNIST scenes, COCO-format
annotations or folders of images and mask PNGs.

Every source yields ``(image, mask)``: ``image`` a float32 ``(C, H, W)`` tensor in [0, 1] (not normalised: the
model or the training code does that), ``mask`` an int64 ``(H, W)`` tensor of class indices:

* ``0``: the background;
* ``1 .. num_classes - 1``: the classes (COCO-format data: the categories sorted by id, renumbered 1, 2, ...);
* :data:`IGNORE_INDEX` (255): pixels no loss and no metric counts (COCO crowd regions, 255 in a folder's mask).
  255 is reserved, so a dataset has at most 255 classes (indices 0..254), background included.

The sources (``dataset`` of :func:`create_segmentation_datasets`):

``fmnist_scenes``
    The Fashion-MNIST scenes of :mod:`slimmable.data.scenes` (generated once and cached, the same files the
    detection data uses): class ``k + 1`` for Fashion-MNIST class ``k`` (the scenes' category ids), from the
    scenes' instance masks (:func:`slimmable.data.scenes.scene_semantic_mask`). Grey images: one channel unless
    ``channels=3``.
``coco``
    A COCO-format folder (the layouts of :func:`~slimmable.data.detection.create_detection_datasets`), validated as
    :class:`~slimmable.data.coco.CocoDetectionDataset` validates it. The class map is painted from the instance
    segmentations (polygons, RLE or compressed RLE) by :func:`coco_semantic_mask`.
``folder``
    ``root/{train,test}/images/<stem>.png|jpg|jpeg`` with ``root/{train,test}/masks/<stem>.png`` (``val/`` for the
    test split when there is no ``test/``); each mask pixel is a class index (8-bit grey or palette PNG), 255 is
    ignored. The classes are named by ``root/classes.txt`` (one name per line; line ``i`` names index ``i``, the
    first usually ``background``) or counted by ``num_classes``. Every pair is checked when the dataset is built:
    a mask for every image and an image for every mask, the same size, and no class index beyond the declared
    classes.

Image sizes: :class:`SegmentationDataset`'s ``image_size`` resizes every image (bilinear) and its mask (nearest)
to one size so that batches stack; without it items keep their files' sizes.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from .._utils import short_repr
from .coco import CocoDetectionDataset
from .datasets import _UnreadableImageError

__all__ = [
    "IGNORE_INDEX",
    "SEGMENTATION_DATASETS",
    "CocoSegmentationDataset",
    "FolderSegmentationDataset",
    "SegmentationDataset",
    "SegmentationSplits",
    "coco_semantic_mask",
    "create_segmentation_datasets",
    "decode_segmentation",
    "read_class_names",
]

_logger = logging.getLogger(__name__)

#: the mask value of pixels that no loss and no metric counts; reserved, never a class index
IGNORE_INDEX = 255
#: the most classes a dataset can have (indices 0..254), background included
MAX_CLASSES = IGNORE_INDEX
SEGMENTATION_DATASETS = ("fmnist_scenes", "coco", "folder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_MASK_MODES = ("L", "P")  # 8-bit grey or palette: the pixel value is the class index


# ------------------------------------------------------------------------------------------- COCO -> class map


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """One COCO ``segmentation`` (polygons, an RLE with a list of run lengths, or a compressed RLE) as a
    ``(height, width)`` uint8 0/1 mask, decoded with pycocotools."""
    if isinstance(segmentation, list):  # polygons: one RLE each, merged
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


def coco_semantic_mask(
    annotations: Sequence[Mapping[str, Any]],
    height: int,
    width: int,
    class_index: Mapping[int, int],
    *,
    ignore_index: int = IGNORE_INDEX,
) -> np.ndarray:
    """The ``(height, width)`` uint8 class map of one image from its COCO annotations.

    Non-crowd annotations are painted in the order given (a file's order: for the Fashion-MNIST scenes, the order
    the items were drawn), each with ``class_index[category_id]``, so where instances overlap the later one wins.
    Crowd regions (``iscrowd: 1``) become ``ignore_index`` where no non-crowd instance covers them. The rest is 0,
    the background.

    Args:
        annotations: COCO annotation dicts with ``category_id`` and ``segmentation``.
        height, width: the image's size.
        class_index: category id -> class index (1..254).
        ignore_index: the value of crowd regions.

    Raises:
        ValueError: an annotation whose category id ``class_index`` lacks.
    """
    out = np.zeros((height, width), np.uint8)
    crowd = np.zeros((height, width), bool)
    claimed = np.zeros((height, width), bool)
    for ann in annotations:
        seen = decode_segmentation(ann["segmentation"], height, width).astype(bool)
        if ann.get("iscrowd", 0):
            crowd |= seen
            continue
        try:
            out[seen] = class_index[ann["category_id"]]
        except KeyError:
            raise ValueError(
                f"annotation id {ann.get('id')}: category_id {short_repr(ann['category_id'])} has no class index "
                f"(known ids: {short_repr(sorted(class_index))}); add the category to the categories"
            ) from None
        claimed |= seen
    out[crowd & ~claimed] = ignore_index  # an instance over a crowd region keeps its class
    return out


# ----------------------------------------------------------------------------------------------------- datasets


def _pair(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
        raise ValueError(f"image_size {short_repr(size)} must be a positive int or (height, width) of positive ints")
    return pair  # type: ignore[return-value]


class SegmentationDataset(Dataset):
    """The common part of the segmentation datasets: resizing, flips, views. Subclasses implement :meth:`load`.

    Args:
        class_names: one name per class index, index 0 the background (at most 255: index 255 is
            :data:`IGNORE_INDEX`).
        image_size: resize every image (bilinear) and its mask (nearest) to ``image_size`` (an int: square) so that
            batches stack; ``None`` keeps the files' sizes.
        hflip: the probability of flipping an image and its mask horizontally (training augmentation; torch's
            global RNG).

    ``dataset[i]`` is ``(image, mask)``: ``image`` float32 ``(C, H, W)`` in [0, 1], ``mask`` int64 ``(H, W)`` with
    values in ``0 .. num_classes - 1`` or :data:`IGNORE_INDEX`.

    Attributes:
        keys: what each item is loaded from (image ids, or file pairs); :meth:`view` selects among them.
        num_classes: ``len(class_names)``, the background included.
        ignore_index: :data:`IGNORE_INDEX`.
    """

    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        class_names: Sequence[str],
        *,
        image_size: int | Sequence[int] | None = None,
        hflip: float = 0.0,
    ) -> None:
        names = [str(n) for n in class_names]
        if not 1 <= len(names) <= MAX_CLASSES:
            raise ValueError(
                f"{len(names)} classes: a segmentation dataset has 1 to {MAX_CLASSES} (indices 0..{MAX_CLASSES - 1}; "
                f"{IGNORE_INDEX} is the ignore index)"
            )
        if not 0.0 <= float(hflip) <= 1.0:
            raise ValueError(f"hflip {hflip!r} is a probability: give a number in [0, 1]")
        self.class_names = names
        self.image_size = _pair(image_size)
        self.hflip = float(hflip)
        self.keys: list[Any] = []

    @property
    def num_classes(self) -> int:
        """The number of classes, the background included."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """Item ``index`` as it is on disk: the image (grey or RGB) and its ``(H, W)`` uint8 class map."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} images")
        pil, mask = self.load(index % len(self))
        if self.image_size is not None and pil.size != self.image_size[::-1]:
            size = self.image_size[::-1]  # PIL: (width, height)
            pil = pil.resize(size, Image.BILINEAR)
            mask = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))
        image = pil_to_tensor(pil).float().div_(255)
        target = torch.from_numpy(mask.astype(np.int64))
        if self.hflip > 0 and float(torch.rand(())) < self.hflip:
            image, target = image.flip(-1), target.flip(-1)
        return image, target

    def view(self, indices: Sequence[int], *, hflip: float | None = None) -> SegmentationDataset:
        """A dataset of the items ``indices`` (positions in this one), with another ``hflip`` if given."""
        out = copy.copy(self)
        out.keys = [self.keys[i] for i in indices]
        if hflip is not None:
            out.hflip = float(hflip)
        return out


class CocoSegmentationDataset(SegmentationDataset):
    """Semantic masks painted from a COCO instances file (:func:`coco_semantic_mask`).

    The file and the images are validated as :class:`~slimmable.data.coco.CocoDetectionDataset` does (every
    annotation needs a ``segmentation``), once, when the dataset is built.

    Args:
        root: the folder the images' ``file_name`` entries are relative to.
        ann_file: the COCO JSON file.
        categories: the COCO categories (``id``, ``name``) that are the classes, index ``i + 1`` for the ``i``-th
            by id (default: the file's own). Give the union of both splits' categories so that train and test number
            the classes alike.
        image_size, hflip: see :class:`SegmentationDataset`.
        channels: convert the images to 1 (grey) or 3 (RGB) channels; ``None`` keeps each file's.

    Attributes:
        coco: the pycocotools index of the file.
        class_index: category id -> class index.
        categories: the categories of the classes, by class index (from 1).

    Raises:
        FileNotFoundError: the annotation file or ``root`` does not exist.
        ValueError: bad COCO data (one line naming the file and the entry), more than 254 categories, or a category
            of the file missing from ``categories`` or named differently there.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        ann_file: str | os.PathLike[str],
        *,
        categories: Sequence[Mapping[str, Any]] | None = None,
        image_size: int | Sequence[int] | None = None,
        hflip: float = 0.0,
        channels: int | None = None,
    ) -> None:
        detection = CocoDetectionDataset(root, ann_file, channels=channels, keypoints=False, masks=True)
        self._setup(detection, categories, image_size, hflip)

    @classmethod
    def from_detection(
        cls,
        detection: CocoDetectionDataset,
        *,
        categories: Sequence[Mapping[str, Any]] | None = None,
        image_size: int | Sequence[int] | None = None,
        hflip: float = 0.0,
    ) -> CocoSegmentationDataset:
        """The class maps of an already validated COCO detection dataset's images (it must have been built with
        masks; its index is shared, nothing is read again)."""
        if not detection.with_masks:
            raise ValueError(
                f"{detection.ann_file}: the detection dataset was built without masks; build it with masks=True"
            )
        out = cls.__new__(cls)
        out._setup(detection, categories, image_size, hflip)
        return out

    def _setup(
        self,
        detection: CocoDetectionDataset,
        categories: Sequence[Mapping[str, Any]] | None,
        image_size: int | Sequence[int] | None,
        hflip: float,
    ) -> None:
        self.detection = detection
        self.ann_file = detection.ann_file
        own = detection.coco.dataset["categories"]
        cats = sorted(own if categories is None else categories, key=lambda c: int(c["id"]))
        if len(cats) > MAX_CLASSES - 1:
            raise ValueError(
                f"{self.ann_file}: {len(cats)} categories, but a segmentation mask holds at most {MAX_CLASSES - 1} "
                f"classes besides the background ({IGNORE_INDEX} is the ignore index); merge categories"
            )
        names = {int(c["id"]): c["name"] for c in cats}
        for c in own:
            if names.get(int(c["id"])) != c["name"]:
                raise ValueError(
                    f"{self.ann_file}: category id {c['id']} ({short_repr(c['name'])}) is not among the classes "
                    f"{short_repr(sorted(names.items()))}; number the categories of both splits alike"
                )
        super().__init__(["background", *(str(c["name"]) for c in cats)], image_size=image_size, hflip=hflip)
        self.categories = [dict(c) for c in cats]
        self.class_index = {int(c["id"]): i + 1 for i, c in enumerate(cats)}
        self.keys = list(detection.ids)

    @property
    def coco(self) -> Any:
        """The pycocotools ``COCO`` index of the annotation file."""
        return self.detection.coco

    @property
    def ids(self) -> list[int]:
        """The COCO image ids of the items, in order."""
        return list(self.keys)

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        image_id = self.keys[index]
        pil = self.detection._load_image(image_id)
        info = self.coco.imgs[image_id]
        anns = self.coco.imgToAnns.get(image_id, [])
        return pil, coco_semantic_mask(anns, int(info["height"]), int(info["width"]), self.class_index)


def _more(stems: Sequence[str]) -> str:
    """`` (also: a, b, ...)`` naming up to 5 stems after the first, or nothing."""
    if len(stems) < 2:
        return ""
    return f" (also: {', '.join(short_repr(s) for s in stems[1:6])}{', ...' if len(stems) > 6 else ''})"


def _header(path: Path, what: str) -> tuple[tuple[int, int], str]:
    """``((width, height), mode)`` of an image file from its header, or a one-line error naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as f:
                size, mode = f.size, f.mode
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(
            f"{what} {path} cannot be read as an image ({type(err).__name__}: {short_repr(str(err))}); replace or "
            "remove it"
        ) from None
    return size, mode


class FolderSegmentationDataset(SegmentationDataset):
    """Images and mask PNGs of the same stem: ``root/images/<stem>.png|jpg|jpeg`` and ``root/masks/<stem>.png``.

    A mask is an 8-bit grey or palette PNG of the image's size whose pixel values are class indices
    (``0 .. num_classes - 1``) or :data:`IGNORE_INDEX`. Everything is checked when the dataset is built: the two
    folders, a mask for every image and an image for every mask (one image per stem), each file's header (readable,
    the same size, a mask mode), and, with ``check_values``, every mask's values. Files in ``images/`` with other
    suffixes are skipped (logged).

    Args:
        root: the folder holding ``images/`` and ``masks/``.
        class_names: one name per class index, index 0 first; or
        num_classes: the number of classes, the background included (names ``background``, ``class1``, ...).
        image_size, hflip: see :class:`SegmentationDataset`.
        channels: convert the images to 1 (grey) or 3 (RGB) channels; ``None`` keeps each file's (grey files one
            channel, others RGB).
        check_values: decode every mask now to check its values (else each is checked when loaded).

    Attributes:
        sizes: ``(width, height)`` of each item's files, in order.
        keys: ``(image path, mask path)`` of each item.

    Raises:
        FileNotFoundError: ``root``, ``images/`` or ``masks/`` missing, or no images.
        ValueError: unpaired or ambiguous files, a mask of another size or mode than allowed, a class index beyond
            the declared classes, an unreadable file; one line naming the file and the fix.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        class_names: Sequence[str] | None = None,
        num_classes: int | None = None,
        image_size: int | Sequence[int] | None = None,
        hflip: float = 0.0,
        channels: int | None = None,
        check_values: bool = True,
    ) -> None:
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1, 3 or None (keep the file's), got {channels!r}")
        if class_names is None:
            if num_classes is None:
                raise ValueError(
                    f"{root}: declare the classes: pass class_names (index 0 first) or num_classes (background "
                    "included)"
                )
            if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
                raise ValueError(f"num_classes {num_classes!r} must be a positive int (the background included)")
            class_names = ["background", *(f"class{i}" for i in range(1, num_classes))]
        elif num_classes is not None and num_classes != len(class_names):
            raise ValueError(f"num_classes {num_classes} disagrees with the {len(class_names)} class_names; give one")
        super().__init__(class_names, image_size=image_size, hflip=hflip)
        self.root = Path(root)
        self.channels = channels
        pairs = self._pairs()
        self._size_of: dict[Path, tuple[int, int]] = {}
        for image, mask in pairs:
            self._size_of[image] = self._check_pair(image, mask)
            if check_values:
                self._check_values(self._read_mask(mask), mask)
        self.keys = pairs

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """``(width, height)`` of each item's files, in order (from their headers)."""
        return [self._size_of[image] for image, _ in self.keys]

    def _pairs(self) -> list[tuple[Path, Path]]:
        layout = "images/<stem>.png|jpg with masks/<stem>.png"
        if not self.root.is_dir():
            raise FileNotFoundError(f"segmentation folder {self.root} does not exist; it holds {layout}")
        folders = {name: self.root / name for name in ("images", "masks")}
        for name, folder in folders.items():
            if not folder.is_dir():
                raise FileNotFoundError(f"segmentation folder {self.root} has no {name}/ folder; it holds {layout}")
        images: dict[str, Path] = {}
        skipped = []
        for path in sorted(folders["images"].iterdir()):
            if path.name.startswith(".") or not path.is_file():
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append(path.name)
                continue
            if path.stem in images:
                raise ValueError(
                    f"{self.root}: images {images[path.stem].name} and {path.name} share the stem {path.stem!r}, so "
                    f"masks/{path.stem}.png would be the mask of both; rename or remove one"
                )
            images[path.stem] = path
        if skipped:
            _logger.warning(
                "%s/images: skipped %d files that are not %s images: %s",
                self.root,
                len(skipped),
                "/".join(s.lstrip(".") for s in IMAGE_SUFFIXES),
                ", ".join(skipped[:5]),
            )
        masks: dict[str, Path] = {}
        for path in sorted(folders["masks"].iterdir()):
            if path.name.startswith(".") or not path.is_file():
                continue
            if path.suffix.lower() != ".png":
                raise ValueError(
                    f"mask {path} is not a PNG; masks must be lossless PNGs of class indices (a JPEG's compression "
                    "changes them): save it as masks/<stem>.png"
                )
            masks[path.stem] = path
        if not images:
            raise FileNotFoundError(f"{folders['images']} holds no .png/.jpg/.jpeg images; it holds {layout}")
        lonely = sorted(set(images) - set(masks))
        if lonely:
            raise ValueError(
                f"{self.root}: {len(lonely)} of {len(images)} images have no mask, e.g. {images[lonely[0]].name} "
                f"has no masks/{lonely[0]}.png{_more(lonely)}; add their masks or remove the images"
            )
        orphans = sorted(set(masks) - set(images))
        if orphans:
            raise ValueError(
                f"{self.root}: {len(orphans)} of {len(masks)} masks have no image, e.g. "
                f"masks/{masks[orphans[0]].name} has no images/{orphans[0]}.png|jpg{_more(orphans)}; add the images "
                "or remove the masks"
            )
        return [(images[s], masks[s]) for s in sorted(images)]

    @staticmethod
    def _check_pair(image: Path, mask: Path) -> tuple[int, int]:
        size, _ = _header(image, "image")
        mask_size, mode = _header(mask, "mask")
        if mode not in _MASK_MODES:
            raise ValueError(
                f"mask {mask} is a {mode} PNG; a mask holds one class index per pixel as 8-bit grey (L) or palette "
                "(P) values: convert it (a colour mask must be mapped to indices first)"
            )
        if mask_size != size:
            raise ValueError(
                f"mask {mask} is {mask_size[0]}x{mask_size[1]} pixels but its image {image} is {size[0]}x{size[1]}; "
                "a mask has its image's size: regenerate or resize it (nearest neighbour)"
            )
        return size

    def _check_values(self, mask: np.ndarray, path: Path, error: type[ValueError] = ValueError) -> None:
        counts = np.bincount(mask.ravel(), minlength=256)
        bad = [v for v in range(self.num_classes, IGNORE_INDEX) if counts[v]]
        if bad:
            raise error(
                f"mask {path} has class indices {short_repr(bad)} but the dataset declares {self.num_classes} classes "
                f"(0..{self.num_classes - 1}, and {IGNORE_INDEX} to ignore); declare more classes (classes.txt or "
                f"num_classes) or set those pixels to {IGNORE_INDEX}"
            )

    @staticmethod
    def _read_mask(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as f:
                if f.mode not in _MASK_MODES:
                    raise ValueError(f"its mode is {f.mode} now, not 8-bit grey or palette")
                return np.array(f)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise _UnreadableImageError(
                f"mask {path} cannot be read ({type(err).__name__}: {short_repr(str(err))}); replace or restore it"
            ) from err

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        image_path, mask_path = self.keys[index]
        try:
            with Image.open(image_path) as f:
                if self.channels is not None:
                    pil = f.convert("L" if self.channels == 1 else "RGB")
                else:
                    pil = f.convert("L") if f.mode in ("L", "1", "I;16", "I", "F") else f.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise _UnreadableImageError(
                f"image {image_path} cannot be read ({type(err).__name__}: {short_repr(str(err))}); replace or "
                "restore it"
            ) from err
        mask = self._read_mask(mask_path)
        if mask.shape != (pil.height, pil.width):
            raise _UnreadableImageError(
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} pixels but its image {image_path} is "
                f"{pil.width}x{pil.height} (a file changed since the dataset was built); regenerate the mask"
            )
        self._check_values(mask, mask_path, _UnreadableImageError)
        return pil, mask


def read_class_names(path: str | os.PathLike[str]) -> list[str]:
    """Class names from a text file, one per line (line ``i`` names class index ``i``; blank lines at the end are
    dropped).

    Raises:
        ValueError: a blank line among the names, or no names.
    """
    lines = Path(path).read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    for i, line in enumerate(lines):
        if not line.strip():
            raise ValueError(f"{path}: line {i + 1} is blank; name every class index 0.. on its own line")
    if not lines:
        raise ValueError(f"{path} names no classes; write one class name per line, index 0 (background) first")
    return [line.strip() for line in lines]


# ------------------------------------------------------------------------------------------------------- splits


@dataclass
class SegmentationSplits:
    """Train / held-out / test splits of a semantic segmentation dataset.

    Attributes:
        train: training images (with ``hflip`` when asked), or ``None`` when not loaded.
        val: held-out training images (no flips), or ``None`` with ``val_size`` 0.
        test: the test images.
        num_classes: classes of the masks, the background (index 0) included; masks also hold
            :data:`IGNORE_INDEX`.
        in_chans: image channels the dataset yields.
        image_size: the side images are resized to (``fmnist_scenes``: the scenes' side; no resizing: the largest
            side of the test images).
        class_names: a name per class index.
        name, root: which dataset, from where.
        ignore_index: :data:`IGNORE_INDEX`.
    """

    train: SegmentationDataset | None
    val: SegmentationDataset | None
    test: SegmentationDataset
    num_classes: int
    in_chans: int
    image_size: int
    class_names: list[str]
    name: str
    root: str
    ignore_index: int = IGNORE_INDEX

    def preprocess(self) -> dict[str, Any]:
        """What serving and evaluation need to know about the images and masks (saved into checkpoints)."""
        return {
            "dataset": self.name,
            "task": "segmentation",
            "image_size": self.image_size,
            "in_chans": self.in_chans,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "ignore_index": self.ignore_index,
        }


def _folder_split(root: Path, split: str) -> Path:
    if split == "train":
        return root / "train"
    test = root / "test"
    return test if test.is_dir() or not (root / "val").is_dir() else root / "val"


def _folder_classes(root: Path, num_classes: int | None) -> list[str] | None:
    listed = root / "classes.txt"
    if listed.is_file():
        names = read_class_names(listed)
        if num_classes is not None and num_classes != len(names):
            raise ValueError(
                f"num_classes {num_classes} disagrees with the {len(names)} classes of {listed}; fix one of them"
            )
        return names
    if num_classes is None:
        raise ValueError(
            f"segmentation folder {root} does not declare its classes: write {listed} (one class name per line, "
            "index 0, the background, first) or set num_classes (the background included)"
        )
    return None


def create_segmentation_datasets(
    dataset: str,
    root: str | os.PathLike[str] | None,
    *,
    image_size: int | None = None,
    hflip: bool = True,
    val_size: int = 0,
    split_seed: int = 0,
    scenes_train: int = 2000,
    scenes_test: int = 200,
    cache_dir: str | os.PathLike[str] | None = None,
    load_train: bool = True,
    channels: int | None = None,
    num_classes: int | None = None,
) -> SegmentationSplits:
    """The splits of ``fmnist_scenes``, ``coco`` or ``folder`` segmentation data (see the module's description).

    Args:
        dataset: ``fmnist_scenes``, ``coco`` or ``folder``.
        root: ``coco``/``folder``: the data folder; ``fmnist_scenes``: the Fashion-MNIST folder the scenes are made
            from (``None``: where Fashion-MNIST is installed).
        image_size: ``fmnist_scenes``: the scenes' side (default 128); ``coco``/``folder``: resize every image and
            mask to ``image_size`` x ``image_size`` (default: keep the files' sizes; batches then stack only when
            they share one).
        hflip: flip training images and their masks horizontally with probability 0.5.
        val_size: training images held out for best-checkpoint selection (the last ones of a ``split_seed``
            permutation; for the scenes the same images as :func:`~slimmable.data.detection.create_detection_datasets`
            holds out).
        split_seed: seed of the held-out choice, and of the scenes' generation.
        scenes_train, scenes_test: ``fmnist_scenes``: how many scenes each split has.
        cache_dir: where generated scenes are kept (default ``~/.cache/slimmable``; shared with the detection data).
        load_train: also build the training (and held-out) split.
        channels: convert images to 1 or 3 channels (default: 1 for the grey scenes; 3 for ``coco``/``folder``, so
            that grey and colour files stack).
        num_classes: ``folder``: the number of classes, the background included, when ``root`` has no
            ``classes.txt`` (with one: must agree with it).

    Raises:
        FileNotFoundError: missing data (the message names what is expected).
        ValueError: an unknown dataset, bad data (named), an empty split, splits that name a category id
            differently, or ``val_size`` negative or leaving no training images.
    """
    from .datasets import default_cache_dir
    from .detection import _coco_files, _holdout_positions, _merge_categories, _scenes

    if dataset not in SEGMENTATION_DATASETS:
        raise ValueError(f"{dataset!r} is not a segmentation dataset; use one of {', '.join(SEGMENTATION_DATASETS)}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    if dataset != "fmnist_scenes" and root is None:
        raise ValueError(f"segmentation dataset {dataset} needs data.root: the folder holding its train and test data")
    resize = None if dataset == "fmnist_scenes" else image_size
    full: SegmentationDataset | None = None
    if dataset == "folder":
        base = Path(root)  # type: ignore[arg-type]
        names = _folder_classes(base, num_classes)
        kw: dict[str, Any] = dict(class_names=names, num_classes=num_classes, image_size=resize)
        folder_test = FolderSegmentationDataset(_folder_split(base, "test"), channels=channels or 3, **kw)
        test: SegmentationDataset = folder_test
        if load_train:
            full = FolderSegmentationDataset(_folder_split(base, "train"), channels=channels or 3, **kw)
        sizes = [max(s) for s in folder_test.sizes]
        where = str(base)
    else:
        if dataset == "fmnist_scenes":
            side = image_size or 128
            cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
            src = None if root is None else str(root)
            test_files = _scenes(cache, "test", scenes_test, split_seed, side, src)
            train_files = _scenes(cache, "train", scenes_train, split_seed, side, src) if load_train else None
            where, chans = str(cache / "fmnist_scenes"), channels or 1
        else:
            train_files, test_files = _coco_files(Path(root))  # type: ignore[arg-type]
            train_files = train_files if load_train else None
            where, chans = str(root), channels or 3
        test_det = CocoDetectionDataset(*test_files, channels=chans, keypoints=False, masks=True)
        cats = {int(c["id"]): dict(c) for c in test_det.coco.dataset["categories"]}
        train_det = None
        if train_files is not None:
            train_det = CocoDetectionDataset(*train_files, channels=chans, keypoints=False, masks=True)
            _merge_categories(train_det, test_det, cats)
        categories = [cats[i] for i in sorted(cats)]
        test = CocoSegmentationDataset.from_detection(test_det, categories=categories, image_size=resize)
        if train_det is not None:
            full = CocoSegmentationDataset.from_detection(train_det, categories=categories, image_size=resize)
        sizes = [max(int(i["width"]), int(i["height"])) for i in test_det.coco.dataset["images"]]
    if not len(test):
        raise ValueError(f"the test split of {where} has no images; it is what the final report scores")
    train = val = None
    if full is not None:
        if not len(full):
            raise ValueError(f"the training split of {where} has no images")
        kept, held = _holdout_positions(len(full), val_size, split_seed)
        train = full.view(kept, hflip=0.5 if hflip else 0.0)
        val = full.view(held, hflip=0.0) if held else None
    image, _ = test[0]
    return SegmentationSplits(
        train=train,
        val=val,
        test=test,
        num_classes=test.num_classes,
        in_chans=int(image.shape[0]),
        image_size=image_size or max(sizes),
        class_names=list(test.class_names),
        name=dataset,
        root=where,
    )
