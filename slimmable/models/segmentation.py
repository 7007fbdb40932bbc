"""Slimmable semantic segmentation: torchvision's FCN, DeepLabV3 and LR-ASPP on slimmable backbones and heads.

The models are torchvision's own ``FCN``, ``DeepLabV3`` and ``LRASPP`` classes (their forward: the head's logits
upsampled bilinearly to the input size, ``{"out": ..., "aux": ...}``). The backbone is a features-only slimmable
network (``create_model(name, features_only=True, out_indices=..., out_names=...)``) returning the maps under the
names torchvision's heads read (``"out"``/``"aux"``, ``"low"``/``"high"``); the heads are torchvision's
``FCNHead``, ``DeepLabHead`` and ``LRASPPHead`` with every convolution a :class:`~slimmable.nn.SlimConv2d` and
every BN switchable. At width ``w`` a head's input channels follow the backbone's, its inner layers keep
``make_divisible(c * w)`` of their ``c`` channels, and the class logits stay whole. In the ASPP the five
concatenated branches each keep their leading channels, so the projection reads the matching columns of its
weight (:class:`~slimmable.nn.IndexedSlimConv2d`), not the first ``5 c_w``.

Registered models (task ``segmentation``):

* ``slim_fcn_resnet50`` and ``slim_deeplabv3_resnet50``: a dilated ResNet-50 (``layer3`` and ``layer4`` dilated
  instead of strided: output stride 8, as torchvision's ``fcn_resnet50`` / ``deeplabv3_resnet50``), an optional
  auxiliary FCN head on ``layer3`` (``aux_loss=True``);
* ``slim_lraspp_mobilenet_v2``: LR-ASPP (Howard et al. 2019) on MobileNet v2, low features from ``stage3``
  (stride 8, 32 channels at width 1.0), high features from ``stage7`` (stride 32, 320 channels: the last
  bottleneck, which Sandler et al. 2018 found the efficient input of a segmentation head, rather than the 1280
  channels of the 1x1 conv head).

At width 1.0 they compute what torchvision's models compute after :func:`slimmable.load_torchvision_weights`
(torchvision has no LR-ASPP on MobileNet v2: its equivalent is ``LRASPP`` on ``IntermediateLayerGetter(
mobilenet_v2().features, {"6": "low", "17": "high"})``, 32 and 320 channels). ``slimmable.set_width`` /
``slimmable.use_width`` switch the whole model; ``model.widths`` lists the switches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchvision.models.segmentation import FCN, LRASPP, DeepLabV3
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead

from ..nn import ChannelRule, IndexedSlimConv2d, WidthTable, make_divisible, set_width
from ._base import ChannelPlan, FeatureInfo, slim_conv_from
from ._registry import create_model, register_model

__all__ = [
    "SEGMENTER_KINDS",
    "create_slim_segmenter",
    "is_segmenter",
    "slim_deeplabv3_resnet50",
    "slim_fcn_resnet50",
    "slim_lraspp_mobilenet_v2",
]

SEGMENTER_KINDS = ("fcn", "deeplabv3", "lraspp")

# backbone name -> (registered classification model, its kwargs as a segmentation backbone,
#                   (position of the main map, of the auxiliary / low map) in its feature_info)
_BACKBONES: dict[str, tuple[str, dict[str, Any], tuple[int, int]]] = {
    # layer4 (out) and layer3 (aux), both at stride 8 once dilated
    "resnet50": ("slim_resnet50", {"replace_stride_with_dilation": (False, True, True)}, (4, 3)),
    # stage7 (high: stride 32, 320 channels) and stage3 (low: stride 8, 32 channels)
    "mobilenet_v2": ("slim_mobilenet_v2", {}, (7, 3)),
}
#: the heads each kind takes
_KIND_BACKBONES = {"fcn": ("resnet50",), "deeplabv3": ("resnet50",), "lraspp": ("mobilenet_v2",)}
_DEFAULT_RATES = (12, 24, 36)  # torchvision's DeepLabHead
_SMALL_RATES = (3, 6, 9)  # small_input: maps of 7-14 px (28 px images at output stride 2-4)


def is_segmenter(model: nn.Module) -> bool:
    """``True`` for a torchvision segmentation model (``FCN``, ``DeepLabV3``, ``LRASPP``), slimmable or not."""
    return isinstance(model, (FCN, DeepLabV3, LRASPP))


def create_slim_segmenter(
    kind: str,
    backbone: str,
    *,
    widths: Sequence[float] | None = None,
    num_classes: int = 21,
    in_chans: int = 3,
    aux_loss: bool = False,
    norm: str = "switchable",
    small_input: bool = False,
    stem_stride: int | None = None,
    replace_stride_with_dilation: Sequence[bool] | None = None,
    atrous_rates: Sequence[int] | None = None,
    inter_channels: int | None = None,
) -> nn.Module:
    """Build torchvision's ``FCN``, ``DeepLabV3`` or ``LRASPP`` on a slimmable backbone with slimmable heads.

    Args:
        kind: ``fcn``, ``deeplabv3`` (ResNet-50 backbone) or ``lraspp`` (MobileNet v2 backbone).
        backbone: ``resnet50`` or ``mobilenet_v2``.
        widths: the switches (default the family's: 0.25..1.0 for ResNet-50, 0.35..1.0 for MobileNet v2); the heads
            take the same.
        num_classes: classes, the background included (default 21: torchvision's Pascal VOC); the same at every
            width.
        in_chans: image channels (1 for Fashion-MNIST-style grey images).
        aux_loss: add torchvision's auxiliary FCN head on ``layer3`` (FCN, DeepLabV3): the output then holds
            ``"aux"`` too.
        norm: BN kind of backbone and heads: ``switchable`` (one per width) or ``shared``.
        small_input: the backbone's stem for tiny images (28x28, 32x32): ResNet's 3x3 stem without max pooling
            (output stride 2 with the dilated stages, 4 with ``stem_stride=2``), MobileNet v2's stride-1 stem; the
            ASPP's default rates shrink to ``(3, 6, 9)``.
        stem_stride: ResNet with ``small_input``: the stem's stride (1 or 2).
        replace_stride_with_dilation: ResNet: which of ``layer2..layer4`` dilate instead of striding (default
            ``(False, True, True)``: output stride 8, as torchvision).
        atrous_rates: DeepLabV3: the ASPP's dilation rates (default torchvision's ``(12, 24, 36)``).
        inter_channels: LR-ASPP: the head's inner channels at width 1.0 (default torchvision's 128).

    Returns:
        The model, at its widest width, with ``widths``, ``width_range`` (``None``) and ``num_classes``
        attributes. Input ``(N, in_chans, H, W)`` → ``{"out": (N, num_classes, H, W)}`` (and ``"aux"``).

    Raises:
        ValueError: unknown kind or backbone, or an option the kind does not take.
    """
    if kind not in _KIND_BACKBONES:
        raise ValueError(f"segmentation model kind {kind!r} is not one of {SEGMENTER_KINDS}")
    if backbone not in _KIND_BACKBONES[kind]:
        raise ValueError(f"{kind} takes the backbone {' or '.join(_KIND_BACKBONES[kind])}, not {backbone!r}")
    resnet = backbone.startswith("resnet")
    refused = {
        "aux_loss": kind == "lraspp" and aux_loss,
        "atrous_rates": kind != "deeplabv3" and atrous_rates is not None,
        "inter_channels": kind != "lraspp" and inter_channels is not None,
        "stem_stride": not resnet and stem_stride is not None,
        "replace_stride_with_dilation": not resnet and replace_stride_with_dilation is not None,
    }
    for option, bad in refused.items():
        if bad:
            raise ValueError(f"{option} is not an option of slim_{kind}_{backbone}")
    body_name, body_kwargs, (main, extra) = _BACKBONES[backbone]
    body_kwargs = {**body_kwargs, "widths": widths, "in_chans": in_chans, "norm": norm, "small_input": small_input}
    if resnet:
        body_kwargs["stem_stride"] = stem_stride
        if replace_stride_with_dilation is not None:
            body_kwargs["replace_stride_with_dilation"] = tuple(bool(d) for d in replace_stride_with_dilation)
    if kind == "lraspp":
        indices, names = (extra, main), ("low", "high")
    else:
        indices, names = ((extra, main), ("aux", "out")) if aux_loss else ((main,), ("out",))
    body = create_model(body_name, features_only=True, out_indices=indices, out_names=names, **body_kwargs)
    infos = dict(zip(body.out_names, body.out_feature_info))
    plan = ChannelPlan(body.widths, make_divisible, norm=norm)
    model: nn.Module
    if kind == "lraspp":
        inner = plan.rule(inter_channels or 128)  # torchvision's 128 at width 1.0
        model = LRASPP(body, infos["low"].num_channels, infos["high"].num_channels, num_classes, inner.max_channels)
        _slim_head(model.classifier, plan, inner, whole=("low_classifier", "high_classifier"))
    else:
        if kind == "fcn":  # torchvision's FCNHead: in_channels // 4 inner channels, at every width
            head, inner = _fcn_head(infos["out"], body.widths, num_classes)
        else:
            rates = tuple(atrous_rates) if atrous_rates is not None else _SMALL_RATES if small_input else _DEFAULT_RATES
            inner = plan.rule(256)  # torchvision's ASPP channels at width 1.0
            head = _deeplab_head(infos["out"].num_channels, num_classes, rates, inner.max_channels)
        _slim_head(head, plan, inner, whole=(_last_conv(head),))
        aux = None
        if aux_loss:
            aux, aux_inner = _fcn_head(infos["aux"], body.widths, num_classes)
            _slim_head(aux, plan, aux_inner, whole=(_last_conv(aux),))
        model = (FCN if kind == "fcn" else DeepLabV3)(body, head, aux)
    model.widths = body.widths
    model.width_range = None
    model.num_classes = num_classes
    set_width(model, body.widths[-1])  # the heads start at the widest width, as the backbone
    return model


def _fcn_head(info: FeatureInfo, widths: Sequence[float], num_classes: int) -> tuple[FCNHead, WidthTable]:
    """torchvision's ``FCNHead`` on the map ``info`` describes, and its inner channels: the input's ``// 4`` at
    every width, as torchvision sizes it."""
    inner = WidthTable.build(widths, [info.channels(w) // 4 for w in widths])
    return FCNHead(info.num_channels, num_classes), inner


def _deeplab_head(in_channels: int, num_classes: int, rates: Sequence[int], channels: int) -> DeepLabHead:
    """torchvision's ``DeepLabHead`` (ASPP, 3x3 conv, BN, ReLU, 1x1 classifier) with ``channels`` inner channels
    (torchvision's fixed 256 at width 1.0; fewer for a model whose widest width is below 1.0)."""
    head = DeepLabHead(in_channels, num_classes, rates)
    if channels != 256:
        head[0] = ASPP(in_channels, rates, channels)
        head[1] = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        head[2] = nn.BatchNorm2d(channels)
        head[4] = nn.Conv2d(channels, num_classes, 1)
    return head


def _last_conv(head: nn.Module) -> str:
    return [name for name, m in head.named_modules() if isinstance(m, nn.Conv2d)][-1]


def _slim_head(head: nn.Module, plan: ChannelPlan, inner: ChannelRule, whole: Sequence[str]) -> None:
    """Make a torchvision head slimmable in place, keeping its module names (and so torchvision's state-dict keys).

    Every ``nn.Conv2d`` becomes a :class:`SlimConv2d` whose output follows ``inner`` (all the heads' inner layers
    have one size), except those named in ``whole`` (the class logits), which keep every output; each
    ``nn.BatchNorm2d`` becomes the plan's norm (switchable or shared) for ``inner``. An ASPP's projection reads
    each branch's leading channels (:class:`IndexedSlimConv2d`).
    """
    for parent_name, parent in list(head.named_modules()):
        for name, child in list(parent.named_children()):
            qualified = f"{parent_name}.{name}" if parent_name else name
            if type(child) is nn.Conv2d:
                rule = None if qualified in whole else inner
                if rule is not None and child.out_channels != inner.max_channels:
                    raise ValueError(
                        f"{qualified} has {child.out_channels} outputs; the head's inner layers {inner.max_channels}"
                    )
                setattr(parent, name, slim_conv_from(child, rule))
            elif type(child) is nn.BatchNorm2d:
                setattr(parent, name, plan.norm(inner, child.num_features))
    for module in head.modules():
        if isinstance(module, ASPP):
            _index_projection(module)


def _index_projection(aspp: ASPP) -> None:
    """The ASPP's 1x1 projection reads, of each of its ``n`` concatenated branches (``c`` channels at the widest
    width), the ``c_w`` leading channels that the branch keeps at width ``w``: columns ``k c + (0..c_w - 1)``."""
    conv = aspp.project[0]
    branch = aspp.convs[0][0]
    rule = branch.out_rule
    if not isinstance(rule, WidthTable):
        raise ValueError("the ASPP's projection takes the fixed switches of an S-Net (a WidthTable)")
    n, c = len(aspp.convs), branch.out_channels
    index = {
        w: None if cw == c else torch.cat([torch.arange(k * c, k * c + cw) for k in range(n)])
        for w, cw in zip(rule.widths, rule.channels)
    }
    aspp.project[0] = IndexedSlimConv2d(conv, conv.out_rule, index)


def _register(kind: str, backbone: str) -> Any:
    def builder(**kwargs: Any) -> nn.Module:
        return create_slim_segmenter(kind, backbone, **kwargs)

    builder.__name__ = builder.__qualname__ = f"slim_{kind}_{backbone}"
    what = {"fcn": "FCN", "deeplabv3": "DeepLabV3", "lraspp": "LR-ASPP"}[kind]
    builder.__doc__ = f"Slimmable {what} on a slimmable {backbone} (torchvision's {what}); see create_slim_segmenter."
    return register_model(task="segmentation")(builder)


slim_fcn_resnet50 = _register("fcn", "resnet50")
slim_deeplabv3_resnet50 = _register("deeplabv3", "resnet50")
slim_lraspp_mobilenet_v2 = _register("lraspp", "mobilenet_v2")
