"""Slimmable Faster, Mask and Keypoint R-CNN: torchvision's detectors on a slimmable backbone.

The detectors are torchvision's own ``FasterRCNN``, ``MaskRCNN`` and ``KeypointRCNN``; only the backbone is ours:
:class:`SlimBackboneWithFPN` runs a features-only :class:`~slimmable.models.SlimNet`
(``create_model(name, features_only=True, out_indices=...)``) and feeds the stages named in ``out_indices`` to
torchvision's ``FeaturePyramidNetwork``.

What is slimmable (Yu et al., ICLR 2019, Sec. 4.2): by default only the backbone. The FPN, RPN and RoI heads keep
their full width and are shared by every width. The FPN's lateral 1x1 convolutions are
:class:`~slimmable.nn.SlimConv2d` with no output rule, so they read only the active channels of each stage; that
equals the official code's zero-padding of each stage output back to full width (the padded channels meet weights
that multiply zeros), without computing on the zeros. ``slim_heads=True`` also slims the FPN and the heads (see
:func:`slim_detector_heads`), a variant the paper did not publish.

``slimmable.set_width(model, w)`` / ``slimmable.use_width(model, w)`` switch the whole detector. Each width's BN is
trainable (``frozen_bn=False``: training from scratch) or frozen (``frozen_bn=True``: statistics and affine of every
width fixed, the paper's fine-tuning of a pretrained S-Net, as torchvision's ``FrozenBatchNorm2d``).

Registered models: ``slim_{fasterrcnn,maskrcnn,keypointrcnn}_resnet50_fpn`` (torchvision's R-50-FPN settings:
COCO classes, 800-1333 px, 256 FPN channels; state-dict compatible with torchvision's detectors through
:func:`slimmable.load_torchvision_weights`), and small CPU variants ``..._resnet18_fpn`` and
``..._mobilenet_v2_fpn`` sized for 128x128 one-channel scenes (:mod:`slimmable.data.scenes`).
"""

from __future__ import annotations

import inspect
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, KeypointRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from .._checkpoint_files import load_official_checkpoint, official_state_dict, read_checkpoint_file
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..nn import SlimLinear, WidthTable, make_divisible, set_width
from ._base import SlimNet, slim_conv_from
from ._registry import create_model, register_model

__all__ = [
    "DETECTOR_KINDS",
    "SlimBackboneWithFPN",
    "create_slim_detector",
    "is_detector",
    "load_official_backbone",
    "slim_detector_heads",
    "slim_fasterrcnn_mobilenet_v2_fpn",
    "slim_fasterrcnn_resnet18_fpn",
    "slim_fasterrcnn_resnet50_fpn",
    "slim_keypointrcnn_mobilenet_v2_fpn",
    "slim_keypointrcnn_resnet18_fpn",
    "slim_keypointrcnn_resnet50_fpn",
    "slim_maskrcnn_mobilenet_v2_fpn",
    "slim_maskrcnn_resnet18_fpn",
    "slim_maskrcnn_resnet50_fpn",
]

DETECTOR_KINDS = ("fasterrcnn", "maskrcnn", "keypointrcnn")
M = TypeVar("M", bound=nn.Module)
_DETECTOR_CLASSES: dict[str, type[FasterRCNN]] = {
    "fasterrcnn": FasterRCNN,
    "maskrcnn": MaskRCNN,
    "keypointrcnn": KeypointRCNN,
}

# backbone name -> (registered classification model, default stages fed to the FPN: positions in its feature_info);
# built by create_model(model, features_only=True, out_indices=...)
_BACKBONES: dict[str, tuple[str, tuple[int, ...]]] = {
    "resnet50": ("slim_resnet50", (1, 2, 3, 4)),  # layer1..layer4, strides 4..32
    "resnet18": ("slim_resnet18", (1, 2, 3, 4)),
    # stage2 (stride 4, 24 ch), stage3 (8, 32), stage5 (16, 96), stage7 (32, 320): every level slimmable
    "mobilenet_v2": ("slim_mobilenet_v2", (2, 3, 5, 7)),
}

#: the small variants' defaults: 128x128 scenes with 10 classes (+ background) and 5 keypoints per object
_SMALL_IMAGE = 128
_SMALL_FPN_CHANNELS = 64
_SMALL_DEFAULTS: dict[str, Any] = {
    "min_size": _SMALL_IMAGE,
    "max_size": _SMALL_IMAGE,
    "rpn_pre_nms_top_n_train": 600,
    "rpn_pre_nms_top_n_test": 300,
    "rpn_post_nms_top_n_train": 300,
    "rpn_post_nms_top_n_test": 100,
    "rpn_batch_size_per_image": 64,
    "box_batch_size_per_image": 64,
    "box_detections_per_img": 20,
}


