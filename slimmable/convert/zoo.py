"""``create_model("torchvision/<arch>")`` and ``create_model("timm/<arch>")``: a torchvision or timm model (random
weights or the user's own state dict, never downloaded), converted."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .core import SlimGraphModule, convert

__all__ = [
    "PREFIX",
    "TIMM_PREFIX",
    "ZOO_PREFIXES",
    "create_original_model",
    "create_timm_model",
    "create_torchvision_model",
    "is_zoo_name",
    "load_original_weights",
]

#: a state dict of the original (unconverted) model: a file written by ``torch.save(model.state_dict(), PATH)``, or
#: the mapping itself
Weights = str | os.PathLike[str] | Mapping[str, torch.Tensor]

PREFIX = "torchvision/"
TIMM_PREFIX = "timm/"
#: names of models from another zoo, converted when built (``create_model`` takes them besides registered names)
ZOO_PREFIXES = (PREFIX, TIMM_PREFIX)


def is_zoo_name(name: object) -> bool:
    """Whether ``name`` is ``torchvision/<arch>`` or ``timm/<arch>`` (a model converted when it is built)."""
    return isinstance(name, str) and name.startswith(ZOO_PREFIXES)


def create_torchvision_model(
    name: str,
    widths: Sequence[float] | None = None,
    num_classes: int | None = None,
    in_chans: int = 3,
    small_input: bool = False,
    drop_rate: float = 0.0,
    width_range: tuple[float, float] | None = None,
    stat_widths: Sequence[float] | None = None,
    weights: Weights | None = None,
    sort: str | None = None,
    **tv_kwargs: Any,
) -> SlimGraphModule:
    """Build ``torchvision.models.<arch>`` with ``weights=None`` and convert it (:func:`slimmable.convert`).

    Args:
        name: ``"torchvision/<arch>"`` such as ``"torchvision/mobilenet_v3_small"``.
        widths: the widths of the result (the largest must be 1.0); default ``(0.25, 0.5, 0.75, 1.0)``.
        num_classes: classifier outputs (torchvision's default 1000 when ``None``).
        in_chans: input channels; other than 3, the first convolution is rebuilt with that many inputs (new
            random weights), e.g. 1 for Fashion-MNIST.
        small_input: 28x28 / 32x32 images: the first convolution takes stride 1.
        drop_rate: dropout before the classifier, for models whose builder takes ``dropout``.
        width_range: ``(lo, 1.0)``: universally slimmable (any width in the range), instead of ``widths``.
        stat_widths: with ``width_range``: the widths whose BN statistics are kept (default ``(lo, 1.0)``).
        weights: a state dict of the model as these arguments build it (the original architecture), loaded
            strictly before conversion (see :func:`load_original_weights`).
        sort: reorder channel groups and heads by importance at conversion (``convert(..., sort=...)``).
        **tv_kwargs: further keyword arguments of the torchvision builder.

    Raises:
        ValueError: unknown architecture, an argument the builder does not take, or weights that do not fit.
    """
    model = create_original_model(
        name, num_classes=num_classes, in_chans=in_chans, small_input=small_input, drop_rate=drop_rate,
        weights=weights, **tv_kwargs,
    )  # fmt: skip
    arch = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    size = int(tv_kwargs.get("image_size", 224)) if arch.startswith(("vit_", "swin_", "maxvit")) else 64
    x = torch.randn(1, in_chans, size, size)
    return convert(model, widths=widths, example_input=x, width_range=width_range, stat_widths=stat_widths, sort=sort)


def create_original_model(
    name: str,
    num_classes: int | None = None,
    in_chans: int = 3,
    small_input: bool = False,
    drop_rate: float = 0.0,
    weights: Weights | None = None,
    **kwargs: Any,
) -> nn.Module:
    """The torchvision or timm model that ``create_model(name, ...)`` converts, unconverted, in eval mode.

    ``create_model("torchvision/<arch>", **kw)`` is ``convert(create_original_model("torchvision/<arch>", **kw))``
    (``widths``, ``width_range`` and ``stat_widths`` aside): a teacher distilling into the converted model
    (``train.teacher: original``), or the reference a conversion is checked against.

    Args:
        name: ``"torchvision/<arch>"`` or ``"timm/<arch>"``.
        num_classes, in_chans, small_input, drop_rate: as :func:`create_torchvision_model` /
            :func:`create_timm_model`.
        weights: the model's state dict (a file or the mapping), loaded strictly (:func:`load_original_weights`);
            ``None``: random weights.
        **kwargs: further keyword arguments of the torchvision builder or of ``timm.create_model``.

    Raises:
        ValueError: unknown architecture, an argument the builder does not take, or weights that do not fit.
        FileNotFoundError: no file at ``weights``.
    """
    if name.startswith(TIMM_PREFIX):
        model = _build_timm(name, num_classes, in_chans, small_input, drop_rate, kwargs)
    else:
        model = _build_torchvision(name, num_classes, in_chans, small_input, drop_rate, kwargs)
    if weights is not None:
        load_original_weights(model, weights, name)
    return model.eval()


def _build_torchvision(
    name: str, num_classes: int | None, in_chans: int, small_input: bool, drop_rate: float, tv_kwargs: dict
) -> nn.Module:
    import torchvision

    arch = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    available = torchvision.models.list_models(module=torchvision.models)
    if arch not in available:
        import difflib

        near = difflib.get_close_matches(arch, available, n=3)
        hint = f" Did you mean {', '.join(PREFIX + n for n in near)}?" if near else ""
        raise ValueError(f"unknown torchvision classification model {arch!r}.{hint}")
    builder = torchvision.models.get_model_builder(arch)
    kwargs = dict(tv_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if drop_rate:
        kwargs["dropout"] = drop_rate
    if arch.startswith(("googlenet", "inception")):
        kwargs.setdefault("init_weights", True)
    try:
        model = builder(weights=None, **kwargs)
    except TypeError as err:
        raise ValueError(
            f"torchvision's {arch} does not take these arguments ({err}); model.drop_rate needs a builder with a "
            "dropout argument, other keyword arguments go to the builder as they are"
        ) from err
    if in_chans != 3 or small_input:
        _adapt_stem(model, in_chans, small_input)
    return model


def load_original_weights(model: nn.Module, weights: Weights, name: str | None = None) -> None:
    """Load a state dict into an unconverted model, strictly (every key, every shape).

    A file is read with ``torch.load(weights_only=True)`` on the CPU, so it cannot run code.

    Args:
        model: the original (unconverted) model.
        weights: a file written by ``torch.save(model.state_dict(), PATH)``, or the state dict itself.
        name: the model's name for messages (``torchvision/resnet18``).

    Raises:
        FileNotFoundError: no file at ``weights``.
        ValueError: the file cannot be read safely, is not a state dict, or its keys or shapes do not fit the model
            (the message names the first few).
        TypeError: ``weights`` is neither a path nor a mapping (e.g. torchvision's ``WeightsEnum``, which would
            need a download).
    """
    what = name or type(model).__name__
    if isinstance(weights, Mapping):
        sd, src = weights, "the state dict"
    elif isinstance(weights, (str, os.PathLike)):
        path = Path(weights)
        src = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"weights file {src} does not exist; give the state dict of {what} "
                                    "(saved with torch.save(model.state_dict(), PATH))")  # fmt: skip
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle and zip errors alike (torch's own hint, weights_only=False, is no fix here)
            raise ValueError(
                f"{src} cannot be read with torch.load(weights_only=True) ({type(err).__name__}): not a tensor file, "
                "or it pickles objects other than tensors; save a plain one: torch.save(model.state_dict(), PATH)"
            ) from err
    else:
        raise TypeError(
            f"weights must be a state dict file or mapping, got {type(weights).__name__}; torchvision's pretrained "
            "weights are not downloaded: save their state_dict() to a file and give its path"
        )
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in
                                              sd.items()):  # fmt: skip
        hint = ""
        if isinstance(sd, Mapping):
            nested = [k for k, v in sd.items() if isinstance(v, Mapping)][:3]
            hint = f" (it holds the mappings {nested}: save the state dict itself)" if nested else ""
        raise ValueError(f"{src} is not a state dict of {what}, a mapping of names to tensors{hint}; save "
                         "model.state_dict()")  # fmt: skip
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape !=
              own[k].shape]  # fmt: skip
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shapes differ (file vs model: {', '.join(shapes[:3])})")
        if missing:
            parts.append(f"{len(missing)} keys missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} keys unexpected (e.g. {', '.join(unexpected[:3])})")
        raise ValueError(
            f"{src} does not fit {what} as built here: {'; '.join(parts)}; save the state dict of the same "
            "architecture, num_classes, in_chans and small_input"
        )
    model.load_state_dict(sd, strict=True)


def _adapt_stem(model: nn.Module, in_chans: int, small_input: bool) -> None:
    """Rebuild the first convolution for ``in_chans`` inputs; stride 1 for small images."""
    for parent in model.modules():
        for child_name, conv in parent.named_children():
            if isinstance(conv, nn.Conv2d):
                new = nn.Conv2d(
                    in_chans, conv.out_channels, conv.kernel_size, 1 if small_input else conv.stride, conv.padding,
                    conv.dilation, conv.groups if conv.groups == 1 else in_chans, conv.bias is not None,
                    conv.padding_mode,
                )  # fmt: skip
                if in_chans == conv.in_channels:
                    new.load_state_dict(conv.state_dict())
                setattr(parent, child_name, new)
                return
    raise ValueError(f"{type(model).__name__} has no convolution to adapt to {in_chans} input channels")


def create_timm_model(
    name: str,
    widths: Sequence[float] | None = None,
    num_classes: int | None = None,
    in_chans: int = 3,
    small_input: bool = False,
    drop_rate: float = 0.0,
    width_range: tuple[float, float] | None = None,
    stat_widths: Sequence[float] | None = None,
    weights: Weights | None = None,
    sort: str | None = None,
    **timm_kwargs: Any,
) -> SlimGraphModule:
    """Build ``timm.create_model(<arch>, pretrained=False)`` and convert it (:func:`slimmable.convert`).

    The model is traced on a 64 px input (32 px with ``small_input``), or at its default input size from timm's
    configuration when it cannot run on that (fixed positional embeddings, large pooling windows).

    Args:
        name: ``"timm/<arch>"`` such as ``"timm/efficientnet_b0"``.
        widths: the widths of the result (the largest must be 1.0); default ``(0.25, 0.5, 0.75, 1.0)``.
        num_classes: classifier outputs (timm's default 1000 when ``None``).
        in_chans: input channels (timm adapts the stem itself).
        small_input: 28x28 / 32x32 images: the first convolution takes stride 1.
        drop_rate: dropout before the classifier (timm's ``drop_rate``).
        width_range: ``(lo, 1.0)``: universally slimmable (any width in the range), instead of ``widths``.
        stat_widths: with ``width_range``: the widths whose BN statistics are kept (default ``(lo, 1.0)``).
        weights: a state dict of the model as these arguments build it, loaded strictly before conversion (see
            :func:`load_original_weights`).
        sort: reorder channel groups and heads by importance at conversion (``convert(..., sort=...)``).
        **timm_kwargs: further keyword arguments of ``timm.create_model``.

    Raises:
        ValueError: timm is not installed, an unknown architecture, an argument the model does not take, or
            weights that do not fit.
    """
    model = create_original_model(
        name, num_classes=num_classes, in_chans=in_chans, small_input=small_input, drop_rate=drop_rate,
        weights=weights, **timm_kwargs,
    )  # fmt: skip
    x = torch.randn(1, in_chans, 32 if small_input else 64, 32 if small_input else 64)
    try:
        with torch.no_grad():
            model(x)
    except Exception:  # the model needs its own input size
        size = tuple(model.pretrained_cfg.get("input_size", (in_chans, 224, 224)))[-2:]
        x = torch.randn(1, in_chans, *size)
    return convert(model, widths=widths, example_input=x, width_range=width_range, stat_widths=stat_widths, sort=sort)


def _build_timm(
    name: str, num_classes: int | None, in_chans: int, small_input: bool, drop_rate: float, timm_kwargs: dict
) -> nn.Module:
    try:
        import timm
    except ImportError as err:
        raise ValueError(f"{name} needs timm: pip install 'slimmable[timm]' (or pip install timm)") from err
    arch = name[len(TIMM_PREFIX) :] if name.startswith(TIMM_PREFIX) else name
    if not timm.is_model(arch):
        import difflib

        near = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(TIMM_PREFIX + n for n in near)}?" if near else ""
        raise ValueError(f"unknown timm model {arch!r}.{hint}")
    kwargs = dict(timm_kwargs, in_chans=in_chans, drop_rate=drop_rate)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    except TypeError as err:
        raise ValueError(f"timm's {arch} does not take these arguments ({err}); see timm.create_model") from err
    if small_input:
        _adapt_stem(model, in_chans, small_input)
    return model
