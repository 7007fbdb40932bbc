"""Small datasets written in the real on-disk formats, for tests: Fashion-MNIST IDX, CIFAR pickles, JPEG folders.

Images of class ``k`` carry a bright block at a class-dependent place, so a tiny model learns them in a few steps.
Importable from any test module because ``tests/`` (the root conftest's folder) is on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import pickle
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image


def class_images(n: int, size: int, channels: int, num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(images (n, size, size, channels) uint8, labels (n,) int)``, learnable from the block position."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, size, size, channels), dtype=np.uint8)
    block = max(2, size // 4)
    for i, k in enumerate(labels):
        r, c = (k % 16) // 4 * block, (k % 4) * block  # one cell of a 4x4 grid per class
        images[i, r : r + block, c : c + block, :] = 230
    return images, labels


def _idx_images(images: np.ndarray) -> bytes:
    n, h, w = images.shape
    return struct.pack(">IIII", 0x0803, n, h, w) + images.astype(np.uint8).tobytes()


def _idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 0x0801, len(labels)) + labels.astype(np.uint8).tobytes()


def write_fashion_mnist(
    folder: Path, n_train: int = 96, n_test: int = 48, size: int = 28, compress: bool = True, bad_label: bool = False
) -> Path:
    """The four Fashion-MNIST IDX files (gzip by default), with ``n_train`` / ``n_test`` images."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = class_images(n, size, 1, 10, seed)
        if bad_label and split == "train":
            labels[3] = 12
        files = {
            f"{split}-images-idx3-ubyte": _idx_images(images[..., 0]),
            f"{split}-labels-idx1-ubyte": _idx_labels(labels),
        }
        for name, data in files.items():
            if compress:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return folder


def write_cifar(
    root: Path, num_classes: int = 10, per_batch: int = 10, n_test: int = 20, bad_label: bool = False
) -> Path:
    """A CIFAR-10 (5 training batches) or CIFAR-100 (one ``train`` file) python-pickle folder under ``root``."""
    if num_classes == 10:
        folder = root / "cifar-10-batches-py"
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_file, meta_file, label_key, names_key = "test_batch", "batches.meta", "labels", "label_names"
    else:
        folder = root / "cifar-100-python"
        train_files = ["train"]
        test_file, meta_file, label_key, names_key = "test", "meta", "fine_labels", "fine_label_names"
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate([*train_files, test_file]):
        n = n_test if name == test_file else per_batch
        images, labels = class_images(n, 32, 3, num_classes, seed=i)
        labels = [int(v) for v in labels]
        if bad_label and name == train_files[0]:
            labels[0] = num_classes + 5
        entry = {"data": images.transpose(0, 3, 1, 2).reshape(n, -1), label_key: labels}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / meta_file, "wb") as f:
        pickle.dump({names_key: [f"class{k}" for k in range(num_classes)]}, f)
    return root


def write_image_folder(
    root: Path, classes: Sequence[str] = ("ant", "bee", "cat"), n_train: int = 4, n_val: int = 2, size: int = 24
) -> Path:
    """``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``."""
    for split, n, seed in (("train", n_train, 0), ("val", n_val, 1)):
        images, _ = class_images(n * len(classes), size, 3, len(classes), seed)
        for k, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(images[k * n + i]).save(d / f"{i}.jpg", quality=90)
    return root


def write_recipe(path: Path, sections: dict) -> Path:
    """Write a recipe YAML."""
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def tiny_recipe(fmnist_dir: Path, **overrides: dict) -> dict:
    """A recipe that trains slim_resnet18 at widths 0.125/0.25 on 16x16 fake Fashion-MNIST in seconds."""
    sections = {
        "model": {"name": "slim_resnet18", "widths": [0.125, 0.25], "small_input": True},
        "data": {
            "dataset": "fashion_mnist",
            "root": str(fmnist_dir),
            "download": False,
            "image_size": 16,
            "augment": "crop_flip",
            "crop_padding": 2,
            "val_size": 16,
            "batch_size": 16,
        },
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "schedule": "cosine"},
        # explicit numerics: runs compared with each other must not depend on a timing probe
        "train": {"epochs": 2, "seed": 3, "log_interval": 1, "amp": "off", "channels_last": False},
    }
    for sec, vals in overrides.items():
        sections[sec] = {**sections.get(sec, {}), **vals}
    return sections


def tiny_detection_recipe(fmnist_dir: Path, **train: object) -> dict:
    """A recipe that trains slim_maskrcnn_resnet18_fpn at widths 0.5/1.0 on 20 scenes of fake Fashion-MNIST."""
    return {
        "model": {
            "name": "slim_maskrcnn_resnet18_fpn",
            "widths": [0.5, 1.0],
            "options": {"rpn_batch_size_per_image": 32, "box_batch_size_per_image": 32},
        },
        "data": {
            "dataset": "fmnist_scenes",
            "root": str(fmnist_dir),
            "augment": "none",
            "scenes_train": 20,
            "scenes_test": 6,
            "val_size": 6,
            "batch_size": 4,
        },
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "grad_clip": 35.0},
        "train": {"epochs": 2, "seed": 0, "amp": "off", "channels_last": False, **train},
    }


