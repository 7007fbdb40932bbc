"""The splits of a detection dataset for a training run: Fashion-MNIST scenes (generated once, then cached) or
COCO-format data from a folder.

The held-out ``val`` split (best-checkpoint selection) comes out of the training images, so the test split stays
unseen until the final report. Splits are views of one validated :class:`~slimmable.data.coco.CocoDetectionDataset`
restricted to image ids, so COCOeval scores each split against exactly its images.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._utils import short_repr
from .coco import CocoDetectionDataset

__all__ = ["DetectionSplits", "create_detection_datasets", "scenes_folder"]

_logger = logging.getLogger(__name__)

#: bump when :func:`slimmable.data.scenes.make_scenes` changes what it writes for the same arguments
_SCENES_VERSION = 1


@dataclass
class DetectionSplits:
    """Train / held-out / test splits of a COCO-format detection dataset.

    Attributes:
        train: training images (with ``hflip`` when asked), or ``None`` when not loaded.
        val: held-out training images (no flips), or ``None`` with ``val_size`` 0.
        test: the test images.
        num_classes: the detector's classes: the largest category id of either split plus the background (0).
        num_keypoints: keypoints per object (0: none declared).
        in_chans: image channels the dataset yields.
        image_size: the scenes' side (the largest image side for other data).
        categories: the COCO categories of both splits (names for reports and serving).
        name, root: which dataset, from where.
    """

    train: CocoDetectionDataset | None
    val: CocoDetectionDataset | None
    test: CocoDetectionDataset
    num_classes: int
    num_keypoints: int
    in_chans: int
    image_size: int
    categories: list[dict[str, Any]]
    name: str
    root: str

    def preprocess(self) -> dict[str, Any]:
        """What serving and evaluation need to know about the images (saved into checkpoints); a detector
        normalises and resizes its inputs itself."""
        return {
            "dataset": self.name,
            "task": "detection",
            "image_size": self.image_size,
            "in_chans": self.in_chans,
            "num_classes": self.num_classes,
            "num_keypoints": self.num_keypoints,
            "categories": [{"id": int(c["id"]), "name": str(c["name"])} for c in self.categories],
        }


def scenes_folder(cache_dir: str | os.PathLike[str], split: str, num_images: int, seed: int, image_size: int) -> Path:
    """Where :func:`create_detection_datasets` keeps the Fashion-MNIST scenes of these arguments."""
    key = json.dumps([_SCENES_VERSION, split, num_images, seed, image_size]).encode()
    tag = hashlib.sha256(key).hexdigest()[:10]
    return Path(cache_dir) / "fmnist_scenes" / f"{split}-{num_images}-s{seed}-{image_size}px-{tag}"


def _scenes(
    cache_dir: Path, split: str, num_images: int, seed: int, image_size: int, root: str | None
) -> tuple[Path, Path]:
    from .scenes import make_scenes

    folder = scenes_folder(cache_dir, split, num_images, seed, image_size)
    ann = folder / "annotations.json"
    if not ann.is_file():  # make_scenes writes the JSON last, atomically: its presence means complete
        with _generation_lock(folder):
            if not ann.is_file():  # another process (a torchrun rank, a second run) may have made them meanwhile
                _logger.info("generating %d Fashion-MNIST scenes (%s) into %s", num_images, split, folder)
                make_scenes(folder, split, num_images, seed, image_size=image_size, root=root)
    return folder, ann


@contextlib.contextmanager
def _generation_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` beside ``folder`` while its scenes are generated. Without it two processes sharing a
    cache (the ranks of a torchrun job) both generated the scenes, and one read images the other was rewriting
    (a truncated PNG). The others wait, then find the scenes complete. Without ``fcntl`` (Windows): no lock."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(folder.parent / f".{folder.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _coco_files(root: Path) -> tuple[tuple[Path, Path], tuple[Path, Path]]:
    """``(images folder, annotation file)`` of the train and test splits of a COCO-format folder."""
    official = root / "annotations" / "instances_train2017.json"
    if official.is_file():
        return (root / "train2017", official), (root / "val2017", root / "annotations" / "instances_val2017.json")
    mine = root / "train" / "annotations.json"
    if mine.is_file():
        return (root / "train", mine), (root / "test", root / "test" / "annotations.json")
    raise FileNotFoundError(
        f"{root} is not a COCO-format folder: expected annotations/instances_train2017.json (+ train2017/, val2017/) "
        "or train/annotations.json and test/annotations.json beside the images they name"
    )


def _holdout_positions(n: int, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    """``(kept, held)``: positions ``0..n-1`` of a training split, ``held`` the last ``val_size`` of a ``seed``
    permutation (for best-checkpoint selection), both sorted.

    Raises:
        ValueError: ``val_size`` negative or leaving no training images.
    """
    if val_size < 0:
        raise ValueError(f"data.val_size {val_size} is negative; give the number of training images to hold out")
    if val_size >= n:
        raise ValueError(f"data.val_size {val_size} leaves none of the {n} training images to train on")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = sorted(order[n - val_size :]) if val_size else []
    kept = sorted(set(range(n)) - set(held))
    return kept, held


def _restricted(dataset: CocoDetectionDataset, ids: list[int], hflip: float) -> CocoDetectionDataset:
    view = copy.copy(dataset)
    view.ids = list(ids)
    view.hflip = hflip
    return view


def _merge_categories(
    train: CocoDetectionDataset, test: CocoDetectionDataset, categories: dict[int, dict[str, Any]]
) -> None:
    """Add the training split's categories to the test split's (``categories``, by id): a model needs an output
    for every label it trains on, also one the test split never names. Refuse splits that give one id two names."""
    for c in train.coco.dataset["categories"]:
        known = categories.setdefault(int(c["id"]), dict(c))
        if known["name"] != c["name"]:
            raise ValueError(
                f"category id {c['id']} is {short_repr(c['name'])} in {train.ann_file} but {short_repr(known['name'])} "
                f"in {test.ann_file}; number the categories of both splits alike"
            )


def _check_splits_agree(
    train: CocoDetectionDataset, test: CocoDetectionDataset, categories: dict[int, dict[str, Any]]
) -> None:
    """:func:`_merge_categories`, and refuse splits that declare different keypoint counts (the keypoint head has
    one size)."""
    _merge_categories(train, test, categories)
    if train.num_keypoints != test.num_keypoints:
        raise ValueError(
            f"{train.ann_file} declares {train.num_keypoints} keypoints per object but {test.ann_file} "
            f"{test.num_keypoints}; both splits need the same keypoints"
        )


def create_detection_datasets(
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
) -> DetectionSplits:
    """The splits of ``fmnist_scenes`` or ``coco`` data.

    Args:
        dataset: ``fmnist_scenes`` or ``coco``.
        root: ``coco``: the data folder (see :class:`~slimmable.config.DataConfig`); ``fmnist_scenes``: the
            Fashion-MNIST folder the scenes are made from (``None``: where Fashion-MNIST is installed).
        image_size: ``fmnist_scenes``: the scenes' side (default 128).
        hflip: flip training images horizontally with probability 0.5 (with their boxes, masks and keypoints).
        val_size: training images held out for best-checkpoint selection (the last ones of a ``split_seed``
            permutation).
        split_seed: seed of the held-out choice, and of the scenes' generation.
        scenes_train, scenes_test: ``fmnist_scenes``: how many scenes each split has.
        cache_dir: where generated scenes are kept (default ``~/.cache/slimmable``).
        load_train: also build the training (and held-out) split.

    Raises:
        FileNotFoundError: missing data (the message names what is expected).
        ValueError: unknown dataset, a bad annotation (named), an empty split, splits that name a category id
            differently or declare different keypoint counts, or ``val_size`` negative or leaving no training
            images.
    """
    from .datasets import default_cache_dir

    if dataset == "fmnist_scenes":
        size = image_size or 128
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        src = None if root is None else str(root)
        test_files = _scenes(cache, "test", scenes_test, split_seed, size, src)
        train_files = _scenes(cache, "train", scenes_train, split_seed, size, src) if load_train else None
        where = str(cache / "fmnist_scenes")
    elif dataset == "coco":
        if root is None:
            raise ValueError("data.dataset coco needs data.root: the COCO-format folder")
        train_files, test_files = _coco_files(Path(root))
        train_files = train_files if load_train else None
        where = str(root)
    else:
        raise ValueError(f"{dataset!r} is not a detection dataset; use fmnist_scenes or coco")
    test = CocoDetectionDataset(*test_files)
    if not test.ids:
        raise ValueError(f"the test split {test.ann_file} has no images; it is what the final report scores")
    train = val = None
    cats = {int(c["id"]): dict(c) for c in test.coco.dataset["categories"]}
    if train_files is not None:
        full = CocoDetectionDataset(*train_files)
        if not full.ids:
            raise ValueError(f"the training split {full.ann_file} has no images")
        _check_splits_agree(full, test, cats)
        kept, held = _holdout_positions(len(full), val_size, split_seed)
        train = _restricted(full, [full.ids[i] for i in kept], 0.5 if hflip else 0.0)
        val = _restricted(full, [full.ids[i] for i in held], 0.0) if held else None
    sizes = [max(int(i["width"]), int(i["height"])) for i in test.coco.dataset["images"]]
    image, _ = test[0]
    return DetectionSplits(
        train=train,
        val=val,
        test=test,
        num_classes=max(cats, default=0) + 1,
        num_keypoints=test.num_keypoints,
        in_chans=int(image.shape[0]),
        image_size=image_size or max(sizes),
        categories=[cats[i] for i in sorted(cats)],
        name=dataset,
        root=where,
    )
