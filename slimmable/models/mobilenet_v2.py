"""Slimmable and universally slimmable MobileNet v2 (official S-MobileNet v2 / US-MobileNet v2 layouts)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from ..nn import SlimConv2d, make_divisible
from ..nn.channels import ChannelRule
from ._base import ChannelPlan, SlimNet, init_weights, us_kwargs
from ._registry import register_model

__all__ = ["SlimMobileNetV2", "slim_mobilenet_v2", "us_mobilenet_v2"]

# t (expansion), c (channels at width 1.0), n (repeats), s (stride of the first block)
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """Expand (1x1) → depthwise (3x3) → project (1x1), residual when shape is kept. Keys: ``body.{0..7}``."""

    def __init__(
        self,
        in_rule: ChannelRule,
        out_rule: ChannelRule,
        stride: int,
        expand_ratio: int,
        plan: ChannelPlan,
        expand_name: str | None = None,
    ) -> None:
        super().__init__()
        hidden_rule = plan.scaled(in_rule, expand_ratio, expand_name if expand_ratio != 1 else None)
        cin, hidden, cout = in_rule.max_channels, hidden_rule.max_channels, out_rule.max_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [
                SlimConv2d(cin, hidden, 1, bias=False, out_rule=hidden_rule),
                plan.norm(hidden_rule, hidden),
                nn.ReLU6(inplace=True),
            ]
        layers += [
            SlimConv2d(hidden, hidden, 3, stride, 1, bias=False, depthwise=True),
            plan.norm(hidden_rule, hidden),
            nn.ReLU6(inplace=True),
            SlimConv2d(hidden, cout, 1, bias=False, out_rule=out_rule),
            plan.norm(out_rule, cout),
        ]
        self.body = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_rule == out_rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.body(x)
        return self.body(x)


class SlimMobileNetV2(SlimNet):
    """Slimmable MobileNet v2 (Yu et al. 2019), state-dict compatible with the official checkpoints.

    Args:
        widths: the switches (S-Net), default (without ``channels``) the paper's ``(0.35, 0.5, 0.75, 1.0)``.
        num_classes: classifier outputs.
        in_chans: input image channels.
        small_input: stride-1 stem for 28x28 / 32x32 images.
        width_range: ``(lo, hi)`` builds a universally slimmable network (any width in the range).
        stat_widths: US-Nets: widths whose BN statistics are stored (official: 0.35..1.0 step 0.025).
        drop_rate: dropout before the classifier.
        norm: ``"switchable"`` BN per width (default) or ``"shared"`` BN (the naive baseline).
        channels: a ChannelSpec (layer name → channels, or one count per width) overriding the default sizes,
            e.g. a searched network; the last 1x1 conv (``features.18.0``) may be named too.

    Stages (:attr:`feature_info`): ``stem`` (stride 2), ``stage1``..``stage7`` (one per row of
    ``INVERTED_RESIDUAL_SETTING``: strides 2, 4, 8, 16, 16, 32, 32) and ``conv_head`` (the last 1x1 conv, 1280
    channels at every width up to 1.0), which :meth:`forward_features` returns; ``small_input`` halves the strides.
    """

    torchvision_classifier = "classifier.1"
    torchvision_trunk = "features"

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
            widths = (1.0,) if channels is not None else (0.35, 0.5, 0.75, 1.0)
        plan = ChannelPlan(widths, make_divisible, width_range, stat_widths, channels, norm=norm)
        self.num_classes = num_classes
        rule = plan.rule(32, "features.0.0")
        c = rule.max_channels
        stride = 1 if small_input else 2
        stem = SlimConv2d(in_chans, c, 3, stride, 1, bias=False, out_rule=rule)
        features: list[nn.Module] = [nn.Sequential(stem, plan.norm(rule, c), nn.ReLU6(inplace=True))]
        stages = [("stem", 1, stride, rule, c)]
        for row, (t, ch, n, s) in enumerate(INVERTED_RESIDUAL_SETTING, 1):
            for i in range(n):
                k = len(features)
                out_rule = plan.rule(ch, f"features.{k}.body.{3 if t == 1 else 6}")
                features.append(InvertedResidual(rule, out_rule, s if i == 0 else 1, t, plan, f"features.{k}.body.0"))
                rule = out_rule
            stride *= s
            stages.append((f"stage{row}", len(features), stride, rule, rule.max_channels))
        top = plan.max_width
        self.num_features = plan.fixed(f"features.{len(features)}.0", make_divisible(1280 * top) if top > 1.0 else 1280)
        # The last 1x1 conv has a fixed output (the official models do not slim it), so its BN is a plain one.
        features.append(
            nn.Sequential(
                SlimConv2d(rule.max_channels, self.num_features, 1, bias=False),
                nn.BatchNorm2d(self.num_features),
                nn.ReLU6(inplace=True),
            )
        )
        stages.append(("conv_head", len(features), stride, None, self.num_features))
        features.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*features)
        self._set_stages(stages)
        self.classifier = self.make_classifier(self.num_features, num_classes, drop_rate, slim=False)
        plan.check_spec()
        init_weights(self)

    def torchvision_layers(self) -> Iterator[tuple[str, str, str]]:
        """torchvision's MobileNet v2 names: ``features.K.conv.*`` for the inverted residual blocks (our
        ``features.K.body.*``), ``features.{0,18}.{0,1}`` for the stem and the 1x1 conv head (the same as ours)."""
        if self.width_range is not None:
            raise ValueError("load_torchvision_weights fills S-Nets; a universally slimmable MobileNet v2 is not one")
        yield "features.0.0", "features.0.0", "conv"
        yield "features.0.1", "features.0.1", "bn"
        n = len(self.features)
        for k in range(1, n - 2):  # the inverted residual blocks
            expand = len(self.features[k].body) == 8  # type: ignore[index,arg-type]
            tv = f"features.{k}.conv"
            pairs: tuple[tuple[str, int, str], ...]
            if expand:  # conv.0 expand (conv, bn), conv.1 depthwise (conv, bn), conv.2 project, conv.3 its bn
                pairs = (("0.0", 0, "conv"), ("0.1", 1, "bn"), ("1.0", 3, "conv"), ("1.1", 4, "bn"))
                pairs += (("2", 6, "conv"), ("3", 7, "bn"))
            else:  # conv.0 depthwise (conv, bn), conv.1 project, conv.2 its bn
                pairs = (("0.0", 0, "conv"), ("0.1", 1, "bn"), ("1", 3, "conv"), ("2", 4, "bn"))
            for tv_idx, idx, kind in pairs:
                yield f"{tv}.{tv_idx}", f"features.{k}.body.{idx}", kind
        yield f"features.{n - 2}.0", f"features.{n - 2}.0", "conv"
        yield f"features.{n - 2}.1", f"features.{n - 2}.1", "bn"


@register_model(official="s_mobilenet_v2")
def slim_mobilenet_v2(**kwargs) -> SlimMobileNetV2:
    """Slimmable MobileNet v2, widths 0.35/0.5/0.75/1.0."""
    return SlimMobileNetV2(**kwargs)


@register_model(official="us_mobilenet_v2")
def us_mobilenet_v2(**kwargs) -> SlimMobileNetV2:
    """Universally slimmable MobileNet v2, any width in [0.35, 1.0]; BN statistics every 0.025 (official)."""
    return SlimMobileNetV2(**us_kwargs("mobilenet_v2", kwargs, (0.35, 1.0)))