def tiny_segmentation_recipe(fmnist_dir: Path, model: str = "slim_lraspp_mobilenet_v2", **train: object) -> dict:
    """A recipe that trains a segmenter at widths 0.5/1.0 on 20 scenes (64 px) of fake Fashion-MNIST."""
    return {
        "model": {"name": model, "widths": [0.5, 1.0], "num_classes": 11},
        "data": {
            "dataset": "fmnist_scenes",
            "root": str(fmnist_dir),
            "augment": "none",
            "image_size": 64,
            "scenes_train": 20,
            "scenes_test": 6,
            "val_size": 6,
            "batch_size": 4,
        },
        "optim": {"name": "adamw", "lr": 2e-3, "weight_decay": 1e-4},
        "train": {"epochs": 2, "seed": 0, "amp": "off", "channels_last": False, **train},
    }


class _RunsCode:
    """A pickle payload whose ``__reduce__`` calls ``os.mkdir(marker)`` when unpickled with plain ``pickle``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def write_malicious_cifar(root: Path, marker: Path) -> Path:
    """A CIFAR-10 folder whose first training batch and test batch run ``os.mkdir(marker)`` under plain pickle."""
    write_cifar(root, 10, per_batch=2, n_test=2)
    for name in ("data_batch_1", "test_batch"):
        with open(root / "cifar-10-batches-py" / name, "wb") as f:
            pickle.dump({"data": _RunsCode(marker), "labels": [0, 1]}, f)
    return root


@contextlib.contextmanager
def sigterm_during_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int) -> Iterator[None]:
    """Within the block a training run gets SIGTERM right after seeding epoch ``epoch`` (0-based), so it stops after
    that epoch's first step; on leaving, runs are seeded normally again."""
    import signal

    from slimmable.train import run as run_module

    seed_epoch = run_module._seed_epoch

    def seed_and_signal(seed: int, e: int, rank: int) -> None:
        seed_epoch(seed, e, rank)
        if e == epoch:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(run_module, "_seed_epoch", seed_and_signal)
    try:
        yield
    finally:
        monkeypatch.setattr(run_module, "_seed_epoch", seed_epoch)


def segmentation_pair(height: int, width: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(image (H, W, 3) uint8, mask (H, W) uint8)``: rectangles of classes ``1..num_classes-1`` on background 0,
    a 255 (ignore) border on the rectangles' left edge; each class has its own grey level in the image."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), np.uint8)
    for _ in range(3):
        k = int(rng.integers(1, num_classes))
        y0, x0 = int(rng.integers(0, height - 4)), int(rng.integers(0, width - 4))
        h, w = int(rng.integers(3, height - y0 + 1)), int(rng.integers(3, width - x0 + 1))
        mask[y0 : y0 + h, x0 : x0 + w] = k
        mask[y0 : y0 + h, x0] = 255
    image = np.repeat((mask.astype(np.int32) * 40 % 256).astype(np.uint8)[..., None], 3, axis=2)
    return image, mask


def write_segmentation_folder(
    root: Path,
    num_classes: int = 4,
    n_train: int = 6,
    n_test: int = 3,
    size: tuple[int, int] = (20, 24),
    classes_file: bool = True,
) -> Path:
    """``root/{train,test}/images/NNN.png`` (RGB) and ``masks/NNN.png`` (8-bit grey class indices), and
    ``root/classes.txt`` (``background``, ``c1``, ...) unless ``classes_file`` is false."""
    for split, n, offset in (("train", n_train, 0), ("test", n_test, 1000)):
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, mask = segmentation_pair(*size, num_classes, seed=offset + i)
            Image.fromarray(image, "RGB").save(root / split / "images" / f"{i:03d}.png")
            Image.fromarray(mask, "L").save(root / split / "masks" / f"{i:03d}.png")
    if classes_file:
        (root / "classes.txt").write_text("\n".join(["background", *(f"c{k}" for k in range(1, num_classes))]) + "\n")
    return root


def served_classifier(widths: Sequence[float]):
    """A small slimmable classifier (slim MobileNet v1, 10 classes, small input) at ``widths`` with random,
    non-trivial BN statistics, in eval mode: what the serving-engine tests (Ray, Triton) serve."""
    import torch

    import slimmable

    model = slimmable.create_model("slim_mobilenet_v1", num_classes=10, small_input=True, widths=widths)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1.0 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()
