"""Data: Fashion-MNIST, CIFAR-10/100 and ImageNet-style folders; transforms; ``create_loader``."""

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

__all__ = [
    "DATASETS",
    "FASHION_MNIST_SYSTEM_DIR",
    "DatasetSplits",
    "Lighting",
    "ShardedSampler",
    "TensorImageDataset",
    "create_datasets",
    "create_loader",
    "crop_flip_batch",
    "default_cache_dir",
    "imagenet_eval_transform",
    "imagenet_train_transform",
    "load_cifar",
    "load_fashion_mnist",
    "load_image_folder",
]