class SlimBackboneWithFPN(nn.Module):
    """A slimmable network's stages under torchvision's ``FeaturePyramidNetwork`` (as ``BackboneWithFPN``).

    Args:
        body: a features-only slimmable network (``create_model(name, features_only=True, out_indices=...)``), whose
            maps feed the FPN, shallow to deep; or a whole one, made features-only here for ``out_indices``.
        out_indices: positions in ``body.feature_info`` fed to the FPN (default: the body's ``out_indices``).
        out_channels: FPN channels (torchvision: 256).
        frozen_bn: keep every BN of the body in eval mode with fixed affine (fine-tuning a pretrained S-Net).
        extra_blocks: the FPN's extra block (default ``LastLevelMaxPool``: the ``"pool"`` level).

    Shape:
        ``(N, in_chans, H, W)`` → ``{"0": P2, ..., "3": P5, "pool": P6}``, each ``(N, out_channels, H/s, W/s)``.
    """

    def __init__(
        self,
        body: SlimNet,
        out_indices: Sequence[int] | None = None,
        out_channels: int = 256,
        *,
        frozen_bn: bool = False,
        extra_blocks: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if out_indices is not None or body.out_indices is None:
            # What runs after the last stage used (the classifier, MobileNet v2's 1x1 conv head) is dropped, as
            # torchvision's IntermediateLayerGetter does: it would hold parameters without gradients.
            body.as_features_only(out_indices)
        assert body.out_indices is not None
        self.out_indices = body.out_indices
        self.body = body
        infos = body.out_feature_info
        self.in_chans = _first_conv(body).in_channels
        self.fpn = FeaturePyramidNetwork(
            [f.num_channels for f in infos], out_channels, extra_blocks=extra_blocks or LastLevelMaxPool()
        )
        # Lateral convs read the active channels of each stage (= the paper's zero-padding to full width).
        for block in self.fpn.inner_blocks:
            block[0] = slim_conv_from(block[0], out_rule=None)
        self.out_channels = out_channels
        self.frozen_bn = bool(frozen_bn)
        if self.frozen_bn:
            for m in self.body.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    for p in m.parameters(recurse=False):
                        p.requires_grad_(False)
            self.train(self.training)

    def train(self, mode: bool = True) -> SlimBackboneWithFPN:
        """As ``nn.Module.train``; with ``frozen_bn`` the body's BN layers stay in eval mode."""
        super().train(mode)
        if self.frozen_bn:
            for m in self.body.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"the detector's backbone takes {self.in_chans}-channel images but got {x.shape[1]} channels; "
                f"convert the images (e.g. PIL .convert({'L' if self.in_chans == 1 else 'RGB'!r})) or build the "
                f"model with in_chans={x.shape[1]}"
            )
        stages = self.body(x)
        return self.fpn(OrderedDict((str(i), t) for i, t in enumerate(stages.values())))


def _slim_linear_from(lin: nn.Linear, out_rule: WidthTable | None) -> SlimLinear:
    new = SlimLinear(
        lin.in_features, lin.out_features, lin.bias is not None, out_rule=out_rule, device=lin.weight.device
    )
    with torch.no_grad():
        new.weight.copy_(lin.weight)
        if lin.bias is not None:
            new.bias.copy_(lin.bias)
    return new


def _first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def _rule(widths: Sequence[float], channels: int) -> WidthTable:
    return WidthTable.build(widths, lambda w: make_divisible(channels * w))


