"""Fill a slimmable model from torchvision weights: classification ResNets and MobileNet v2, and the R-50-FPN
Faster/Mask/Keypoint R-CNN detectors (``FrozenBatchNorm2d`` included).

Convolutions and linear layers take the torchvision tensor whole (every width uses its leading block, as after
slimmable training). Every width's BN switch is filled from the one torchvision BN: switch ``i`` takes the first
``c_i`` entries of its affine and running statistics. The model at width 1.0 then computes what the torchvision
model computes; narrower widths start from the same numbers (a starting point for training, not a trained
slimmable network).

Module names are translated explicitly per family (torchvision's ``layer2.0.conv1`` is our
``features.4.body.0``), never by position in the state dict.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .._utils import unwrap_model
from ._base import SlimNet
from .mobilenet_v2 import SlimMobileNetV2
from .resnet import SlimResNet

__all__ = ["load_torchvision_weights"]

_BN_LEAVES = ("weight", "bias", "running_mean", "running_var")


def load_torchvision_weights(model: nn.Module, source: nn.Module | Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy torchvision weights into a slimmable model, all or nothing.

    Args:
        model: a slimmable ``slim_resnet18/34/50/101``, ``slim_mobilenet_v2`` (built with ``norm="switchable"``)
            or a detector from :func:`slimmable.models.create_slim_detector` on one of those backbones.
        source: the torchvision model (``torchvision.models.resnet50()``, ``mobilenet_v2()``,
            ``detection.fasterrcnn_resnet50_fpn()``, ...) or its state dict. A classification source fills a
            detector's backbone only (its ``fc``/``classifier`` is dropped); a detector source fills everything.

    Returns:
        ``model``, loaded.

    Raises:
        ValueError: the source does not fit (another family or depth, other class count or input channels, keys
            left over or missing); the message names the keys and the fix. The model is left unchanged.
    """
    target = unwrap_model(model)
    sd = dict(source.state_dict() if isinstance(source, nn.Module) else source)
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError("source must be a torchvision model or its state dict (name -> tensor)")
    src_is_detector = any(k.startswith("backbone.body.") for k in sd)
    body = getattr(getattr(target, "backbone", None), "body", None)
    if isinstance(body, SlimNet):  # a detector
        body_prefix = "backbone.body."
        src_prefix = "backbone.body." if src_is_detector else ""
    elif isinstance(target, SlimNet):
        if src_is_detector:
            raise ValueError(
                "the source is a detector but the model is a classification network; load a detector's weights into "
                "a slim_*rcnn_* model, or give a torchvision classification model"
            )
        body, body_prefix, src_prefix = target, "", ""
    else:
        raise TypeError(
            f"{type(target).__name__} is neither a slimmable classification model nor a slimmable detector; build it "
            "with slimmable.create_model"
        )
    own = target.state_dict()
    new: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    problems: list[str] = []

    def take(src_key: str, dst_key: str, rows: int | None = None) -> None:
        if src_key not in sd:
            problems.append(f"missing in the source: {src_key} (for {dst_key})")
            return
        t = sd[src_key]
        if rows is not None:
            t = t[:rows]
        if t.shape != own[dst_key].shape:
            problems.append(f"{src_key} {tuple(sd[src_key].shape)} does not fit {dst_key} {tuple(own[dst_key].shape)}")
            return
        new[dst_key] = t.detach().to(own[dst_key].dtype)
        used.add(src_key)

    for src_mod, dst_mod, kind in _body_pairs(body, classify=body is target):
        s, d = src_prefix + src_mod, body_prefix + dst_mod
        if not any(k.startswith(d + ".") for k in own):  # a layer a detector's backbone drops (after its last stage)
            used.update(k for k in sd if k.startswith(s + "."))
            continue
        if kind in ("conv", "linear"):
            for leaf in ("weight", "bias"):
                if f"{d}.{leaf}" in own:
                    take(f"{s}.{leaf}", f"{d}.{leaf}")
            continue
        # a BN: every switch (or the plain BN) from the one source BN
        for key in own:
            if not key.startswith(d + "."):
                continue
            leaf = key.rsplit(".", 1)[1]
            if leaf in _BN_LEAVES:
                take(f"{s}.{leaf}", key, rows=own[key].shape[0])
        sd_nbt = f"{s}.num_batches_tracked"
        if sd_nbt in sd:
            used.add(sd_nbt)
    if body is not target and src_is_detector:  # FPN, RPN, RoI heads: same names as torchvision's
        for key in own:
            if not key.startswith(body_prefix) and key not in new:
                take(key, key)
    missing = [k for k in own if k not in new and not k.endswith("num_batches_tracked")]
    if body is not target and not src_is_detector:
        missing = [k for k in missing if k.startswith(body_prefix)]
        for key in own:  # a classification source fills the backbone; the rest keeps its values
            if key not in new and not key.startswith(body_prefix):
                new[key] = own[key]
        unused = [k for k in sd if k not in used and not k.startswith(("fc.", "classifier."))]
    else:
        unused = [k for k in sd if k not in used]
    unused = [k for k in unused if not k.endswith("num_batches_tracked")]
    if missing:
        problems.append(f"{len(missing)} model entries not filled, e.g. {missing[:4]}")
    if unused:
        problems.append(f"{len(unused)} source entries without a place in the model, e.g. {unused[:4]}")
    if problems:
        raise ValueError(
            f"torchvision weights do not fit {type(target).__name__} ({type(body).__name__} backbone, "
            f"{_describe(body)}):\n  " + "\n  ".join(problems[:8]) + "\nBuild the model to match the source "
            "(depth, in_chans, num_classes, num_keypoints; norm='switchable'), or pick the matching source model"
        )
    for key, value in own.items():  # num_batches_tracked and anything left keeps the model's value
        new.setdefault(key, value)
    target.load_state_dict(new, strict=True)
    for m in target.modules():
        if hasattr(m, "clear_weight_memo"):
            m.clear_weight_memo()
    return model


