"""Slimmable ShuffleNet v1 (official S-ShuffleNet layout: each group convolution is ``groups`` separate convs)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..nn import SlimConv2d, WidthTable
from ._base import ChannelPlan, SlimNet, init_weights
from ._registry import register_model

__all__ = ["SlimShuffleNetV1", "slim_shufflenet_v1"]

# stage output channels at width 1.0 for groups=3, and blocks per stage
STAGE_SETTING = ((240, 4), (480, 8), (960, 4))
STEM_CHANNELS = 24


class ChannelShuffle(nn.Module):
    """Interleave channels of ``groups`` groups: ``(N, g*c, H, W)`` → transpose to ``(N, c*g, H, W)``."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _split(x: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
    return torch.split(x, x.shape[1] // parts, dim=1)


class ShuffleUnit(nn.Module):
    """ShuffleNet v1 unit: grouped 1x1 (``a_i``) → shuffle → depthwise 3x3 (``b``) → grouped 1x1 (``c_i``).

    Stride 2 concatenates an average-pooled shortcut; stride 1 adds the input. The first unit of the network
    takes the whole (small) stem output in every ``a_i`` instead of one group each.
    """

    def __init__(
        self,
        in_rule: WidthTable,
        out_rule: WidthTable,
        stride: int,
        groups: int,
        first: bool,
        plan: ChannelPlan,
        width_compress: int = 4,
    ) -> None:
        super().__init__()
        self.groups = groups
        self.use_residual = stride == 1 and in_rule == out_rule
        if self.use_residual:
            branch_rule = out_rule
        else:
            branch_rule = WidthTable.build(
                out_rule.widths, [o - i for o, i in zip(out_rule.channels, in_rule.channels)]
            )
            self.concat_branch = nn.AvgPool2d(3, 2, 1)
        self.first_group = 1 if first else groups
        in_split = plan.divided(in_rule, self.first_group)
        mid_rule = plan.divided(out_rule, width_compress)
        first_rule = plan.divided(mid_rule, groups)
        mid_split = plan.divided(mid_rule, groups)
        last_rule = plan.divided(branch_rule, groups)
        for i in range(groups):
            setattr(
                self,
                f"a_{i}",
                nn.Sequential(
                    SlimConv2d(in_split.max_channels, first_rule.max_channels, 1, bias=False, out_rule=first_rule),
                    plan.norm(first_rule, first_rule.max_channels),
                    nn.ReLU(inplace=True),
                ),
            )
        mid = mid_rule.max_channels
        self.b = nn.Sequential(
            ChannelShuffle(groups),
            SlimConv2d(mid, mid, 3, stride, 1, bias=False, depthwise=True),
            plan.norm(mid_rule, mid),
        )
        for i in range(groups):
            setattr(
                self,
                f"c_{i}",
                nn.Sequential(
                    SlimConv2d(mid_split.max_channels, last_rule.max_channels, 1, bias=False, out_rule=last_rule),
                    plan.norm(last_rule, last_rule.max_channels),
                ),
            )
        self.post_relu = nn.ReLU(inplace=True)

    def _grouped(self, prefix: str, x: torch.Tensor, split: bool) -> torch.Tensor:
        parts = _split(x, self.groups) if split else (x,) * self.groups
        return torch.cat([getattr(self, f"{prefix}_{i}")(p) for i, p in enumerate(parts)], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._grouped("a", x, split=self.first_group != 1)
        out = self._grouped("c", self.b(out), split=True)
        if self.use_residual:
            return self.post_relu(out + x)
        # The official model applies ReLU to the convolution branch only, then concatenates the pooled input.
        return torch.cat([self.post_relu(out), self.concat_branch(x)], 1)


class SlimShuffleNetV1(SlimNet):
    """Slimmable ShuffleNet v1 (groups 3), state-dict compatible with the official checkpoints.

    Args:
        widths: the switches, default ``(0.5, 1.0, 2.0)``.
        num_classes: classifier outputs.
        in_chans: input image channels.
        small_input: stride-1 stem without max-pooling, for 28x28 / 32x32 images.
        groups: group count of the 1x1 convolutions (the official model and channel table use 3).

    Stages (:attr:`feature_info`): ``stem`` (the concatenated ``head_i`` branches, stride 4, which the unpadded
    max pooling of the official layout rounds down: 55x55 at 224) and ``stage1``..``stage3`` (strides 8, 16, 32;
    with ``small_input`` 1, 2, 4, 8).
    """

    def __init__(
        self,
        widths: Sequence[float] = (0.5, 1.0, 2.0),
        num_classes: int = 1000,
        in_chans: int = 3,
        small_input: bool = False,
        groups: int = 3,
        drop_rate: float = 0.0,
        norm: str = "switchable",
    ) -> None:
        super().__init__()
        if groups != 3:
            raise ValueError(f"groups={groups}: only the official groups=3 channel table is implemented")
        plan = ChannelPlan(widths, int, norm=norm)
        self.num_classes = num_classes
        self.groups = groups
        rule = plan.rule(STEM_CHANNELS)
        bad = [c for c in rule.channels if c % groups]
        if bad:
            raise ValueError(f"widths {plan.widths} give stem channels {rule.channels}, not all divisible by {groups}")
        head_rule = plan.divided(rule, groups)  # type: ignore[arg-type]
        hc = head_rule.max_channels
        for i in range(groups):
            layers: list[nn.Module] = [
                SlimConv2d(in_chans, hc, 3, 1 if small_input else 2, 1, bias=False, out_rule=head_rule),
                plan.norm(head_rule, hc),
                nn.ReLU(inplace=True),
            ]
            if not small_input:
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
            setattr(self, f"head_{i}", nn.Sequential(*layers))
        features: list[nn.Module] = []
        stride = 1 if small_input else 4
        stages = [("stem", 0, stride, rule, rule.max_channels)]
        first = True
        for k, (ch, n) in enumerate(STAGE_SETTING, 1):
            out_rule = plan.rule(ch)
            for i in range(n):
                features.append(ShuffleUnit(rule, out_rule, 2 if i == 0 else 1, groups, first, plan))  # type: ignore[arg-type]
                first = False
                rule = out_rule
            stride *= 2
            stages.append((f"stage{k}", len(features), stride, rule, rule.max_channels))
        features.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*features)
        self._set_stages(stages)
        self.num_features = rule.max_channels
        self.classifier = self.make_classifier(self.num_features, num_classes, drop_rate, slim=True)
        init_weights(self)

    def channel_groups(self) -> list[list[str]]:
        """Not defined: the split group convolutions tie channels across groups in ways the search does not model."""
        raise NotImplementedError("channel search is not supported for ShuffleNet (grouped 1x1 convs split by shape)")

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_chans, H, W)`` → logits ``(N, num_classes)`` at the current width."""
        x = torch.cat([getattr(self, f"head_{i}")(x) for i in range(self.groups)], 1)
        return self.classifier(torch.flatten(self.features(x), 1))

    def _forward_stem_input(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self, f"head_{i}")(x) for i in range(self.groups)], 1)

    def stage_modules(self) -> dict[str, list[nn.Module]]:
        stages = super().stage_modules()
        stages["stem"] = [getattr(self, f"head_{i}") for i in range(self.groups)]
        return stages


@register_model(official="s_shufflenet")
def slim_shufflenet_v1(**kwargs) -> SlimShuffleNetV1:
    """Slimmable ShuffleNet v1 (g=3), widths 0.5/1.0/2.0."""
    return SlimShuffleNetV1(**kwargs)
