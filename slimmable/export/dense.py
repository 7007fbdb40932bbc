"""Turn a slimmable model at one width (or a per-layer ChannelSpec) into a plain dense ``nn.Module``.

The export deep-copies the model, switches the copy to the requested width, runs one forward pass with
forward-pre-hooks that record each slimmable layer's input channel count, and replaces every slimmable layer by
the ordinary layer it computes at that width, which the layer itself builds
(:meth:`slimmable.nn.SlimModule.to_dense`), e.g.:

* :class:`~slimmable.nn.SlimConv2d` → ``nn.Conv2d`` holding ``weight[:active_out, :cin // groups]``
  (depthwise: ``weight[:cin]`` with ``groups = cin``);
* :class:`~slimmable.nn.SlimLinear` → ``nn.Linear`` holding ``weight[:active_out, :cin]``;
* :class:`~slimmable.nn.SwitchableBatchNorm2d` → a copy of the active switch's ``nn.BatchNorm2d``;
* :class:`~slimmable.nn.USBatchNorm2d` → ``nn.BatchNorm2d`` with the shared affine sliced to ``c`` and the
  statistics stored for that width;
* :class:`~slimmable.nn.SharedBatchNorm2d` → ``nn.BatchNorm2d`` with affine and shared statistics sliced to ``c``.

The family's own ``forward`` (residual additions, ShuffleNet's split by shape) keeps working with the plain
layers, so the result is the same class as the source model with no slimmable layer left. Sliced tensors are
cloned and contiguous, so the export shares no memory with the source and runs at dense speed. The source model
is never modified (not its width, hooks, or training flag).

Optionally :func:`fold_batchnorm` folds each ``BatchNorm2d`` into the convolution right before it in an
``nn.Sequential`` (the only place where the convolution's output provably feeds the BN alone).
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Mapping

import torch
from torch import nn

from .._utils import example_input, input_channels, input_shape, unwrap_model
from ..nn import (
    SlimModule,
    get_channels,
    get_width,
    record_input_channels,
    set_channels,
    set_width,
    slim_modules,
)
from ._io import model_label

__all__ = [
    "default_widths",
    "example_input",
    "export_channels",
    "export_width",
    "fold_batchnorm",
    "input_channels",
    "input_shape",
    "is_dense",
    "prepare_dense",
]

_logger = logging.getLogger(__name__)


def export_width(
    model: nn.Module,
    width: float,
    *,
    fold_bn: bool = False,
    example: torch.Tensor | None = None,
) -> nn.Module:
    """A plain dense copy of ``model`` at ``width``, in eval mode.

    Args:
        model: a slimmable model (possibly wrapped by DataParallel/DDP/``torch.compile``); it is not modified.
        width: one of the model's widths (a universally slimmable model: a width with stored BN statistics).
        fold_bn: fold every BatchNorm that directly follows a convolution into it (inference only; see
            :func:`fold_batchnorm`).
        example: an input ``(N, C, H, W)`` for the recording forward pass; default the input size a converted
            model was traced with (``example_input_size``), else a ``(1, C, 16, 16)`` tensor with the model's input
            channels.

    Returns:
        An ``nn.Module`` of the model's class whose layers are ordinary ``nn.Conv2d``/``nn.BatchNorm2d``/
        ``nn.Linear``; its outputs equal ``model``'s at ``width`` (in eval mode). The attribute ``export_info``
        records the width, per-layer channels and whether BN was folded.

    Raises:
        ValueError: ``width`` is not a width of the model, or (US models) the width has no BN statistics.
        TypeError: ``model`` has no slimmable layers.
    """
    src = unwrap_model(model)
    if not any(True for _ in slim_modules(src)):
        raise TypeError(f"{type(src).__name__} has no slimmable layers; export_width needs a slimmable model")
    dense = _copy_for_export(src)
    set_width(dense, width)
    _check_stats(dense, f"width {float(width):g}")
    return _densify(dense, src, example, fold_bn, width=float(width))


def export_channels(
    model: nn.Module,
    spec: Mapping[str, int],
    *,
    fold_bn: bool = False,
    example: torch.Tensor | None = None,
    reset_bn_stats: bool = False,
) -> nn.Module:
    """A plain dense copy of ``model`` with per-layer output channels ``spec`` (a ChannelSpec).

    Layers not named in ``spec`` keep the size they have in ``model`` now (see :func:`slimmable.set_channels`).

    Args:
        model: a slimmable model; it is not modified.
        spec: qualified layer name → output channels, as written by the channel search.
        fold_bn: fold BatchNorm into the preceding convolution (see :func:`fold_batchnorm`).
        example: an input ``(N, C, H, W)`` for the recording forward pass.
        reset_bn_stats: give every BatchNorm fresh running statistics (mean 0, variance 1) instead of the stored
            ones, to be re-estimated for these channels (:func:`slimmable.train.calibrate_channels` does). A
            universally slimmable model has no stored statistics for a per-layer mix of widths, so it needs this.
            Not with ``fold_bn``.

    Returns:
        The dense module (eval mode), equal to ``model`` after ``set_channels(model, spec)``.

    Raises:
        KeyError: a name in ``spec`` is not a layer with slimmable outputs (the message suggests near names).
        ValueError: a count is out of range, or the channels cannot run (a switchable BN has no switch of that
            size; a US model has no statistics for it).
    """
    src = unwrap_model(model)
    if not isinstance(spec, Mapping):
        raise TypeError(f"spec must be a mapping of layer name to channels, got {type(spec).__name__}")
    if reset_bn_stats and fold_bn:
        raise ValueError("reset_bn_stats=True leaves statistics to re-estimate; fold BN after re-estimating them")
    dense = _copy_for_export(src)
    set_channels(dense, dict(spec))
    return _densify(dense, src, example, fold_bn, width=None, reset_bn_stats=reset_bn_stats)


def is_dense(module: nn.Module) -> bool:
    """``True`` when ``module`` holds no slimmable layer."""
    return not any(isinstance(m, SlimModule) for m in module.modules())


def prepare_dense(
    model: nn.Module,
    *,
    width: float | None = None,
    channels: Mapping[str, int] | None = None,
    fold_bn: bool = False,
) -> nn.Module:
    """The dense module to write: ``model`` itself when it is already dense, else its export.

    Args:
        model: a slimmable model or a dense module (from :func:`export_width`).
        width: export at this width.
        channels: export with this ChannelSpec (exclusive with ``width``).
        fold_bn: fold BN into convolutions when exporting a slimmable model.

    Raises:
        ValueError: both ``width`` and ``channels``, or either given with a dense module.
    """
    if width is not None and channels is not None:
        raise ValueError("give either width or channels, not both")
    from ..tasks import task_of

    task = task_of(model)  # a tensor in, a tensor out: the task picks what a file computes
    if is_dense(model):
        if width is not None or channels is not None:
            raise ValueError(
                f"{type(model).__name__} is already dense (no slimmable layers); drop width/channels, or pass the "
                "slimmable model instead"
            )
        return task.export_module(model)
    if channels is not None:
        return task.export_module(export_channels(model, channels, fold_bn=fold_bn))
    if width is None:
        width = get_width(model)
        if width is None:  # per-layer channels were set: export the current state
            return task.export_module(export_channels(model, {}, fold_bn=fold_bn))
    return task.export_module(export_width(model, width, fold_bn=fold_bn))


@torch.no_grad()
def fold_batchnorm(module: nn.Module) -> int:
    """Fold each ``nn.BatchNorm2d`` into the ``nn.Conv2d`` right before it in an ``nn.Sequential``, in place.

    Inside ``nn.Sequential`` a module's output goes only to the next module, so folding there is always exact
    (up to float rounding). The folded convolution gets a bias; the BatchNorm becomes ``nn.Identity``. Only use the
    result for inference: the BN's running statistics are baked in.

    Args:
        module: a dense module (no slimmable layers), e.g. the output of :func:`export_width`.

    Returns:
        The number of BatchNorm layers folded.

    Raises:
        TypeError: ``module`` still holds slimmable layers (export it first).
    """
    if not is_dense(module):
        raise TypeError("fold_batchnorm needs a dense module; call export_width(model, width, fold_bn=True) instead")
    folded = 0
    for seq in list(module.modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        keys = list(seq._modules)
        for a, b in itertools.pairwise(keys):
            conv, bn = seq._modules[a], seq._modules[b]
            if (
                type(conv) is nn.Conv2d
                and type(bn) is nn.BatchNorm2d
                and bn.track_running_stats
                and bn.running_mean is not None
                and conv.out_channels == bn.num_features
            ):
                setattr(seq, a, _fold(conv, bn))
                setattr(seq, b, nn.Identity())
                folded += 1
    return folded


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    # Compute in float64, store in the conv's dtype: w' = w * g / sqrt(var + eps), b' = (b - mean) * s + beta.
    w = conv.weight.detach().double()
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    scale = torch.rsqrt(var + bn.eps)
    shift = -mean * scale
    if bn.affine:
        scale = scale * bn.weight.detach().double()
        shift = shift * bn.weight.detach().double() + bn.bias.detach().double()
    bias = conv.bias.detach().double() * scale if conv.bias is not None else torch.zeros_like(shift)
    new = _new_conv(conv, conv.in_channels, conv.out_channels, conv.groups, bias=True)
    new.weight = nn.Parameter((w * scale.reshape(-1, 1, 1, 1)).to(conv.weight.dtype), conv.weight.requires_grad)
    new.bias = nn.Parameter((bias + shift).to(conv.weight.dtype), conv.weight.requires_grad)
    return new


def _copy_for_export(model: nn.Module) -> nn.Module:
    dense = copy.deepcopy(model)
    dense.eval()
    return dense


def _check_stats(model: nn.Module, what: str) -> None:
    for name, m in slim_modules(model):
        reason = m.missing_stats()
        if reason is not None:
            raise ValueError(
                f"{what} has {reason} in {name}; export a width with statistics, or calibrate BN statistics for "
                "this width first (slimmable.train.calibrate_bn)"
            )


def _densify(
    dense: nn.Module,
    src: nn.Module,
    example: torch.Tensor | None,
    fold_bn: bool,
    width: float | None,
    reset_bn_stats: bool = False,
) -> nn.Module:
    """Replace every slimmable layer of ``dense`` (a switched copy) by its plain equivalent."""
    what = f"width {width:g}" if width is not None else "these channels"
    mods = list(slim_modules(dense, outermost=True))
    channels = get_channels(dense)
    x = example if example is not None else example_input(src, None)
    if reset_bn_stats:
        # Statistics are to be replaced, so record with batch statistics (a US layer has none stored for a mix of
        # widths); the copy's own statistics may change, they are discarded. Two images: BN needs more than one
        # value per channel in training mode.
        dense.train()
        x = x.expand(max(2, x.shape[0]), *x.shape[1:])
    try:
        seen = record_input_channels(dense, x)
    except RuntimeError as err:
        given = "the given example" if example is not None else "the default example"
        raise ValueError(
            f"the model cannot run at {what} on {given} of shape {tuple(x.shape)}: {err}; pass example= an input "
            "of the size the model takes"
        ) from err
    finally:
        dense.eval()
    missing = [n or type(m).__name__ for n, m in mods if n not in seen]
    if missing:
        raise ValueError(
            f"layers {missing[:5]} did not run in the forward pass, so their input channels are unknown; pass an "
            "example input that exercises every layer"
        )
    replacements = {name: _dense_layer(name, m, seen[name], reset_bn_stats) for name, m in mods}
    if "" in replacements:  # the model itself is a single slimmable layer
        dense = replacements.pop("")
    for name, new in replacements.items():
        parent_name, _, child = name.rpartition(".")
        parent = dense.get_submodule(parent_name) if parent_name else dense
        setattr(parent, child, new)
    if reset_bn_stats:
        for m in dense.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.reset_running_stats()
    dense.eval()
    n_folded = fold_batchnorm(dense) if fold_bn else 0
    assert is_dense(dense), "a slimmable layer survived the export"
    dense.export_info = {"width": width, "channels": channels, "fold_bn": bool(fold_bn), "source": model_label(src)}
    _logger.debug("exported %s at %s: %d layers replaced, %d BN folded", model_label(src), what, len(mods), n_folded)
    return dense


def _new_conv(src: nn.Conv2d, cin: int, cout: int, groups: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(
        cin,
        cout,
        src.kernel_size,
        src.stride,
        src.padding,
        src.dilation,
        groups,
        bias,
        src.padding_mode,
        device="meta",
    )


def _dense_layer(name: str, m: SlimModule, cin: int, reset_bn_stats: bool = False) -> nn.Module:
    """``m.to_dense``, its errors naming the layer."""
    try:
        return m.to_dense(cin, fresh_stats=reset_bn_stats)
    except ValueError as err:
        raise ValueError(f"{name or type(m).__name__}: {err}") from err


def default_widths(model: nn.Module, limit: int = 8) -> tuple[float, ...]:
    """Widths to export or serve by default: the model's switches, or for a universally slimmable model (which
    stores BN statistics for many widths) at most ``limit`` of its statistics widths, evenly spaced, both ends
    included.

    Raises:
        TypeError: ``model`` has no ``widths`` attribute (not built by :func:`slimmable.create_model`).
    """
    src = unwrap_model(model)
    widths = tuple(float(w) for w in getattr(src, "widths", ()) or ())
    if not widths:
        raise TypeError(f"{type(src).__name__} has no widths; give the widths to export explicitly")
    if getattr(src, "width_range", None) is None or len(widths) <= limit:
        return widths
    picks = sorted({round(i * (len(widths) - 1) / (limit - 1)) for i in range(limit)})
    return tuple(widths[i] for i in picks)
