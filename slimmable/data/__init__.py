"""Data: Fashion-MNIST, CIFAR-10/100 and ImageNet-style folders; transforms; ``create_loader``; semantic
segmentation data (:mod:`slimmable.data.segmentation`, imported on first use: it needs pycocotools)."""

from typing import Any

from .datasets import (
    DATASETS,
    FASHION_MNIST_SYSTEM_DIR,
    DatasetSplits,
    TensorImageDataset,
    create_datasets,
    default_cache_dir,
    load_cifar,
    load_fashion_mnist,
    load_image_folder,
)
from .loader import ShardedSampler, create_loader
from .transforms import Lighting, crop_flip_batch, imagenet_eval_transform, imagenet_train_transform

#: names of :mod:`slimmable.data.segmentation`, imported when first used
_SEGMENTATION = (
    "IGNORE_INDEX",
    "CocoSegmentationDataset",
    "FolderSegmentationDataset",
    "SegmentationDataset",
    "SegmentationSplits",
    "create_segmentation_datasets",
)


def __getattr__(name: str) -> Any:
    if name in _SEGMENTATION:
        from . import segmentation

        return getattr(segmentation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DATASETS",
    "FASHION_MNIST_SYSTEM_DIR",
    "IGNORE_INDEX",
    "CocoSegmentationDataset",
    "DatasetSplits",
    "FolderSegmentationDataset",
    "Lighting",
    "SegmentationDataset",
    "SegmentationSplits",
    "ShardedSampler",
    "TensorImageDataset",
    "create_datasets",
    "create_loader",
    "create_segmentation_datasets",
    "crop_flip_batch",
    "default_cache_dir",
    "imagenet_eval_transform",
    "imagenet_train_transform",
    "load_cifar",
    "load_fashion_mnist",
    "load_image_folder",
]
