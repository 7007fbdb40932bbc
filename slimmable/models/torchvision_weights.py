"""Fill a slimmable model from torchvision weights: classification ResNets and MobileNet v2, the R-50-FPN
Faster/Mask/Keypoint R-CNN detectors (``FrozenBatchNorm2d`` included), and the FCN, DeepLabV3 and LR-ASPP
segmentation models.

Convolutions and linear layers take the torchvision tensor whole (every width uses its leading block, as after
slimmable training). Every width's BN switch is filled from the one torchvision BN: switch ``i`` takes the first
``c_i`` entries of its affine and running statistics. The model at width 1.0 then computes what the torchvision
model computes; narrower widths start from the same numbers (a starting point for training, not a trained
slimmable network).

This module only dispatches and copies: how torchvision names a family's layers is the family's own knowledge
(:meth:`SlimNet.torchvision_layers <slimmable.models.SlimNet.torchvision_layers>`: torchvision's
``layer2.0.conv1`` is our ``features.4.body.0``), never a position in the state dict. The layers of a detector or
segmentation model outside its backbone (FPN, RPN, RoI heads, segmentation heads) carry torchvision's own names.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .._utils import unwrap_model
from ..nn import SwitchableBatchNorm2d
from ._base import SlimNet

__all__ = ["load_torchvision_weights"]

_BN_LEAVES = ("weight", "bias", "running_mean", "running_var")
#: what each kind of model is called in messages
_KIND = {"classification": "classification network", "detection": "detector", "segmentation": "segmentation model"}


def load_torchvision_weights(model: nn.Module, source: nn.Module | Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy torchvision weights into a slimmable model, all or nothing.

    Args:
        model: a slimmable ``slim_resnet18/34/50/101``, ``slim_mobilenet_v2`` (built with ``norm="switchable"``),
            a detector from :func:`slimmable.models.create_slim_detector` on one of those backbones, or a
            segmentation model (``slim_fcn_resnet50``, ``slim_deeplabv3_resnet50``, ``slim_lraspp_mobilenet_v2``).
        source: the torchvision model (``torchvision.models.resnet50()``, ``mobilenet_v2()``,
            ``detection.fasterrcnn_resnet50_fpn()``, ``segmentation.fcn_resnet50()``, ...) or its state dict. A
            classification source fills a detector's or segmentation model's backbone only (its
            ``fc``/``classifier`` is dropped); a detector (segmentation) source fills a whole detector
            (segmentation model).

    Returns:
        ``model``, loaded.

    Raises:
        ValueError: the source does not fit (another family, depth or task, other class count or input channels,
            an auxiliary head on one side only, keys left over or missing); the message names the keys and the
            fix. The model is left unchanged.
        TypeError: the model is none of the above.
    """
    target = unwrap_model(model)
    sd = dict(source.state_dict() if isinstance(source, nn.Module) else source)
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError("source must be a torchvision model or its state dict (name -> tensor)")
    task, body, body_prefix = _target(target)
    src_task = _source_task(sd)
    if src_task != "classification" and src_task != task:
        hint = f"a slim_* {src_task} model" if task == "classification" else f"a torchvision {_KIND[task]}"
        raise ValueError(
            f"the source is a {_KIND[src_task]} but the model is a {_KIND[task]}; load a {_KIND[src_task]}'s weights "
            f"into {hint}, or give a torchvision classification model"
        )
    whole = src_task == task  # the source fills every layer; else (a classifier's weights) the backbone only
    src_prefix = body_prefix if whole else ""
    # torchvision's detectors and segmentation models on a MobileNet take its ``features`` as their backbone
    trunk = body.torchvision_trunk
    strip = f"{trunk}." if whole and task != "classification" and trunk else ""
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

    def take_norm(src_mod: str, dst_mod: str) -> None:
        """Every switch of a BN (or the plain BN) from the one source BN."""
        for key in own:
            if key.startswith(dst_mod + ".") and key.rsplit(".", 1)[1] in _BN_LEAVES:
                take(f"{src_mod}.{key.rsplit('.', 1)[1]}", key, rows=own[key].shape[0])
        if f"{src_mod}.num_batches_tracked" in sd:
            used.add(f"{src_mod}.num_batches_tracked")

    for src_mod, dst_mod, kind in _body_pairs(body, classify=task == "classification"):
        s = src_prefix + (src_mod.removeprefix(strip) if strip and src_mod.startswith(strip) else src_mod)
        d = body_prefix + dst_mod
        if not any(k.startswith(d + ".") for k in own):  # a layer a backbone drops (after its last stage used)
            used.update(k for k in sd if k.startswith(s + "."))
            continue
        if kind in ("conv", "linear"):
            for leaf in ("weight", "bias"):
                if f"{d}.{leaf}" in own:
                    take(f"{s}.{leaf}", f"{d}.{leaf}")
        else:
            take_norm(s, d)
    outside = [k for k in own if not k.startswith(body_prefix)] if task != "classification" else []
    if whole and outside:  # FPN, RPN, RoI heads, segmentation heads: torchvision's names, switchable BN filled
        switchable = [
            name
            for name, m in target.named_modules()
            if isinstance(m, SwitchableBatchNorm2d) and not name.startswith(body_prefix)
        ]
        for name in switchable:
            take_norm(name, name)
        for key in outside:
            if key in new or any(key.startswith(f"{name}.") for name in switchable):
                continue
            if not key.endswith("num_batches_tracked") or key in sd:
                take(key, key)
    missing = [k for k in own if k not in new and not k.endswith("num_batches_tracked")]
    if not whole and outside:  # a classification source fills the backbone; the rest keeps its values
        missing = [k for k in missing if k.startswith(body_prefix)]
        for key in outside:
            new.setdefault(key, own[key])
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
            "(depth, in_chans, num_classes, num_keypoints, aux_loss; norm='switchable'), or pick the matching source "
            "model"
        )
    for key, value in own.items():  # num_batches_tracked and anything left keeps the model's value
        new.setdefault(key, value)
    target.load_state_dict(new, strict=True)
    for m in target.modules():
        if hasattr(m, "clear_weight_memo"):
            m.clear_weight_memo()
    return model