def _describe(body: nn.Module) -> str:
    if isinstance(body, SlimResNet):
        return f"depth {sum(body.stage_depths) * (3 if _is_bottleneck(body) else 2) + 2}"
    return type(body).__name__


def _is_bottleneck(body: SlimResNet) -> bool:
    return len(body.features[1].body) == 8  # type: ignore[index,arg-type]


def _body_pairs(body: nn.Module, classify: bool) -> Iterator[tuple[str, str, str]]:
    """``(torchvision module, our module, kind)`` for every weighted layer of ``body``."""
    if isinstance(body, SlimResNet):
        yield from _resnet_pairs(body)
        tv_head = "fc"
    elif isinstance(body, SlimMobileNetV2):
        if body.width_range is not None:
            raise ValueError("load_torchvision_weights fills S-Nets; a universally slimmable MobileNet v2 is not one")
        yield from _mobilenet_v2_pairs(body)
        tv_head = "classifier.1"
    else:
        raise TypeError(f"no torchvision counterpart for {type(body).__name__}; supported: SlimResNet, SlimMobileNetV2")
    if classify:
        linear = next(i for i, m in enumerate(body.classifier) if isinstance(m, nn.Linear))  # type: ignore[arg-type]
        yield tv_head, f"classifier.{linear}", "linear"


def _resnet_pairs(body: SlimResNet) -> Iterator[tuple[str, str, str]]:
    yield "conv1", "features.0.0", "conv"
    yield "bn1", "features.0.1", "bn"
    bottleneck = _is_bottleneck(body)
    # torchvision conv/bn number -> our body index
    names = (("conv1", 0), ("bn1", 1), ("conv2", 3), ("bn2", 4)) + ((("conv3", 6), ("bn3", 7)) if bottleneck else ())
    k = 1
    for stage, depth in enumerate(body.stage_depths):
        for b in range(depth):
            tv, ours = f"layer{stage + 1}.{b}", f"features.{k}"
            for name, idx in names:
                yield f"{tv}.{name}", f"{ours}.body.{idx}", name[:-1] if name.startswith("conv") else "bn"
            if hasattr(body.features[k], "shortcut"):  # type: ignore[index]
                yield f"{tv}.downsample.0", f"{ours}.shortcut.0", "conv"
                yield f"{tv}.downsample.1", f"{ours}.shortcut.1", "bn"
            k += 1


def _mobilenet_v2_pairs(body: SlimMobileNetV2) -> Iterator[tuple[str, str, str]]:
    yield "features.0.0", "features.0.0", "conv"
    yield "features.0.1", "features.0.1", "bn"
    n = len(body.features)
    for k in range(1, n - 2):  # the inverted residual blocks
        expand = len(body.features[k].body) == 8  # type: ignore[index,arg-type]
        tv = f"features.{k}.conv"
        if expand:  # conv.0 expand (conv, bn), conv.1 depthwise (conv, bn), conv.2 project, conv.3 its bn
            pairs: Any = (("0.0", 0, "conv"), ("0.1", 1, "bn"), ("1.0", 3, "conv"), ("1.1", 4, "bn"))
            pairs += (("2", 6, "conv"), ("3", 7, "bn"))
        else:  # conv.0 depthwise (conv, bn), conv.1 project, conv.2 its bn
            pairs = (("0.0", 0, "conv"), ("0.1", 1, "bn"), ("1", 3, "conv"), ("2", 4, "bn"))
        for tv_idx, idx, kind in pairs:
            yield f"{tv}.{tv_idx}", f"features.{k}.body.{idx}", kind
    yield f"features.{n - 2}.0", f"features.{n - 2}.0", "conv"
    yield f"features.{n - 2}.1", f"features.{n - 2}.1", "bn"
