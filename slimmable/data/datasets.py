"""Datasets: Fashion-MNIST (IDX files), CIFAR-10/100 (python pickles), ImageNet-style folders.

Small datasets are held in memory as ``uint8`` tensors in a :class:`TensorImageDataset`, which builds a whole batch
with one indexing operation. Folders use torchvision's ``ImageFolder``. Files are read with torchvision's readers,
CIFAR batches with a restricted unpickler that never runs code; bad data (a missing or empty folder, an unreadable
image, a label out of range, a pickle that refers to code) raises an error naming the path and the problem, never
skipped silently.
"""

from __future__ import annotations

import copy
import gzip
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision.datasets.mnist import read_image_file, read_label_file

from ._safe_pickle import UnsafePickleError, safe_load_pickle
from .transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    crop_flip_batch,
    imagenet_eval_transform,
    imagenet_train_transform,
)

__all__ = [
    "DATASETS",
    "FASHION_MNIST_SYSTEM_DIR",
    "DatasetSplits",
    "TensorImageDataset",
    "create_datasets",
    "default_cache_dir",
    "load_cifar",
    "load_fashion_mnist",
    "load_image_folder",
]

_logger = logging.getLogger(__name__)

#: where Debian's ``dataset-fashion-mnist`` package installs the IDX files
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DATASETS = ("fashion_mnist", "cifar10", "cifar100", "image_folder")


def default_cache_dir() -> Path:
    """``$SLIMMABLE_CACHE_DIR``, else ``~/.cache/slimmable``: downloaded data go here."""
    env = os.environ.get("SLIMMABLE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "slimmable"


class TensorImageDataset(Dataset):
    """Images held in memory as ``uint8``; a batch is built in one indexing operation, augmented as a batch.

    ``dataset[i]`` gives one ``(image, label)``; ``dataset.__getitems__(indices)`` (used by ``DataLoader`` for
    batched fetching, see :func:`slimmable.data.create_loader`) gives a whole batch ``(images, labels)``.

    Args:
        images: ``(N, C, H, W)`` uint8.
        labels: ``(N,)`` int64.
        mean, std: per-channel normalisation (of images scaled to [0, 1]).
        augment: ``crop_flip`` (random crop with ``padding`` + flips) or ``none``.
        padding: crop padding in pixels.
        hflip: random horizontal flips (with ``crop_flip``).
        image_size: resize to this side after augmentation (``None``: keep).
        indices: the subset of rows this view uses (``None``: all).
        source: where the data came from, for messages.

    Shape:
        batch ``(B, C, S, S)`` float32, labels ``(B,)`` int64.
    """

    batched_fetch = True

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        augment: str = "none",
        padding: int = 4,
        hflip: bool = True,
        image_size: int | None = None,
        indices: torch.Tensor | None = None,
        source: str = "tensors",
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"{source}: images must be (N, C, H, W) uint8, got {images.dtype} {tuple(images.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"{source}: {images.shape[0]} images but labels of shape {tuple(labels.shape)}; the files do not match"
            )
        if augment not in ("crop_flip", "none"):
            raise ValueError(f"augment {augment!r} is not available for in-memory images; use crop_flip or none")
        self.images, self.labels = images, labels.long()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        if self.mean.shape[1] != images.shape[1]:
            raise ValueError(f"{source}: {images.shape[1]} channels but mean/std of length {self.mean.shape[1]}")
        self.augment, self.padding, self.hflip = augment, padding, hflip
        self.image_size = image_size
        self.indices = indices
        self.source = source

    def __len__(self) -> int:
        return int(self.images.shape[0] if self.indices is None else self.indices.shape[0])

    @property
    def targets(self) -> torch.Tensor:
        """Labels of this view."""
        return self.labels if self.indices is None else self.labels[self.indices]

    def view(self, indices: torch.Tensor | None = None, augment: str | None = None) -> TensorImageDataset:
        """A view of some rows (indices into this view) sharing the memory, optionally with another augment."""
        out = copy.copy(self)
        if indices is not None:
            indices = torch.as_tensor(indices, dtype=torch.long)
            out.indices = indices if self.indices is None else self.indices[indices]
        if augment is not None:
            if augment not in ("crop_flip", "none"):
                raise ValueError(f"augment {augment!r} is not available for in-memory images; use crop_flip or none")
            out.augment = augment
        return out

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        if self.indices is not None:
            idx = self.indices[idx]
        x = self.images[idx]
        if self.augment == "crop_flip":
            x = crop_flip_batch(x, self.padding, self.hflip)
        x = x.float().div_(255)
        if self.image_size is not None and self.image_size != x.shape[-1]:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        x = (x - self.mean) / self.std
        return x, self.labels[idx]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, y = self.__getitems__([index])
        return x[0], int(y[0])


