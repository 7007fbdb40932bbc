"""Slimmable and universally slimmable MobileNet v1 (official S-MobileNet v1 / US-MobileNet v1 layouts)."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..nn import SlimConv2d, make_divisible
from ..nn.channels import ChannelRule
from ._base import ChannelPlan, SlimNet, init_weights, us_kwargs
from ._registry import register_model

__all__ = ["SlimMobileNetV1", "slim_mobilenet_v1", "us_mobilenet_v1"]

# c (channels at width 1.0), n (repeats), s (stride of the first block)
DEPTHWISE_SEPARABLE_SETTING: tuple[tuple[int, int, int], ...] = (
    (64, 1, 1),
    (128, 2, 2),
    (256, 2, 2),
    (512, 6, 2),
    (1024, 2, 2),
)


class DepthwiseSeparableConv(nn.Module):
    """Depthwise 3x3 → BN → ReLU6 → pointwise 1x1 → BN → ReLU6. Keys: ``body.{0..5}``."""

    def __init__(self, in_rule: ChannelRule, out_rule: ChannelRule, stride: int, plan: ChannelPlan) -> None:
        super().__init__()
        cin, cout = in_rule.max_channels, out_rule.max_channels
        self.body = nn.Sequential(
            SlimConv2d(cin, cin, 3, stride, 1, bias=False, depthwise=True),
            plan.norm(in_rule, cin),
            nn.ReLU6(inplace=True),
            SlimConv2d(cin, cout, 1, bias=False, out_rule=out_rule),
            plan.norm(out_rule, cout),
            nn.ReLU6(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class SlimMobileNetV1(SlimNet):
    """Slimmable MobileNet v1, state-dict compatible with the official checkpoints.

    Args:
        widths: the switches (S-Net), default (without ``channels``) ``(0.25, 0.5, 0.75, 1.0)``.
        num_classes: classifier outputs.
        in_chans: input image channels.
        small_input: stride-1 stem for 28x28 / 32x32 images.
        width_range: ``(lo, hi)`` builds a universally slimmable network.
        stat_widths: US-Nets: widths whose BN statistics are stored (official: 0.25..1.0 step 0.025).
        channels: a ChannelSpec (layer name → channels, or one count per width) overriding the default sizes.

    Stages (:attr:`feature_info`): ``stem`` (stride 2) and ``stage1``..``stage5``, one per row of
    ``DEPTHWISE_SEPARABLE_SETTING`` (strides 2, 4, 8, 16, 32); ``small_input`` halves the strides.
    """

    def __init__(
        self,
        widths: Sequence[float] | None = None,
        num_classes: int = 1000,
        in_chans: int = 3,
        small_input: bool = False,
        width_range: tuple[float, float] | None = None,
        stat_widths: Sequence[float] | None = None,
        drop_rate: float = 0.0,
        norm: str = "switchable",
        channels: Mapping[str, int | Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        if widths is None:  # a channel spec alone builds one network; else the paper's switches
            widths = (1.0,) if channels is not None else (0.25, 0.5, 0.75, 1.0)
        # The official S-MobileNet v1 rounds with a minimum of 8 channels; its US version with a minimum of 1.
        rounding = functools.partial(make_divisible, min_value=8)
        plan = ChannelPlan(widths, rounding, width_range, stat_widths, channels, norm=norm)
        self.num_classes = num_classes
        rule = plan.rule(32, "features.0.0")
        c = rule.max_channels
        stride = 1 if small_input else 2
        stem = SlimConv2d(in_chans, c, 3, stride, 1, bias=False, out_rule=rule)
        features: list[nn.Module] = [nn.Sequential(stem, plan.norm(rule, c), nn.ReLU6(inplace=True))]
        stages = [("stem", 1, stride, rule, c)]
        for row, (ch, n, s) in enumerate(DEPTHWISE_SEPARABLE_SETTING, 1):
            for i in range(n):
                out_rule = plan.rule(ch, f"features.{len(features)}.body.3")
                features.append(DepthwiseSeparableConv(rule, out_rule, s if i == 0 else 1, plan))
                rule = out_rule
            stride *= s
            stages.append((f"stage{row}", len(features), stride, rule, rule.max_channels))
        features.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*features)
        self._set_stages(stages)
        self.num_features = rule.max_channels
        self.classifier = self.make_classifier(self.num_features, num_classes, drop_rate, slim=True)
        plan.check_spec()
        init_weights(self)


@register_model(official="s_mobilenet_v1")
def slim_mobilenet_v1(**kwargs) -> SlimMobileNetV1:
    """Slimmable MobileNet v1, widths 0.25/0.5/0.75/1.0."""
    return SlimMobileNetV1(**kwargs)


@register_model(official="us_mobilenet_v1")
def us_mobilenet_v1(**kwargs) -> SlimMobileNetV1:
    """Universally slimmable MobileNet v1, any width in [0.25, 1.0]; BN statistics every 0.025 (official)."""
    return SlimMobileNetV1(**us_kwargs("mobilenet_v1", kwargs, (0.25, 1.0)))