def slim_detector_heads(model: FasterRCNN, widths: Sequence[float]) -> FasterRCNN:
    """Slim the FPN and the heads of a detector built on :class:`SlimBackboneWithFPN`, in place (``slim_heads``).

    At width ``w`` the FPN's and RPN's convolutions, the box head's two hidden layers and the mask and keypoint
    heads' hidden convolutions keep ``make_divisible(c * w)`` of their ``c`` output channels; the predictors'
    outputs (classes, box deltas, mask logits, keypoint heatmaps) stay whole. The last convolution of the mask and
    keypoint heads keeps its full output, because torchvision's predictors start with a transposed convolution,
    which is not slimmable. Module names (and so state-dict keys) do not change.

    Returns:
        ``model``.
    """
    backbone = model.backbone
    if not isinstance(backbone, SlimBackboneWithFPN):
        raise TypeError(f"slim_detector_heads needs a SlimBackboneWithFPN backbone, got {type(backbone).__name__}")
    fpn = backbone.fpn
    c = backbone.out_channels
    for blocks in (fpn.inner_blocks, fpn.layer_blocks):
        for block in blocks:
            block[0] = slim_conv_from(block[0], _rule(widths, c))
    head = model.rpn.head
    head.conv[0][0] = slim_conv_from(head.conv[0][0], _rule(widths, head.conv[0][0].out_channels))
    head.cls_logits = slim_conv_from(head.cls_logits, None)
    head.bbox_pred = slim_conv_from(head.bbox_pred, None)
    roi = model.roi_heads
    for name in ("fc6", "fc7"):
        lin = getattr(roi.box_head, name)
        setattr(roi.box_head, name, _slim_linear_from(lin, _rule(widths, lin.out_features)))
    for name in ("cls_score", "bbox_pred"):
        setattr(roi.box_predictor, name, _slim_linear_from(getattr(roi.box_predictor, name), None))
    for head_name in ("mask_head", "keypoint_head"):
        seq = getattr(roi, head_name, None)
        if seq is None:
            continue
        # mask head: Conv2dNormActivation blocks (conv at [0]); keypoint head: convs between ReLUs
        sites = [(blk, "0") if isinstance(blk, nn.Sequential) else (seq, key) for key, blk in seq.named_children()]
        sites = [(parent, key) for parent, key in sites if isinstance(parent._modules[key], nn.Conv2d)]
        for i, (parent, key) in enumerate(sites):
            conv = parent._modules[key]
            last = i == len(sites) - 1
            parent._modules[key] = slim_conv_from(conv, None if last else _rule(widths, conv.out_channels))
    return model


def is_detector(model: nn.Module) -> bool:
    """``True`` for a torchvision R-CNN detector (slimmable or exported)."""
    return isinstance(model, FasterRCNN)


def detector_option_names(kind: str) -> list[str]:
    """The keyword arguments torchvision's detector class of ``kind`` accepts: its ``__init__`` and those of its
    bases, plus the ``GeneralizedRCNNTransform`` arguments ``FasterRCNN`` passes its ``**kwargs`` to."""
    names: set[str] = set()
    for cls in (*_DETECTOR_CLASSES[kind].__mro__, GeneralizedRCNNTransform):
        init = cls.__dict__.get("__init__")
        if init is None or cls.__module__.startswith("torch.nn"):
            continue
        for p in inspect.signature(init).parameters.values():
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and not p.name.startswith("_"):
                names.add(p.name)
    return sorted(names - {"backbone", "rpn", "roi_heads", "transform"})  # GeneralizedRCNN's: built by FasterRCNN


_COUNT_SUFFIXES = ("_size", "_top_n_train", "_top_n_test", "_per_image", "_per_img", "num_keypoints", "fpn_channels")


