"""``create_model("torchvision/<arch>")`` and ``create_model("timm/<arch>")``: a torchvision or timm model (random
weights, never downloaded), converted."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .core import SlimGraphModule, convert

__all__ = ["PREFIX", "TIMM_PREFIX", "ZOO_PREFIXES", "create_timm_model", "create_torchvision_model", "is_zoo_name"]

PREFIX = "torchvision/"
TIMM_PREFIX = "timm/"
#: names of models from another zoo, converted when built (``create_model`` takes them besides registered names)
ZOO_PREFIXES = (PREFIX, TIMM_PREFIX)


def is_zoo_name(name: object) -> bool:
    """Whether ``name`` is ``torchvision/<arch>`` or ``timm/<arch>`` (a model converted when it is built)."""
    return isinstance(name, str) and name.startswith(ZOO_PREFIXES)


def create_torchvision_model(
    name: str,
    widths: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    num_classes: int | None = None,
    in_chans: int = 3,
    small_input: bool = False,
    drop_rate: float = 0.0,
    width_range: tuple[float, float] | None = None,
    **tv_kwargs: Any,
) -> SlimGraphModule:
    """Build ``torchvision.models.<arch>`` with ``weights=None`` and convert it (:func:`slimmable.convert`).

    Args:
        name: ``"torchvision/<arch>"`` such as ``"torchvision/mobilenet_v3_small"``.
        widths: the widths of the result (the largest must be 1.0).
        num_classes: classifier outputs (torchvision's default 1000 when ``None``).
        in_chans: input channels; other than 3, the first convolution is rebuilt with that many inputs (new
            random weights), e.g. 1 for Fashion-MNIST.
        small_input: 28x28 / 32x32 images: the first convolution takes stride 1.
        drop_rate: dropout before the classifier, for models whose builder takes ``dropout``.
        width_range: not supported (see :func:`slimmable.convert`).
        **tv_kwargs: further keyword arguments of the torchvision builder.

    Raises:
        ValueError: unknown architecture, or an argument the builder does not take.
    """
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
    size = int(kwargs.get("image_size", 224)) if arch.startswith(("vit_", "swin_", "maxvit")) else 64
    model.eval()
    return convert(model, widths=widths, example_input=torch.randn(1, in_chans, size, size), width_range=width_range)


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
    widths: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    num_classes: int | None = None,
    in_chans: int = 3,
    small_input: bool = False,
    drop_rate: float = 0.0,
    width_range: tuple[float, float] | None = None,
    **timm_kwargs: Any,
) -> SlimGraphModule:
    """Build ``timm.create_model(<arch>, pretrained=False)`` and convert it (:func:`slimmable.convert`).

    The model is traced on a 64 px input (32 px with ``small_input``), or at its default input size from timm's
    configuration when it cannot run on that (fixed positional embeddings, large pooling windows).

    Args:
        name: ``"timm/<arch>"`` such as ``"timm/efficientnet_b0"``.
        widths: the widths of the result (the largest must be 1.0).
        num_classes: classifier outputs (timm's default 1000 when ``None``).
        in_chans: input channels (timm adapts the stem itself).
        small_input: 28x28 / 32x32 images: the first convolution takes stride 1.
        drop_rate: dropout before the classifier (timm's ``drop_rate``).
        width_range: not supported (see :func:`slimmable.convert`).
        **timm_kwargs: further keyword arguments of ``timm.create_model``.

    Raises:
        ValueError: timm is not installed, an unknown architecture, or an argument the model does not take.
    """
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
    model.eval()
    x = torch.randn(1, in_chans, 32 if small_input else 64, 32 if small_input else 64)
    try:
        with torch.no_grad():
            model(x)
    except Exception:  # the model needs its own input size
        size = tuple(model.pretrained_cfg.get("input_size", (in_chans, 224, 224)))[-2:]
        x = torch.randn(1, in_chans, *size)
    return convert(model, widths=widths, example_input=x, width_range=width_range)
