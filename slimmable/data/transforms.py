"""Transforms: the official ImageNet recipes (PIL, per image) and fast batch augmentation for in-memory tensors.

ImageNet-style folders use torchvision transforms per image. Small datasets held in memory as ``uint8`` tensors
(Fashion-MNIST, CIFAR) are augmented a whole batch at a time (:func:`crop_flip_batch`), which is much faster on
a few CPU cores than a ``DataLoader`` over PIL images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision import transforms as T

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGENET_EIGVAL",
    "IMAGENET_EIGVEC",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Lighting",
    "crop_flip_batch",
    "imagenet_eval_transform",
    "imagenet_train_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

# Principal components of ImageNet RGB pixels (Krizhevsky et al. 2012), as used by the official recipes.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)

#: augmentation presets of the official recipes: smallest random-resized-crop scale, colour jitter, PCA lighting
AUGMENT_PRESETS: dict[str, tuple[float, float, float]] = {
    "basic": (0.08, 0.4, 0.1),
    "mobile": (0.25, 0.4, 0.1),
}


class Lighting(torch.nn.Module):
    """AlexNet-style PCA lighting noise on a ``(3, H, W)`` float image in [0, 1].

    Adds ``eigvec @ (alpha * eigval)`` to every pixel, ``alpha ~ N(0, alphastd)`` per image. The official code
    applies the same constants to 0-255 pixel values, where the shift is about 1/255 of the intended one; this
    applies them on the [0, 1] scale they were computed for.

    Args:
        alphastd: standard deviation of the noise; 0 disables it.
    """

    def __init__(
        self,
        alphastd: float,
        eigval: Sequence[float] = IMAGENET_EIGVAL,
        eigvec: Sequence[Sequence[float]] = IMAGENET_EIGVEC,
    ) -> None:
        super().__init__()
        self.alphastd = float(alphastd)
        self.register_buffer("eigval", torch.tensor(eigval, dtype=torch.float32), persistent=False)
        self.register_buffer("eigvec", torch.tensor(eigvec, dtype=torch.float32), persistent=False)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.alphastd == 0:
            return img
        if img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"Lighting expects a (3, H, W) RGB tensor, got shape {tuple(img.shape)}")
        alpha = torch.randn(3) * self.alphastd
        shift = self.eigvec @ (alpha * self.eigval)
        return (img + shift.view(3, 1, 1).to(img.dtype)).clamp_(0.0, 1.0)

    def extra_repr(self) -> str:
        return f"alphastd={self.alphastd}"


def imagenet_train_transform(
    image_size: int = 224,
    augment: str = "mobile",
    crop_scale_min: float | None = None,
    hflip: bool = True,
    crop_padding: int = 4,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """Training transform of an image folder (PIL image → normalised float tensor).

    Args:
        image_size: output side.
        augment: ``basic`` (crop scale 0.08), ``mobile`` (crop scale 0.25) — both with colour jitter 0.4 and PCA
            lighting 0.1 as the official recipes; ``crop_flip`` (resize, pad, random crop, flip); ``none``
            (the evaluation transform).
        crop_scale_min: overrides the preset's smallest crop scale, e.g. 0.35.
        hflip: random horizontal flip.
        crop_padding: padding of ``crop_flip``.

    Raises:
        ValueError: unknown ``augment``.
    """
    flip = [T.RandomHorizontalFlip()] if hflip else []
    if augment in AUGMENT_PRESETS:
        scale, jitter, lighting = AUGMENT_PRESETS[augment]
        if crop_scale_min is not None:
            scale = crop_scale_min
        return T.Compose(
            [
                T.RandomResizedCrop(image_size, scale=(scale, 1.0)),
                T.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter),
                *flip,
                T.ToTensor(),
                Lighting(lighting),
                T.Normalize(mean, std),
            ]
        )
    if augment == "crop_flip":
        return T.Compose(
            [
                T.Resize(image_size),
                T.CenterCrop(image_size),
                T.RandomCrop(image_size, padding=crop_padding),
                *flip,
                T.ToTensor(),
                T.Normalize(mean, std),
            ]
        )
    if augment == "none":
        return imagenet_eval_transform(image_size, mean=mean, std=std)
    raise ValueError(f"augment {augment!r} is not one of basic, mobile, crop_flip, none")


def imagenet_eval_transform(
    image_size: int = 224,
    resize: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """Evaluation transform: resize the shorter side (default ``image_size / 0.875``, 256 for 224), center crop."""
    resize = resize if resize is not None else round(image_size / 0.875)
    return T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), T.Normalize(mean, std)])


def crop_flip_batch(
    images: torch.Tensor, padding: int = 4, hflip: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, one draw per image, for a whole batch.

    Args:
        images: ``(N, C, H, W)`` tensor (any dtype).
        padding: pixels of zero padding on each side; the crop has the input's size.
        hflip: flip each image with probability 1/2.
        generator: random generator (default: torch's global one).

    Returns:
        ``(N, C, H, W)`` tensor of the same dtype.
    """
    n, c, h, w = images.shape
    out = images
    if padding > 0:
        hp, wp = h + 2 * padding, w + 2 * padding
        padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        # flat index of each output pixel in the padded batch: image base + crop offset + (channel, row, column)
        base = (torch.arange(n) * (c * hp * wp) + oy * wp + ox).view(n, 1, 1, 1)
        pixel = (
            (torch.arange(c) * (hp * wp)).view(1, c, 1, 1)
            + (torch.arange(h) * wp).view(1, 1, h, 1)
            + torch.arange(w).view(1, 1, 1, w)
        )
        out = padded.reshape(-1)[base + pixel]
    if hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out.contiguous()
