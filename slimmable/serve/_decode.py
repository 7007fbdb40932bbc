"""Request decoding for the server: images (PNG/JPEG/... bytes) and JSON tensors to model inputs."""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: images larger than this are refused before decoding (a 50-megapixel JPEG decodes to 150 MB)
MAX_IMAGE_PIXELS = 50_000_000


class BadRequest(ValueError):
    """A request the server refuses, with the HTTP status to answer (4xx) and a message for the client."""

    def __init__(self, message: str, status: int = 400, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})


class Busy(BadRequest):
    """The server is at a memory bound: answer 503 with ``Retry-After`` (the client should retry later)."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, 503, {"Retry-After": str(int(retry_after_s))})


class Budget:
    """A shared, non-blocking budget of units in flight (decoded pixels, body bytes): reserve or be refused.

    Args:
        capacity: units that may be reserved at once; ``None`` for no bound.
        what: the unit, for messages (``"decoded pixels"``).
    """

    def __init__(self, capacity: int | None, what: str) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"the budget of {what} in flight must be a positive int or None, got {capacity!r}")
        self.capacity, self.what = capacity, what
        self.in_use = 0
        self.peak = 0
        self._lock = threading.Lock()

    def try_reserve(self, n: int) -> bool:
        """Reserve ``n`` units when they fit (a request larger than the whole capacity fits only alone)."""
        with self._lock:
            if self.capacity is not None and self.in_use > 0 and self.in_use + n > self.capacity:
                return False
            self.in_use += n
            self.peak = max(self.peak, self.in_use)
            return True

    def release(self, n: int) -> None:
        with self._lock:
            self.in_use -= n

    def reserve(self, n: int) -> _Reservation:
        """``with budget.reserve(n):`` holds ``n`` units, or raises :class:`Busy` (503) when they do not fit."""
        if not self.try_reserve(n):
            raise Busy(
                f"the server is at its bound of {self.capacity} {self.what} in flight ({self.in_use} in use, this "
                f"request needs {n}); retry shortly"
            )
        return _Reservation(self, n)


class _Reservation:
    def __init__(self, budget: Budget, n: int) -> None:
        self.budget, self.n = budget, n

    def __enter__(self) -> _Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.budget.release(self.n)


#: the most elongated image accepted (width:height or height:width); a 1x4000 image would resize to a side of 0
MAX_ASPECT_RATIO = 20


def check_aspect(w: int, h: int) -> None:
    """Refuse images too elongated to resize (their short side would round to 0 pixels).

    Raises:
        BadRequest: an aspect ratio above :data:`MAX_ASPECT_RATIO` (400).
    """
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise BadRequest(
            f"the image is {w}x{h} pixels, more elongated than {MAX_ASPECT_RATIO}:1, which cannot be resized for the "
            "model; crop or pad it"
        )


def _too_large(err: Exception) -> BadRequest:
    return BadRequest(f"the image is too large ({str(err)[:160]}); the limit is {MAX_IMAGE_PIXELS} pixels", 413)


def image_pixels(data: bytes) -> int:
    """Width x height of an encoded image, read from its header only (nothing is decoded).

    Raises:
        BadRequest: empty, not an image, or more than :data:`MAX_IMAGE_PIXELS` pixels (413).
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadRequest("the image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:  # lazy: reads the header
            w, h = img.size
    except Image.DecompressionBombError as err:  # Pillow refuses headers above 2x its own limit: too large, 413
        raise _too_large(err) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadRequest(f"the body is not a readable image ({type(err).__name__}: {str(err)[:160]})") from err
    if w * h > MAX_IMAGE_PIXELS:
        raise BadRequest(f"the image has {w}x{h} pixels, more than the {MAX_IMAGE_PIXELS} allowed; downscale it", 413)
    return w * h


def decode_image(
    data: bytes,
    input_shape: Sequence[int],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    resize: int | None = None,
) -> torch.Tensor:
    """Decode image bytes and preprocess them as for evaluation: resize the short side to ``resize`` (default
    ``side / 0.875``, 256 for 224), center-crop to ``(H, W)``, scale to [0, 1], normalise.

    Args:
        data: the encoded image (any format Pillow reads: PNG, JPEG, WebP, ...).
        input_shape: the model's ``(C, H, W)``; ``C`` must be 1 (grayscale) or 3 (RGB).
        mean, std: per-channel normalisation (default: ImageNet's for RGB, 0.5 for grayscale).
        resize: short side before the crop.

    Returns:
        A tensor ``(1, C, H, W)``.

    Raises:
        BadRequest: not an image, a corrupt or oversized one, or a model input that is not an image.
    """
    from torchvision.transforms import functional as TF

    c, h, w = (int(s) for s in input_shape)
    if c not in (1, 3):
        raise BadRequest(f"this model takes {c}-channel inputs, which are not images; send a tensor instead")
    img = _open_image(data, c)
    img = TF.resize(img, resize if resize else round(min(h, w) / 0.875), antialias=True)
    img = TF.center_crop(img, [h, w])
    x = TF.to_tensor(img)
    if mean is None:
        mean = IMAGENET_MEAN if c == 3 else (0.5,)
    if std is None:
        std = IMAGENET_STD if c == 3 else (0.5,)
    x = TF.normalize(x, list(mean), list(std))
    return x.unsqueeze(0)


def decode_detection_image(data: bytes, channels: int) -> torch.Tensor:
    """Decode image bytes for a detector: ``(C, H, W)`` in [0, 1] at the image's own size (the detector
    normalises and resizes it itself).

    Raises:
        BadRequest: not an image, a corrupt or oversized one.
    """
    from torchvision.transforms import functional as TF

    return TF.to_tensor(_open_image(data, channels))


def _open_image(data: bytes, channels: int) -> Any:
    """The PIL image in ``data``, in grey (1 channel) or RGB (3), refusing empty, oversized and corrupt bodies."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadRequest("the image is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise BadRequest(
                f"the image has {img.width}x{img.height} pixels, more than the {MAX_IMAGE_PIXELS} allowed; "
                "downscale it",
                413,
            )
        check_aspect(img.width, img.height)
        img.load()
        mode = "RGB" if channels == 3 else "L"
        if img.mode != mode:  # convert() copies even to the same mode: a second full-size image in memory
            img = img.convert(mode)
    except BadRequest:
        raise
    except Image.DecompressionBombError as err:
        raise _too_large(err) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadRequest(f"the body is not a readable image ({type(err).__name__}: {str(err)[:160]})") from err
    return img


def decode_detection_tensor(obj: Any, channels: int, max_batch: int, max_pixels: int) -> list[torch.Tensor]:
    """A JSON nested list ``(C, H, W)`` or ``(N, C, H, W)`` (values in [0, 1], any H and W) as a list of images.

    Raises:
        BadRequest: not a rectangular list of finite numbers, the wrong channels, too many images or pixels.
    """
    x = _batch_from_json(obj, f"({channels}, H, W) or (N, {channels}, H, W)")
    if x.dim() != 4 or x.shape[1] != channels or min(x.shape) < 1:
        raise BadRequest(
            f"'tensor' has shape {tuple(x.shape)}; this detector takes ({channels}, H, W) or (N, {channels}, H, W)"
        )
    if x.shape[0] > max_batch:
        raise BadRequest(f"'tensor' holds {x.shape[0]} images; at most {max_batch} per request", 413)
    if x.shape[-1] * x.shape[-2] > max_pixels:
        raise BadRequest(f"the images have {x.shape[-2]}x{x.shape[-1]} pixels, more than the {max_pixels} allowed", 413)
    check_aspect(int(x.shape[-1]), int(x.shape[-2]))
    if not bool(torch.isfinite(x).all()):
        raise BadRequest("'tensor' holds NaN or infinite values")
    return list(x)


def _batch_from_json(obj: Any, shapes: str) -> torch.Tensor:
    """A JSON nested list as a float32 tensor, a single ``(C, H, W)`` item given a batch dimension (``shapes`` names
    the accepted shapes in the error)."""
    if not isinstance(obj, list):
        raise BadRequest(f"'tensor' must be a nested list of numbers of shape {shapes}")
    try:
        x = torch.tensor(obj, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError, OverflowError, RecursionError) as err:
        raise BadRequest(f"'tensor' is not a rectangular nested list of numbers ({str(err)[:120]})") from err
    return x.unsqueeze(0) if x.dim() == 3 else x


def decode_tensor(obj: Any, input_shape: Sequence[int], max_batch: int) -> torch.Tensor:
    """A JSON nested list ``(C, H, W)`` or ``(N, C, H, W)`` as a float32 tensor ``(N, C, H, W)``.

    Raises:
        BadRequest: not a rectangular list of finite numbers, the wrong shape, or more than ``max_batch`` items.
    """
    c, h, w = (int(s) for s in input_shape)
    x = _batch_from_json(obj, f"({c}, {h}, {w}) or (N, {c}, {h}, {w})")
    if x.dim() != 4 or tuple(x.shape[1:]) != (c, h, w) or x.shape[0] < 1:
        raise BadRequest(f"'tensor' has shape {tuple(x.shape)}; this model takes ({c}, {h}, {w}) or (N, {c}, {h}, {w})")
    if x.shape[0] > max_batch:
        raise BadRequest(f"'tensor' holds {x.shape[0]} inputs; at most {max_batch} per request", 413)
    if not bool(torch.isfinite(x).all()):
        raise BadRequest("'tensor' holds NaN or infinite values")
    return x


def number_param(params: Mapping[str, Any], key: str, *, zero: bool = False) -> float | None:
    """A positive finite number from a JSON body, form field or query string (``None`` when absent); ``zero``:
    0 too (``min_score=0`` keeps every detection)."""
    v = params.get(key)
    if v is None or v == "":
        return None
    if isinstance(v, bool):
        raise BadRequest(f"{key} must be a number, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError) as err:
        raise BadRequest(f"{key} must be a number such as 0.5, got {v!r}") from err
    if not math.isfinite(f) or f < 0 or (f == 0 and not zero):
        what = "a finite number >= 0" if zero else "a positive finite number"
        raise BadRequest(f"{key} must be {what}, got {v!r}")
    return f