def _target(target: nn.Module) -> tuple[str, SlimNet, str]:
    """``(task, slimmable backbone, its prefix in the state dict)`` of a model this loader fills."""
    if isinstance(target, SlimNet):
        return "classification", target, ""
    backbone = getattr(target, "backbone", None)
    body = getattr(backbone, "body", None)
    if isinstance(body, SlimNet):  # a detector: backbone = SlimBackboneWithFPN
        return "detection", body, "backbone.body."
    if isinstance(backbone, SlimNet):  # a segmentation model: backbone = a features-only network
        return "segmentation", backbone, "backbone."
    raise TypeError(
        f"{type(target).__name__} is neither a slimmable classification model nor a slimmable detector or "
        "segmentation model; build it with slimmable.create_model"
    )


def _source_task(sd: Mapping[str, torch.Tensor]) -> str:
    """What a torchvision state dict holds: detectors keep their backbone under ``backbone.body.``, segmentation
    models under ``backbone.``, classifiers at the top."""
    if any(k.startswith("backbone.body.") for k in sd):
        return "detection"
    if any(k.startswith("backbone.") for k in sd):
        return "segmentation"
    return "classification"


def _describe(body: nn.Module) -> str:
    depth = getattr(body, "depth", None)
    return f"depth {depth}" if depth is not None else type(body).__name__


def _body_pairs(body: SlimNet, classify: bool) -> Iterator[tuple[str, str, str]]:
    """``(torchvision module, our module, kind)`` for every weighted layer of ``body``, the family's map."""
    yield from body.torchvision_layers()
    if classify:
        if body.torchvision_classifier is None:
            raise TypeError(f"{type(body).__name__} does not name torchvision's classifier layer")
        linear = next(i for i, m in enumerate(body.classifier) if isinstance(m, nn.Linear))  # type: ignore[arg-type]
        yield body.torchvision_classifier, f"classifier.{linear}", "linear"