@dataclass
class DatasetSplits:
    """The splits of a dataset and what a model and an exporter need to know about its images.

    Attributes:
        train: training split (minus the held-out images); ``None`` when not loaded.
        val: held-out validation images (from the training set, evaluation transform), or ``None``.
        test: the test split (Fashion-MNIST/CIFAR test set, ImageNet ``val/``).
        num_classes, in_chans, image_size: of the images.
        mean, std: normalisation.
        eval_resize: folders: the evaluation resize before the center crop.
        name, root: which dataset, from where.
    """

    train: Dataset | None
    val: Dataset | None
    test: Dataset
    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    root: str
    eval_resize: int | None = None

    def preprocess(self) -> dict[str, Any]:
        """How to turn an image into a model input (saved into checkpoints for export and serving)."""
        return {
            "dataset": self.name,
            "image_size": self.image_size,
            "eval_resize": self.eval_resize,
            "in_chans": self.in_chans,
            "mean": list(self.mean),
            "std": list(self.std),
            "num_classes": self.num_classes,
        }


# ----------------------------------------------------------------------------------------------- Fashion-MNIST


def _find_idx(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path, reader: Any) -> torch.Tensor:
    """Read an IDX file with torchvision's ``reader``; a ``.gz`` file is decompressed to a temporary file first."""
    if path.suffix != ".gz":
        return reader(str(path))
    with tempfile.TemporaryDirectory(prefix="slimmable-idx-") as tmp:
        raw = Path(tmp) / path.stem
        try:
            with gzip.open(path, "rb") as src, open(raw, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except (OSError, EOFError) as err:
            raise ValueError(
                f"Fashion-MNIST file {path} is not a readable gzip file ({err}); re-install or re-download it"
            ) from err
        return reader(str(raw))


def _fmnist_error(system_dir: Path, cache_dir: Path, download_error: str | None) -> FileNotFoundError:
    names = ", ".join(f"{n}.gz" for pair in _FMNIST_FILES.values() for n in pair)
    why = f" (download failed: {download_error})" if download_error else " (download is off: data.download=false)"
    return FileNotFoundError(
        "Fashion-MNIST was not found. Get it in one of three ways:\n"
        f"  1. install Debian's package: apt-get install dataset-fashion-mnist (it puts the files in {system_dir})\n"
        f"  2. give a folder holding {names} (or the same without .gz): --set data.root=DIR\n"
        f"  3. be online with data.download=true, so torchvision downloads it to {cache_dir}{why}"
    )


def _fmnist_folder(root: str | os.PathLike[str] | None, system_dir: Path, cache_dir: Path, download: bool) -> Path:
    needed = [n for pair in _FMNIST_FILES.values() for n in pair]
    if root is not None:
        folder = Path(root)
        if not folder.is_dir():
            raise FileNotFoundError(f"Fashion-MNIST folder {folder} (data.root) does not exist; check the path")
        missing = [n for n in needed if _find_idx(folder, n) is None]
        if missing:
            raise FileNotFoundError(
                f"Fashion-MNIST folder {folder} (data.root) lacks {', '.join(missing)} (.gz or uncompressed); "
                f"it holds {sorted(p.name for p in folder.iterdir())[:10]}"
            )
        return folder
    if system_dir.is_dir() and all(_find_idx(system_dir, n) for n in needed):
        return system_dir
    downloaded = cache_dir / "FashionMNIST" / "raw"
    if all(_find_idx(downloaded, n) for n in needed):
        return downloaded
    if not download:
        raise _fmnist_error(system_dir, cache_dir, None)
    _logger.info("Fashion-MNIST not found in %s; downloading it with torchvision to %s", system_dir, cache_dir)
    try:
        for train in (True, False):
            tv_datasets.FashionMNIST(str(cache_dir), train=train, download=True)
    except Exception as err:  # any network failure: report all three ways to get the data
        raise _fmnist_error(system_dir, cache_dir, f"{type(err).__name__}: {str(err)[:200]}") from err
    return downloaded


def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None,
    split: str = "train",
    *,
    download: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    system_dir: str | os.PathLike[str] = FASHION_MNIST_SYSTEM_DIR,
) -> tuple[torch.Tensor, torch.Tensor, Path]:
    """Read Fashion-MNIST IDX files (gzip or not) with torchvision's reader.

    The files are looked up in ``root`` if given, else in ``system_dir`` (Debian's ``dataset-fashion-mnist``),
    else in the download cache, else downloaded by torchvision when ``download``.

    Args:
        root: a folder with ``train-images-idx3-ubyte(.gz)`` and the three other files.
        split: ``train`` (60,000 images) or ``test`` (10,000).
        download: allow a torchvision download as the last resort.
        cache_dir: where torchvision downloads go (default :func:`default_cache_dir`).
        system_dir: the system-wide folder to try.

    Returns:
        ``(images (N, 1, 28, 28) uint8, labels (N,) int64, folder)``.

    Raises:
        FileNotFoundError: the files are nowhere; the message lists the three ways to get them.
        ValueError: a file is corrupt, or images and labels disagree, or a label is outside 0..9.
    """
    if split not in _FMNIST_FILES:
        raise ValueError(f"Fashion-MNIST split {split!r} is not one of train, test")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = _fmnist_folder(root, Path(system_dir), cache, download)
    img_name, lbl_name = _FMNIST_FILES[split]
    img_path, lbl_path = _find_idx(folder, img_name), _find_idx(folder, lbl_name)
    assert img_path is not None and lbl_path is not None
    tensors = []
    for path, reader in ((img_path, read_image_file), (lbl_path, read_label_file)):
        try:
            tensors.append(_read_idx(path, reader))
        except (AssertionError, RuntimeError, ValueError, OSError) as err:
            if isinstance(err, ValueError) and "gzip" in str(err):
                raise
            raise ValueError(
                f"Fashion-MNIST file {path} is not a valid IDX file ({err}); re-install or re-download"
            ) from err
    images, labels = tensors
    if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Fashion-MNIST files {img_path} ({tuple(images.shape)}) and {lbl_path} ({tuple(labels.shape)}) "
            "do not match: expected N images of 28x28 and N labels"
        )
    _check_labels(labels, 10, str(lbl_path))
    return images.unsqueeze(1).contiguous(), labels.long(), folder