def _check_detector_options(kind: str, options: Mapping[str, Any]) -> None:
    """Unknown keys (torchvision's ``**kwargs`` would swallow them silently) and counts or thresholds out of range:
    one ValueError naming the option."""
    known = detector_option_names(kind)
    for key, value in options.items():
        if value is None:
            continue
        if key not in known and key not in ("num_keypoints", "fpn_channels"):
            raise ValueError(
                f"model option {key!r} is not an argument of torchvision's {_DETECTOR_CLASSES[kind].__name__}; "
                f"known: {', '.join(known)}"
            )
        if key.endswith(_COUNT_SUFFIXES) or key == "size_divisible":
            several = key.endswith("_size") and isinstance(value, (list, tuple))  # min_size (multi-scale), fixed_size
            if not all(_positive_int(v) for v in (value if several else [value])) or (several and not value):
                kind_of = "an int >= 1 (or a list of them)" if key.endswith("_size") else "an int >= 1"
                raise ValueError(f"model option {key} must be {kind_of}, got {value!r}")
        elif "thresh" in key or key.endswith("_fraction"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"model option {key} must be a number in [0, 1], got {value!r}")
        elif key in ("image_mean", "image_std"):
            ok = (
                isinstance(value, (list, tuple))
                and value
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            )
            if not ok or (key == "image_std" and min(value) <= 0):
                raise ValueError(f"model option {key} must be a list of finite numbers (std > 0), got {value!r}")


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def create_slim_detector(
    kind: str,
    backbone: str,
    *,
    widths: Sequence[float] | None = None,
    num_classes: int | None = None,
    num_keypoints: int | None = None,
    in_chans: int | None = None,
    frozen_bn: bool = False,
    slim_heads: bool = False,
    norm: str = "switchable",
    out_indices: Sequence[int] | None = None,
    fpn_channels: int | None = None,
    small: bool = False,
    **detector_kwargs: Any,
) -> FasterRCNN:
    """Build a torchvision ``FasterRCNN``/``MaskRCNN``/``KeypointRCNN`` on a slimmable backbone with FPN.

    Args:
        kind: ``fasterrcnn``, ``maskrcnn`` or ``keypointrcnn``.
        backbone: ``resnet50``, ``resnet18`` or ``mobilenet_v2``.
        widths: the backbone's switches (default the family's: 0.25..1.0 for ResNets, 0.35..1.0 for MobileNet v2).
        num_classes: classes including the background (default: 91 COCO ids, 2 for Keypoint R-CNN; small
            variants: 11, the 10 Fashion-MNIST classes of :mod:`slimmable.data.scenes` and the background).
        num_keypoints: Keypoint R-CNN's keypoints per object (default 17, COCO persons; small variants 5).
        in_chans: image channels (default 3; small variants 1). One-channel images into a three-channel model are
            broadcast by the normalisation (grey replicated); three-channel images into a one-channel model are an
            error.
        frozen_bn: freeze every width's BN (eval mode, fixed affine): fine-tuning a pretrained S-Net.
        slim_heads: also slim the FPN and heads (:func:`slim_detector_heads`).
        norm: the backbone's BN kind, ``switchable`` (one per width) or ``shared``.
        out_indices: positions in the backbone's ``feature_info`` fed to the FPN (default: 4 levels, strides 4-32).
        fpn_channels: FPN channels (default 256; small variants 64).
        small: the small-variant defaults (128 px images, fewer proposals and samples, light heads).
        **detector_kwargs: passed to torchvision's detector class (``min_size``, ``max_size``, ``image_mean``,
            ``rpn_batch_size_per_image``, ``box_score_thresh``, ...); they override the defaults.

    Returns:
        The detector, with ``widths`` and ``width_range`` (``None``) attributes like the classification models.

    Raises:
        ValueError: unknown kind or backbone, ``num_keypoints`` given for a detector without keypoints, an option
            torchvision's detector class does not take, or a count (< 1) or threshold (outside [0, 1]) out of range.
    """
    if kind not in _DETECTOR_CLASSES:
        raise ValueError(f"detector kind {kind!r} is not one of {DETECTOR_KINDS}")
    if backbone not in _BACKBONES:
        raise ValueError(f"detection backbone {backbone!r} is not one of {sorted(_BACKBONES)}")
    if num_keypoints is not None and kind != "keypointrcnn":
        raise ValueError(f"num_keypoints={num_keypoints} is only for keypointrcnn models, not {kind}")
    _check_detector_options(kind, {"num_keypoints": num_keypoints, "fpn_channels": fpn_channels, **detector_kwargs})
    body_name, default_indices = _BACKBONES[backbone]
    in_chans = in_chans if in_chans is not None else (1 if small else 3)
    body = create_model(
        body_name,
        features_only=True,
        out_indices=out_indices or default_indices,
        widths=widths,
        in_chans=in_chans,
        norm=norm,
    )
    fpn_c = fpn_channels if fpn_channels is not None else (_SMALL_FPN_CHANNELS if small else 256)
    trunk = SlimBackboneWithFPN(body, None, fpn_c, frozen_bn=frozen_bn)
    kwargs: dict[str, Any] = {}
    if small:
        kwargs.update(_SMALL_DEFAULTS)
        kwargs["rpn_anchor_generator"] = AnchorGenerator(((16,), (32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 5)
        rep = 256
        kwargs["box_head"] = TwoMLPHead(fpn_c * 7 * 7, rep)
        classes = num_classes if num_classes is not None else 11
        kwargs["box_predictor"] = FastRCNNPredictor(rep, classes)
        if kind == "maskrcnn":
            kwargs["mask_head"] = MaskRCNNHeads(fpn_c, (fpn_c, fpn_c), 1)
            kwargs["mask_predictor"] = MaskRCNNPredictor(fpn_c, fpn_c, classes)
        if kind == "keypointrcnn":
            kwargs["keypoint_head"] = KeypointRCNNHeads(fpn_c, (fpn_c,) * 4)
            kwargs["keypoint_predictor"] = KeypointRCNNPredictor(fpn_c, num_keypoints or 5)
    else:
        classes = num_classes if num_classes is not None else (2 if kind == "keypointrcnn" else 91)
        kwargs["num_classes"] = classes
        if kind == "keypointrcnn":
            kwargs["num_keypoints"] = num_keypoints if num_keypoints is not None else 17
    if in_chans == 3:
        kwargs["image_mean"], kwargs["image_std"] = list(IMAGENET_MEAN), list(IMAGENET_STD)
    else:  # the mean over ImageNet's channels, for grey images
        kwargs["image_mean"], kwargs["image_std"] = [0.449] * in_chans, [0.226] * in_chans
    kwargs.update(detector_kwargs)
    model = _DETECTOR_CLASSES[kind](trunk, **kwargs)
    if slim_heads:
        slim_detector_heads(model, body.widths)
    model.widths = body.widths
    model.width_range = None
    set_width(model, body.widths[-1])  # layers added here start at the widest width, as the backbone
    model.num_classes = classes
    return model


def load_official_backbone(checkpoint: str | os.PathLike[str] | Mapping[str, Any], model: M) -> M:
    """Load an official S-Net ImageNet checkpoint (e.g. ``s_resnet``, the paper's S-ResNet-50) into a detector's
    or segmentation model's backbone, every width's BN included; the checkpoint's classifier (and any layer after
    the backbone's last stage) is dropped. All or nothing.

    Args:
        checkpoint: a path or the loaded object (``{'model': state_dict}`` with ``module.`` keys, or a state dict).
        model: a detector from :func:`create_slim_detector` or a segmentation model from
            :func:`slimmable.models.create_slim_segmenter` whose backbone has the checkpoint's family and widths
            (dilation changes no weight: ``s_resnet`` fits the dilated ResNet-50 of ``slim_fcn_resnet50``).

    Returns:
        ``model``.

    Raises:
        CheckpointError: unreadable, or keys/shapes/widths that do not fit the backbone (model left unchanged).
        TypeError: the model has no slimmable backbone.
    """
    backbone = getattr(model, "backbone", None)
    body = backbone.body if isinstance(backbone, SlimBackboneWithFPN) else backbone
    if not isinstance(body, SlimNet):
        raise TypeError(f"{type(model).__name__} has no slimmable backbone to load an official checkpoint into")
    source = str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "checkpoint"
    obj = read_checkpoint_file(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    kept = set(body.state_dict())
    # the classifier and the layers after the backbone's last stage (dropped: features-only) are not loaded
    dropped = tuple(f"{name}." for name in body.dropped_layers())
    sd = {k: v for k, v in official_state_dict(obj, source).items() if k in kept or not k.startswith(dropped)}
    load_official_checkpoint(sd, body)
    for m in body.modules():  # memoised narrowed weights are stale
        if hasattr(m, "clear_weight_memo"):
            m.clear_weight_memo()
    return model


def _register(kind: str, backbone: str, small: bool) -> Callable[..., FasterRCNN]:
    def builder(**kwargs: Any) -> FasterRCNN:
        return create_slim_detector(kind, backbone, small=small, **kwargs)

    builder.__name__ = builder.__qualname__ = f"slim_{kind}_{backbone}_fpn"
    size = "small variant for 128x128 scenes" if small else "torchvision's R-50-FPN settings"
    builder.__doc__ = f"Slimmable {kind} with {backbone} FPN backbone ({size}); see create_slim_detector."
    return register_model(task="detection")(builder)  # type: ignore[return-value]


slim_fasterrcnn_resnet50_fpn = _register("fasterrcnn", "resnet50", False)
slim_maskrcnn_resnet50_fpn = _register("maskrcnn", "resnet50", False)
slim_keypointrcnn_resnet50_fpn = _register("keypointrcnn", "resnet50", False)
slim_fasterrcnn_resnet18_fpn = _register("fasterrcnn", "resnet18", True)
slim_maskrcnn_resnet18_fpn = _register("maskrcnn", "resnet18", True)
slim_keypointrcnn_resnet18_fpn = _register("keypointrcnn", "resnet18", True)
slim_fasterrcnn_mobilenet_v2_fpn = _register("fasterrcnn", "mobilenet_v2", True)
slim_maskrcnn_mobilenet_v2_fpn = _register("maskrcnn", "mobilenet_v2", True)
slim_keypointrcnn_mobilenet_v2_fpn = _register("keypointrcnn", "mobilenet_v2", True)
