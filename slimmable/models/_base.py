"""Base class of the model families, the per-model channel plan (S-Net widths or US-Net range), stage metadata
(:class:`FeatureInfo`) for detection and segmentation heads, and the helpers the family files share."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..nn import (
    SharedBatchNorm2d,
    SlimConv2d,
    SlimLinear,
    WidthRange,
    WidthTable,
    create_norm,
    get_width,
    get_widths,
    make_divisible,
    normalize_widths,
    set_width,
    use_width,
)
from ..nn.attention import head_count, head_rule
from ..nn.channels import ChannelRule

__all__ = [
    "NORM_KINDS",
    "ChannelPlan",
    "FeatureInfo",
    "NormFactory",
    "SlimNet",
    "init_weights",
    "slim_conv_from",
    "us_kwargs",
    "width_grid",
]

NORM_KINDS = ("switchable", "shared")
#: builds the norm layer after a layer whose output follows ``rule`` (``None``: the same size at every width) and
#: has ``channels`` at full width: ``factory(rule, channels) -> nn.Module``
NormFactory = Callable[[ChannelRule | None, int], nn.Module]


class ChannelPlan:
    """Turns a layer's full-width size into its channel rule.

    Slimmable (S-Net) models get a :class:`WidthTable` over ``widths`` with the family's rounding; universally
    slimmable (US-Net) models get a :class:`WidthRange` over ``width_range`` with the official US rounding.

    Args:
        widths: the switches of an S-Net (ignored when ``width_range`` is given, except as BN statistics widths).
        round_fn: ``round_fn(channels * width) -> int``, the family's rounding for S-Nets.
        width_range: ``(lo, hi)`` for a US-Net.
        stat_widths: US-Nets: widths whose BN statistics are stored.
        channels: a ChannelSpec: full-size channels of named layers (an int: the same at every width, for a
            single-width network such as a searched one; a list: one count per width, as AutoSlim trains them).
        norm: ``"switchable"`` (one BN per width, the S-Nets' switchable BN), ``"shared"`` (one BN sliced for
            every width: the naive baseline whose shared statistics fail at test time), or a :data:`NormFactory`
            building another norm layer (a transformer's LayerNorm), as torchvision's models take ``norm_layer``.
    """

    def __init__(
        self,
        widths: Sequence[float],
        round_fn: Callable[[float], int],
        width_range: tuple[float, float] | None = None,
        stat_widths: Sequence[float] | None = None,
        channels: Mapping[str, int | Sequence[int]] | None = None,
        norm: str | NormFactory = "switchable",
    ) -> None:
        self.round_fn = round_fn
        self._norm_factory: NormFactory | None = None
        if callable(norm):
            self._norm_factory, norm = norm, "custom"
        elif norm not in NORM_KINDS:
            raise ValueError(f"norm {norm!r} is not one of {NORM_KINDS}, nor a norm layer factory")
        self.norm_kind = norm
        self.spec = dict(channels) if channels is not None else None
        self._asked: list[str] = []
        if self.spec is not None and width_range is not None:
            raise ValueError("channels= builds a network with fixed per-layer channels; it cannot take a width_range")
        self.width_range = None if width_range is None else (float(width_range[0]), float(width_range[1]))
        if self.width_range is not None:
            lo, hi = self.width_range
            if not 0 < lo <= hi:
                raise ValueError(f"width_range {width_range} must satisfy 0 < lo <= hi")
            self.stat_widths = normalize_widths(stat_widths if stat_widths is not None else (lo, hi))
            bad = [w for w in self.stat_widths if not lo - 1e-9 <= w <= hi + 1e-9]
            if bad:
                raise ValueError(f"stat_widths {bad} are outside width_range {width_range}")
            self.widths = self.stat_widths
        else:
            self.widths = normalize_widths(widths)
            self.stat_widths = ()

    @property
    def is_us(self) -> bool:
        return self.width_range is not None

    @property
    def max_width(self) -> float:
        return self.width_range[1] if self.width_range else self.widths[-1]

    def rule(self, channels: int, name: str | None = None) -> ChannelRule:
        """Rule for layer ``name`` whose size at width 1.0 is ``channels`` (a channel spec naming it wins)."""
        from_spec = self._from_spec(name)
        if from_spec is not None:
            return from_spec
        if self.width_range is not None:
            lo, hi = self.width_range
            return WidthRange(make_divisible(channels * hi), lo, hi)
        return WidthTable.build(self.widths, lambda w: self.round_fn(channels * w))

    def _from_spec(self, name: str | None) -> WidthTable | None:
        if name is None:
            return None
        self._asked.append(name)
        if self.spec is None or name not in self.spec:
            return None
        value = self.spec[name]
        counts = [value] * len(self.widths) if isinstance(value, int) else list(value)
        if len(counts) != len(self.widths):
            raise ValueError(
                f"channels[{name!r}] has {len(counts)} counts but the model has {len(self.widths)} widths "
                f"{self.widths}; give one count per width (or an int for a single-width network)"
            )
        return WidthTable.build(self.widths, counts)

    def norm(self, rule: ChannelRule | None, channels: int) -> nn.Module:
        """The norm layer for a layer with output ``rule``: switchable BN (default), shared BN, US BN, or what the
        plan's norm factory builds."""
        if self._norm_factory is not None:
            return self._norm_factory(rule, channels)
        if self.norm_kind == "shared" and rule is not None:
            return SharedBatchNorm2d(rule)
        return create_norm(rule, channels, self.stat_widths)

    def heads(self, num_heads: int, group: int = 1) -> ChannelRule:
        """Rule of the active attention heads of a layer with ``num_heads`` heads at width 1.0, in whole groups of
        ``group`` query heads per key/value head (:func:`slimmable.nn.attention.head_count`: the nearest whole
        group, never more than 10% below, at least one group; a US-Net: the same for any width in its range).

        Raises:
            ValueError: a width needs more heads than ``num_heads`` (widths above 1.0).
        """
        if self.width_range is None:
            return head_rule(self.widths, num_heads, group)
        lo, hi = self.width_range
        if head_count(num_heads, hi, group) > num_heads:
            raise ValueError(f"width {hi:g} needs more than the {num_heads} attention heads; the range ends at 1.0")
        # make_divisible(num_heads * w / hi / group, 1) * group: the head_count rounding relative to ``hi``
        return WidthRange(num_heads, lo, hi, ratio=group, divisor=1)

    def fixed(self, name: str, default: int) -> int:
        """Size of a layer that is not slimmed (one size at every width), unless the channel spec names it."""
        rule = self._from_spec(name)
        if rule is None:
            return default
        if len(set(rule.channels)) != 1:
            raise ValueError(f"{name} is not slimmable: give one int for it in channels, got {rule.channels}")
        return rule.channels[0]

    def check_spec(self) -> None:
        """Raise if the channel spec names layers the model does not have (call after building)."""
        if self.spec is None:
            return
        unknown = sorted(set(self.spec) - set(self._asked))
        if unknown:
            raise ValueError(
                f"channels names layers this model does not have: {unknown}; valid names: {', '.join(self._asked)}"
            )

    def scaled(self, rule: ChannelRule, factor: int, name: str | None = None) -> ChannelRule:
        """``rule`` times an integer ``factor`` at every width (MobileNet v2's expansion, ResNet's bottleneck)."""
        from_spec = self._from_spec(name)
        if from_spec is not None:
            return from_spec
        if isinstance(rule, WidthRange):
            # the divisor stays the rule's: a stream scaled from a head count rounds in whole heads, not to 8
            scaled = rule.max_channels * factor
            return WidthRange(scaled, rule.lo, rule.hi, ratio=rule.ratio * factor, divisor=rule.divisor)
        assert isinstance(rule, WidthTable)
        return WidthTable.build(rule.widths, [c * factor for c in rule.channels])

    def divided(self, rule: WidthTable, divisor: int) -> WidthTable:
        """``rule`` floor-divided by ``divisor`` at every width (ResNet's bottleneck, ShuffleNet's groups)."""
        return WidthTable.build(rule.widths, [c // divisor for c in rule.channels])


@dataclass(frozen=True)
class FeatureInfo:
    """One stage of a model: the map :meth:`SlimNet.forward_stages` returns under :attr:`name`.

    Attributes:
        name: the stage's name (``"stem"``, ``"layer1"``, ``"stage3"``, ...), the key in ``forward_stages``.
        stride: the stage output's reduction relative to the input (nominal: ShuffleNet's unpadded stem pooling
            gives 55 instead of 56 at 224).
        rule: the channel rule of the stage's output (``None``: the same channels at every width).
        num_channels: the output channels at the model's widest width.
    """

    name: str
    stride: int
    rule: ChannelRule | None
    num_channels: int

    def channels(self, width: float) -> int:
        """Output channels at ``width``: any switch of an S-Net, any width in a US-Net's range.

        Raises:
            ValueError: the model cannot run at ``width``.
        """
        return self.num_channels if self.rule is None else int(self.rule(width))


class SlimNet(nn.Module):
    """Base of all slimmable model families: the width API as methods, and the constructor kwargs for checkpoints.

    A family builds a *trunk* (an ``nn.Sequential`` named by :attr:`trunk_name`: a CNN's ``features``, ending in
    global pooling; a transformer's ``blocks``, whose head pools the class token instead) and a head
    (:attr:`head_names`: a CNN's ``classifier``), and declares its stages with :meth:`_set_stages`: consecutive
    runs of the trunk with a name, a stride and an output channel rule. That gives every family
    :meth:`forward_features`, :meth:`forward_head`, :meth:`forward_stages` and :attr:`feature_info` (timm's
    ``features_only`` / torchvision's ``IntermediateLayerGetter``, at any width). Module names, and so state-dict
    keys and channel specs, do not change: stages are named views of the trunk. A family whose head is not global
    pooling and a linear layer overrides :meth:`forward_head` and :meth:`forward_logits`; one that runs something
    before the trunk (a patch embedding) overrides :meth:`_forward_stem_input`.

    :meth:`as_features_only` (``create_model(name, features_only=True, out_indices=...)``) turns the network into
    a backbone whose forward returns the maps of the chosen stages, as detection and segmentation models use it.

    A family with a torchvision counterpart declares how torchvision names its layers
    (:meth:`torchvision_layers`, :attr:`torchvision_classifier`, :attr:`torchvision_trunk`), which
    :func:`slimmable.load_torchvision_weights` reads.

    Attributes:
        model_kwargs: the keyword arguments the model was built with (saved in checkpoints).
        feature_info: one :class:`FeatureInfo` per stage, input to output (every stage, also in a features-only
            model: ``out_indices`` are positions in it).
        out_indices: the positions in :attr:`feature_info` whose maps the forward returns (features-only), or
            ``None`` (a classifier: the forward returns logits).
        out_names: the keys of those maps, as :attr:`out_indices`.
    """

    model_name: str = ""
    model_kwargs: dict[str, Any]
    #: the ``nn.Sequential`` holding the stages
    trunk_name: str = "features"
    #: whether the trunk's last module is the global pooling (after the last stage), as in the CNN families
    trunk_pools: bool = True
    #: the modules only the classifier path runs after the trunk (a features-only model replaces them)
    head_names: tuple[str, ...] = ("classifier",)
    feature_info: list[FeatureInfo]
    out_indices: tuple[int, ...] | None = None
    out_names: tuple[str, ...] = ()
    #: ``(start, end)`` of each stage in the trunk, as :attr:`feature_info`
    _stage_bounds: list[tuple[int, int]]
    #: torchvision's name of the classifier's linear layer (``fc``, ``classifier.1``); ``None`` without one
    torchvision_classifier: str | None = None
    #: the child of torchvision's classifier that torchvision's segmentation models take as their backbone
    #: (``features`` for the MobileNets, whose names then lose the ``features.`` prefix); ``None``: the whole network
    torchvision_trunk: str | None = None

    def set_width(self, width: float) -> SlimNet:
        """Switch the whole model to ``width`` (see :func:`slimmable.nn.set_width`); returns ``self``."""
        set_width(self, width)
        return self

    def use_width(self, width: float) -> contextlib.AbstractContextManager[nn.Module]:
        """Context manager running the model at ``width`` and restoring the previous width on exit."""
        return use_width(self, width)

    @property
    def widths(self) -> tuple[float, ...]:
        """The switch widths (S-Nets) or the widths with stored BN statistics (US-Nets), ascending; read off the
        layers (:func:`slimmable.get_widths`), so BN calibration adding a US width shows here."""
        return get_widths(self).switches

    @property
    def width_range(self) -> tuple[float, float] | None:
        """``(lo, hi)`` for universally slimmable models, else ``None``."""
        return get_widths(self).range

    @property
    def width(self) -> float | None:
        """The current width (``None`` after per-layer channels were set)."""
        return get_width(self)

    def channel_groups(self) -> list[list[str]]:
        """Layers whose output channels must stay equal (tied by residual additions), for channel search.

        Each inner list holds qualified names of layers with slimmable outputs; a layer not tied to any other
        forms a group of its own. The default covers chains of blocks with ``body``/``shortcut``/``use_residual``;
        families that cannot be searched raise ``NotImplementedError``.
        """
        return residual_channel_groups(self, "features.0.0")

    def forward(self, x: torch.Tensor) -> torch.Tensor | OrderedDict[str, torch.Tensor]:
        """``(N, in_chans, H, W)`` → logits ``(N, num_classes)`` at the current width; a features-only model
        (:meth:`as_features_only`) returns ``{out_name: map}`` instead."""
        if self.out_indices is not None:
            return self.forward_out(x)
        return self.forward_logits(x)

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_chans, H, W)`` → logits ``(N, num_classes)`` at the current width."""
        return self.classifier(torch.flatten(self.features(x), 1))

    # -- stages and features ----------------------------------------------------------------------------------------

    @property
    def _trunk(self) -> nn.Sequential:
        return getattr(self, self.trunk_name)

    def _set_stages(self, stages: Sequence[tuple[str, int, int, ChannelRule | None, int]]) -> None:
        """Declare the stages: ``(name, end, stride, rule, channels)`` each, where stage ``i`` runs
        ``trunk[end_{i-1}:end_i]`` (the first starts at 0; an empty run is the output of
        :meth:`_forward_stem_input`) and the last ends before the global pooling (:attr:`trunk_pools`), else at the
        end of the trunk."""
        bounds, start = [], 0
        for _, end, *_rest in stages:
            if end < start:
                raise ValueError(f"stage ends {[s[1] for s in stages]} must not decrease")
            bounds.append((start, end))
            start = end
        n, trunk = len(self._trunk), self.trunk_name
        if self.trunk_pools and start != n - 1:
            raise ValueError(f"stages end at {trunk}.{start}, not at the global pooling {trunk}.{n - 1}")
        if not self.trunk_pools and start != n:
            raise ValueError(f"stages end at {trunk}.{start}, not at the end of {trunk} ({n} modules)")
        self._stage_bounds = bounds
        self.feature_info = [FeatureInfo(name, stride, rule, c) for name, _, stride, rule, c in stages]

    def _forward_stem_input(self, x: torch.Tensor) -> torch.Tensor:
        """What ``features`` receives (ShuffleNet first concatenates its stem branches)."""
        return x

    def _run_features(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        # ``x`` stays referenced until the run is done, as torchvision's stage-wise forward holds a stage's input
        # (see resnet._run_stage: the free order a flat chain gives costs time with glibc's allocator).
        out, trunk = x, self._trunk
        for i in range(start, end):
            out = trunk[i](out)
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_chans, H, W)`` → the last stage's map ``(N, C, H / s, W / s)`` before pooling, at the current
        width (``C = feature_info[-1].channels(width)``, ``s = feature_info[-1].stride``)."""
        x = self._forward_stem_input(x)
        for start, end in self._stage_bounds:
            x = self._run_features(x, start, end)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global pooling and classifier: ``forward(x) == forward_head(forward_features(x))``."""
        return self.classifier(torch.flatten(self.features[-1](x), 1))  # type: ignore[index]

    def forward_stages(self, x: torch.Tensor, out_indices: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """The stages' output maps at the current width, for detection and segmentation heads.

        Args:
            x: input ``(N, in_chans, H, W)``.
            out_indices: positions in :attr:`feature_info` to return (negative counts from the end); default all.
                The forward pass stops after the last one asked for.

        Returns:
            ``{stage name: (N, C_i, H / s_i, W / s_i)}`` in stage order, with ``C_i`` and ``s_i`` as
            ``feature_info[i]`` gives them at the current width.

        Raises:
            ValueError: an index outside the stages, or a repeated one.
        """
        picked = self._check_out_indices(out_indices)
        out: dict[str, torch.Tensor] = {}
        x = self._forward_stem_input(x)
        for i, (start, end) in enumerate(self._stage_bounds[: picked[-1] + 1] if picked else ()):
            x = self._run_features(x, start, end)
            if i in picked:
                out[self.feature_info[i].name] = x
        return out

    def _check_out_indices(self, out_indices: Sequence[int] | None) -> list[int]:
        """``out_indices`` as sorted non-negative positions in :attr:`feature_info` (``None``: all).

        Raises:
            ValueError: an index outside the stages, or a repeated one.
        """
        n = len(self.feature_info)
        wanted = list(range(n)) if out_indices is None else [int(i) for i in out_indices]
        picked = sorted({i % n for i in wanted if -n <= i < n})
        if len(picked) != len(wanted):
            names = [f.name for f in self.feature_info]
            raise ValueError(
                f"out_indices {list(wanted)} must be distinct positions in the {n} stages {names} (negative from the "
                "end)"
            )
        return picked

    # -- features-only backbones --------------------------------------------------------------------------------------

    def as_features_only(
        self, out_indices: Sequence[int] | None = None, out_names: Sequence[str] | None = None
    ) -> SlimNet:
        """Make this network a backbone, in place: its forward returns the maps of the stages ``out_indices``.

        The head (:attr:`head_names`) and every layer after the last stage used (the global pooling, MobileNet v2's
        1x1 conv head when it is not used) become ``nn.Identity``, as torchvision's ``IntermediateLayerGetter`` drops
        them: they would hold parameters without gradients. The other module names, and so the state-dict keys, stay.
        Calling it again may select other stages up to the last one kept.

        Args:
            out_indices: positions in :attr:`feature_info` (negative from the end); default every stage.
            out_names: the key of each map, in the order of ``out_indices`` (default the stage names), e.g.
                ``("aux", "out")`` for torchvision's segmentation models.

        Returns:
            ``self``; its forward gives ``OrderedDict(out_name → (N, C_i, H / s_i, W / s_i))`` in stage order, with
            ``C_i`` and ``s_i`` as :attr:`out_feature_info` gives them.

        Raises:
            ValueError: bad or repeated indices, names that do not pair with them, or a stage that an earlier call
                dropped.
        """
        picked = self._check_out_indices(out_indices)
        if not picked:
            raise ValueError("out_indices is empty; a features-only model returns at least one stage's map")
        order = picked if out_indices is None else [int(i) % len(self.feature_info) for i in out_indices]
        names = [self.feature_info[i].name for i in order] if out_names is None else [str(n) for n in out_names]
        if isinstance(out_names, str) or len(names) != len(order) or len(set(names)) != len(names):
            raise ValueError(f"out_names {out_names!r} must be {len(order)} distinct names, one per out_indices entry")
        by_index = dict(zip(order, names))
        trunk = self._trunk
        kept = self._stage_bounds[self.out_indices[-1]][1] if self.out_indices is not None else len(trunk)
        last_end = self._stage_bounds[picked[-1]][1]
        if last_end > kept:
            raise ValueError(
                f"stage {self.feature_info[picked[-1]].name} was dropped when this backbone was made for "
                f"out_indices {list(self.out_indices or ())}; build the model again"
            )
        for name in self.head_names:
            setattr(self, name, nn.Identity())
        for i in range(last_end, len(trunk)):
            trunk[i] = nn.Identity()
        self.out_indices = tuple(picked)
        self.out_names = tuple(by_index[i] for i in picked)
        return self

    @property
    def out_feature_info(self) -> list[FeatureInfo]:
        """The :class:`FeatureInfo` of each map the forward of a features-only model returns (every stage for a
        classifier), in the order of :attr:`out_names`."""
        indices = range(len(self.feature_info)) if self.out_indices is None else self.out_indices
        return [self.feature_info[i] for i in indices]

    def forward_out(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """The maps of the stages :attr:`out_indices` (all when ``None``) under :attr:`out_names` (the stage names
        when empty), at the current width; a features-only model's forward."""
        stages = self.forward_stages(x, self.out_indices)
        names = self.out_names or tuple(stages)
        return OrderedDict(zip(names, stages.values()))

    def dropped_layers(self) -> list[str]:
        """Qualified names of the layers a features-only model no longer runs (replaced by ``nn.Identity``): the
        classifier and the layers after its last stage used. Weights stored for them elsewhere (an ImageNet
        checkpoint) have no place in the backbone. Empty for a classifier."""
        if self.out_indices is None:
            return []
        end = self._stage_bounds[self.out_indices[-1]][1]
        trunk = self.trunk_name
        return [*self.head_names, *(f"{trunk}.{i}" for i in range(end, len(self._trunk)))]

    # -- torchvision counterparts -------------------------------------------------------------------------------------

    def torchvision_layers(self) -> Iterator[tuple[str, str, str]]:
        """``(torchvision module, our module, kind)`` for every weighted layer before the classifier, ``kind``
        being ``conv`` or ``bn``: how torchvision's model of this family names them (``layer2.0.conv1`` is our
        ``features.4.body.0``). Module names are translated by the family's structure, never by position in a
        state dict. Read by :func:`slimmable.load_torchvision_weights`.

        Raises:
            TypeError: the family has no torchvision counterpart.
            ValueError: this model cannot take torchvision's weights (e.g. a universally slimmable one).
        """
        raise TypeError(
            f"no torchvision counterpart for {type(self).__name__}; supported: the families that define "
            "torchvision_layers (SlimResNet, SlimMobileNetV2)"
        )

    def feature_channels(self, width: float | None = None) -> list[int]:
        """Output channels of each stage at ``width`` (default: the current width).

        Raises:
            ValueError: ``width`` is not a width of the model, or it is ``None`` and the model runs per-layer
                channels (then read the channels off :meth:`forward_stages`'s maps).
        """
        if width is None:
            width = self.width
            if width is None:
                raise ValueError("the model runs per-layer channels, not one width; pass a width")
        return [f.channels(width) for f in self.feature_info]

    def stage_modules(self) -> dict[str, list[nn.Module]]:
        """The modules of each stage, by name (for freezing or per-stage optimiser groups); stages that only
        reshape their input (ShuffleNet's stem concatenation) list the modules the family runs there."""
        trunk = self._trunk
        return {f.name: list(trunk[a:b]) for f, (a, b) in zip(self.feature_info, self._stage_bounds)}

    @staticmethod
    def make_classifier(num_features: int, num_classes: int, drop_rate: float, slim: bool = True) -> nn.Sequential:
        """Optional dropout, then a linear layer (slimmable input when ``slim``), as ``classifier.{0,1}``."""
        head: list[nn.Module] = [nn.Dropout(drop_rate)] if drop_rate > 0 else []
        head.append(SlimLinear(num_features, num_classes) if slim else nn.Linear(num_features, num_classes))
        return nn.Sequential(*head)

    def iter_widths(self) -> Iterator[float]:
        """Iterate the model's switches, setting each in turn, then restore the width it had."""
        for w in self.widths:
            with use_width(self, w):
                yield w


def residual_channel_groups(model: nn.Module, stem: str) -> list[list[str]]:
    """Channel groups of a chain of blocks with ``body`` (and optional ``shortcut``) and ``use_residual``.

    Inside a block every slimmable-output conv is its own group except the block's last one (its output), which
    joins the group of the block's input when the block adds its input back (and starts a new group otherwise,
    together with a projection shortcut).
    """
    groups: list[list[str]] = [[stem]]
    current = groups[0]
    for k, block in enumerate(model.features):  # type: ignore[union-attr]
        body = getattr(block, "body", None)
        if body is None:
            continue
        convs = [f"features.{k}.body.{i}" for i, m in enumerate(body) if isinstance(m, SlimConv2d) and m.out_rule]
        *inner, last = convs
        groups.extend([name] for name in inner)
        if getattr(block, "use_residual", False):
            current.append(last)
        else:
            current = [last]
            shortcut = getattr(block, "shortcut", None)
            if shortcut is not None:
                current.append(f"features.{k}.shortcut.0")
            groups.append(current)
    return groups


def init_weights(model: nn.Module) -> None:
    """He-normal convs, unit BN, small-normal linear layers (the official ``reset_parameters``)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def us_kwargs(family: str, kwargs: dict[str, Any], width_range: tuple[float, float]) -> dict[str, Any]:
    """A ``us_<family>`` builder's kwargs: the official range and statistics every 0.025 by default; ``widths``
    (fixed switches) refused, not dropped."""
    if "widths" in kwargs:
        raise ValueError(
            f"us_{family} runs at any width in its width_range and takes no widths "
            f"(got {kwargs['widths']}); give width_range=(lo, hi) and stat_widths=(...) (widths with stored BN "
            f"statistics), or build slim_{family} for fixed switches"
        )
    out = {"width_range": width_range, **kwargs}
    lo, hi = out["width_range"]
    out.setdefault("stat_widths", width_grid(lo, hi, 0.025))
    return out


def width_grid(lo: float, hi: float, step: float) -> tuple[float, ...]:
    """``lo, lo + step, ..., hi`` rounded to 6 decimals (US-Nets' statistics widths)."""
    n = round((hi - lo) / step)
    return tuple(round(lo + i * step, 6) for i in range(n + 1))


def slim_conv_from(conv: nn.Conv2d, out_rule: ChannelRule | None) -> SlimConv2d:
    """A :class:`SlimConv2d` with ``conv``'s configuration and a copy of its weights (input channels follow the
    input; ``out_rule`` ``None`` keeps every output channel). Slims the layers of torchvision's heads in place."""
    new = SlimConv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        conv.stride,  # type: ignore[arg-type]
        conv.padding,  # type: ignore[arg-type]
        conv.dilation,  # type: ignore[arg-type]
        conv.groups,
        conv.bias is not None,
        out_rule=out_rule,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new