def _check_labels(labels: torch.Tensor, num_classes: int, source: str) -> None:
    if labels.numel() == 0:
        raise ValueError(f"{source} holds no labels: the dataset is empty")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"{source}: label {bad} is out of range 0..{num_classes - 1}; the file is corrupt or not this dataset"
        )


# ----------------------------------------------------------------------------------------------------- CIFAR


def _presence_only(base: type) -> type:
    # torchvision checks the md5 sums of the official archives; a folder the user built (or a test made) is
    # accepted when the files exist, and every value is validated after loading.
    return type(
        f"_{base.__name__}Files",
        (base,),
        {
            "train_list": [[name, None] for name, _ in base.train_list],
            "test_list": [[name, None] for name, _ in base.test_list],
            "meta": {**base.meta, "md5": None},
        },
    )


_CIFAR_CLASSES = {10: _presence_only(tv_datasets.CIFAR10), 100: _presence_only(tv_datasets.CIFAR100)}


def load_cifar(
    root: str | os.PathLike[str], split: str = "train", num_classes: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read CIFAR-10/100 from the standard python-pickle folder, with a restricted unpickler (never runs code).

    Args:
        root: the folder holding ``cifar-10-batches-py`` (``cifar-100-python``), or that folder itself.
        split: ``train`` or ``test``.
        num_classes: 10 or 100.

    Returns:
        ``(images (N, 3, 32, 32) uint8, labels (N,) int64)``.

    Raises:
        FileNotFoundError: the folder or one of its files is missing (named in the message).
        ValueError: a file is unreadable or refers to anything but plain data (a pickle that would run code), or
            a label is out of range.
    """
    if num_classes not in _CIFAR_CLASSES:
        raise ValueError(f"CIFAR has 10 or 100 classes, got {num_classes}")
    if split not in ("train", "test"):
        raise ValueError(f"CIFAR split {split!r} is not one of train, test")
    cls = _CIFAR_CLASSES[num_classes]
    path = Path(root)
    if path.name == cls.base_folder:
        path = path.parent
    folder = path / cls.base_folder
    if not folder.is_dir():
        raise FileNotFoundError(
            f"CIFAR-{num_classes} folder {folder} does not exist; data.root must hold {cls.base_folder}/ with the "
            "python-pickle batches (download cifar-10-python.tar.gz / cifar-100-python.tar.gz and extract it there)"
        )
    names = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-{num_classes} folder {folder} lacks {', '.join(missing)}")
    data, targets = _read_cifar_batches(folder, [n for n, _ in (cls.train_list if split == "train" else cls.test_list)])
    if data.dim() != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"CIFAR-{num_classes} folder {folder}: images have shape {tuple(data.shape)}, expected (N, 3072)"
        )
    labels = torch.as_tensor(targets, dtype=torch.long)
    _check_labels(labels, num_classes, f"CIFAR-{num_classes} {split} batches in {folder}")
    return data.reshape(-1, 3, 32, 32).contiguous(), labels


def _read_cifar_batches(folder: Path, names: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
    """The ``data`` rows (uint8) and labels of CIFAR batch files, read with :func:`safe_load_pickle`."""
    arrays, targets = [], []
    for name in names:
        path = folder / name
        try:
            entry = safe_load_pickle(path)
            if not isinstance(entry, dict) or "data" not in entry:
                raise ValueError("it is not a dict with a 'data' entry")
            labels = entry.get("labels", entry.get("fine_labels"))
            if not isinstance(labels, list) or not all(isinstance(v, int) for v in labels):
                raise ValueError("it has no 'labels' / 'fine_labels' list of ints")
            rows = torch.as_tensor(entry["data"])
            if rows.dtype != torch.uint8 or rows.dim() != 2 or rows.shape[0] != len(labels):
                raise ValueError(f"its 'data' is {rows.dtype} {tuple(rows.shape)}, not uint8 (N, 3072) for N labels")
        except UnsafePickleError as err:
            raise ValueError(
                f"CIFAR batch {path} {err}. It is not a CIFAR batch and was not loaded: delete the folder and "
                "extract the official cifar-*-python.tar.gz again"
            ) from err
        except Exception as err:  # unpickling/shape errors of a damaged file
            raise ValueError(
                f"CIFAR folder {folder} holds an unreadable batch file {name} ({type(err).__name__}: {str(err)[:200]})"
            ) from err
        arrays.append(rows)
        targets.extend(labels)
    return torch.cat(arrays), targets


# ------------------------------------------------------------------------------------------------- folders


class _UnreadableImageError(ValueError):
    """An image file that cannot be decoded; one line even when raised in a DataLoader worker process."""

    def __init__(self, message: str) -> None:
        # a DataLoader worker's exception comes back as ``type(err)("Caught ... Original Traceback ...")``: keep
        # the original one-line message (the traceback's last line), not the worker's whole traceback
        if message.startswith("Caught ") and "Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


def _open_image(path: str) -> Image.Image:
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise _UnreadableImageError(
            f"cannot read image {path}: {type(err).__name__}: {err}. Replace or remove the file"
        ) from err


def load_image_folder(root: str | os.PathLike[str], split: str, transform: Any = None) -> tv_datasets.ImageFolder:
    """``ImageFolder`` over ``root/split/<class>/<image>`` whose unreadable images raise an error naming the file.

    Raises:
        FileNotFoundError: ``root/split`` does not exist, has no class folders, or a class has no images.
    """
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"image folder {folder} does not exist; data.root must hold {split}/<class>/<images> "
            "(ImageNet layout: train/n01440764/*.JPEG, val/n01440764/*.JPEG)"
        )
    try:
        return tv_datasets.ImageFolder(str(folder), transform=transform, loader=_open_image, allow_empty=False)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image folder {folder}: {err}") from err


# ------------------------------------------------------------------------------------------------- splits


def _holdout(n: int, val_size: int, seed: int, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    if val_size >= n:
        raise ValueError(f"data.val_size {val_size} leaves no training images of the {n} in {source}; lower it")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def create_datasets(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    image_size: int | None = None,
    eval_resize: int | None = None,
    augment: str = "crop_flip",
    crop_scale_min: float | None = None,
    crop_padding: int = 4,
    hflip: bool = True,
    val_size: int = 0,
    split_seed: int = 0,
    download: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    load_train: bool = True,
    fashion_mnist_system_dir: str | os.PathLike[str] = FASHION_MNIST_SYSTEM_DIR,
) -> DatasetSplits:
    """Build the training, held-out validation and test splits of a dataset.

    Args:
        name: ``fashion_mnist``, ``cifar10``, ``cifar100`` or ``image_folder``.
        root: the dataset folder (optional for Fashion-MNIST).
        image_size: training crop / evaluation size (default: native, 224 for folders).
        eval_resize: folders: evaluation resize (default ``image_size / 0.875``).
        augment: ``crop_flip``, ``basic``, ``mobile`` (folders) or ``none``.
        crop_scale_min, crop_padding, hflip: augmentation settings (see :class:`slimmable.config.DataConfig`).
        val_size: images held out from the training set (evaluation transform) as the validation split.
        split_seed: seed of the held-out split.
        download: Fashion-MNIST: allow a torchvision download.
        cache_dir: download cache (Fashion-MNIST).
        load_train: ``False`` skips the training split (evaluation only; no held-out split either).
        fashion_mnist_system_dir: the system folder tried for Fashion-MNIST.

    Raises:
        ValueError: unknown dataset or augmentation, bad data.
        FileNotFoundError: missing files or folders (named).
    """
    if name not in DATASETS:
        raise ValueError(f"dataset {name!r} is not one of {', '.join(DATASETS)}")
    if name == "image_folder":
        return _folder_splits(
            root,
            image_size,
            eval_resize,
            augment,
            crop_scale_min,
            crop_padding,
            hflip,
            val_size,
            split_seed,
            load_train,
        )
    if augment not in ("crop_flip", "none"):
        raise ValueError(f"augment {augment!r} is for image folders; {name} uses crop_flip or none")
    if name == "fashion_mnist":
        test_x, test_y, folder = load_fashion_mnist(
            root, "test", download=download, cache_dir=cache_dir, system_dir=fashion_mnist_system_dir
        )
        train_xy = load_fashion_mnist(folder, "train", cache_dir=cache_dir)[:2] if load_train else None
        mean, std, num_classes, source = FASHION_MNIST_MEAN, FASHION_MNIST_STD, 10, str(folder)
    else:
        if root is None:
            raise ValueError(f"dataset {name} needs data.root: the folder holding the python-pickle batches")
        num_classes = 10 if name == "cifar10" else 100
        test_x, test_y = load_cifar(root, "test", num_classes)
        train_xy = load_cifar(root, "train", num_classes) if load_train else None
        mean, std = (CIFAR10_MEAN, CIFAR10_STD) if num_classes == 10 else (CIFAR100_MEAN, CIFAR100_STD)
        source = str(root)
    native = int(test_x.shape[-1])
    size = image_size if image_size is not None else native
    kw = dict(padding=crop_padding, hflip=hflip, image_size=None if size == native else size)
    test = TensorImageDataset(test_x, test_y, mean, std, augment="none", source=f"{source} (test)", **kw)
    train = val = None
    if train_xy is not None:
        full = TensorImageDataset(*train_xy, mean, std, augment=augment, source=f"{source} (train)", **kw)
        if val_size > 0:
            train_idx, val_idx = _holdout(len(full), val_size, split_seed, source)
            train, val = full.view(train_idx), full.view(val_idx, augment="none")
        else:
            train = full
    return DatasetSplits(train, val, test, num_classes, int(test_x.shape[1]), size, mean, std, name, source)


def _folder_splits(
    root: str | os.PathLike[str] | None,
    image_size: int | None,
    eval_resize: int | None,
    augment: str,
    crop_scale_min: float | None,
    crop_padding: int,
    hflip: bool,
    val_size: int,
    split_seed: int,
    load_train: bool,
) -> DatasetSplits:
    if root is None:
        raise ValueError("dataset image_folder needs data.root: the folder holding train/ and val/")
    size = image_size or 224
    train_tf = imagenet_train_transform(size, augment, crop_scale_min, hflip, crop_padding)
    eval_tf = imagenet_eval_transform(size, eval_resize)
    test = load_image_folder(root, "val", eval_tf)
    train = val = None
    if load_train:
        full = load_image_folder(root, "train", train_tf)
        if full.classes != test.classes:
            only_train = sorted(set(full.classes) - set(test.classes))[:5]
            only_val = sorted(set(test.classes) - set(full.classes))[:5]
            raise ValueError(
                f"image folder {root}: train/ and val/ have different classes (only in train: {only_train}, only in "
                f"val: {only_val}); both need the same class folders"
            )
        if val_size > 0:
            train_idx, val_idx = _holdout(len(full), val_size, split_seed, str(root))
            held = copy.copy(full)
            held.transform = eval_tf
            train = torch.utils.data.Subset(full, train_idx.tolist())
            val = torch.utils.data.Subset(held, val_idx.tolist())
        else:
            train = full
    return DatasetSplits(
        train,
        val,
        test,
        len(test.classes),
        3,
        size,
        IMAGENET_MEAN,
        IMAGENET_STD,
        "image_folder",
        str(root),
        eval_resize if eval_resize is not None else round(size / 0.875),
    )
