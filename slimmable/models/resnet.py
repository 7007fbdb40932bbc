"""Slimmable ResNet (official S-ResNet-50 layout; basic-block depths 18/34 for small data)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..nn import SlimConv2d
from ..nn.channels import ChannelRule
from ._base import ChannelPlan, SlimNet, init_weights
from ._registry import register_model

__all__ = ["SlimResNet", "slim_resnet18", "slim_resnet34", "slim_resnet50", "slim_resnet101"]

# depth -> (bottleneck?, blocks per stage)
RESNET_SETTINGS: dict[int, tuple[bool, tuple[int, int, int, int]]] = {
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
}
STAGE_CHANNELS = (64, 128, 256, 512)


def _int_round(v: float) -> int:
    # The official S-ResNet truncates: int(64 * 0.75) = 48.
    return int(v)


class Block(nn.Module):
    """Bottleneck (1x1-3x3-1x1, stride and dilation in the 3x3) or basic (3x3-3x3) block; keys ``body.*``,
    ``shortcut.*``."""

    def __init__(
        self,
        in_rule: ChannelRule,
        out_rule: ChannelRule,
        stride: int,
        bottleneck: bool,
        plan: ChannelPlan,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        if dilation != 1 and not bottleneck:
            raise ValueError("dilation is for bottleneck blocks (ResNet-50 and deeper), as in torchvision's ResNet")
        cin, cout = in_rule.max_channels, out_rule.max_channels
        if bottleneck:
            mid_rule = plan.divided(out_rule, 4)  # type: ignore[arg-type]
            mid = mid_rule.max_channels
            layers: list[nn.Module] = [
                SlimConv2d(cin, mid, 1, bias=False, out_rule=mid_rule),
                plan.norm(mid_rule, mid),
                nn.ReLU(inplace=True),
                SlimConv2d(mid, mid, 3, stride, dilation, dilation, bias=False, out_rule=mid_rule),
                plan.norm(mid_rule, mid),
                nn.ReLU(inplace=True),
                SlimConv2d(mid, cout, 1, bias=False, out_rule=out_rule),
                plan.norm(out_rule, cout),
            ]
        else:
            layers = [
                SlimConv2d(cin, cout, 3, stride, 1, bias=False, out_rule=out_rule),
                plan.norm(out_rule, cout),
                nn.ReLU(inplace=True),
                SlimConv2d(cout, cout, 3, 1, 1, bias=False, out_rule=out_rule),
                plan.norm(out_rule, cout),
            ]
        self.body = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_rule == out_rule
        if not self.use_residual:
            self.shortcut = nn.Sequential(
                SlimConv2d(cin, cout, 1, stride, bias=False, out_rule=out_rule), plan.norm(out_rule, cout)
            )
        self.post_relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        out += x if self.use_residual else self.shortcut(x)  # in place, as torchvision: no extra activation copy
        return self.post_relu(out)


class SlimResNet(SlimNet):
    """Slimmable ResNet, state-dict compatible with the official S-ResNet-50 checkpoints.

    Args:
        depth: 18, 34 (basic blocks) or 50, 101, 152 (bottlenecks).
        widths: the switches, default ``(0.25, 0.5, 0.75, 1.0)``.
        num_classes: classifier outputs.
        in_chans: input image channels.
        small_input: 3x3 stem without max-pooling, for 28x28 / 32x32 images.
        stem_stride: stride of the small-input stem: 1 (default) keeps the input resolution in the first stage; 2
            halves it, for about a quarter of the MACs (the Fashion-MNIST main job uses it to fit 10 CPU minutes).
        replace_stride_with_dilation: three flags for ``layer2``..``layer4``, as torchvision's ResNet: a flagged
            stage keeps its input's resolution (stride 1) and dilates its 3x3 convolutions instead, by the stride
            it drops times the dilation before it; its first block keeps the previous dilation. ``(False, True,
            True)`` gives output stride 8, the segmentation backbone of torchvision's FCN and DeepLabV3.
            Bottleneck depths only (torchvision's basic block has no dilation either).

    ``features`` stays flat (``features.N``, the official checkpoints' keys); its stages are named as
    torchvision's (:attr:`feature_info`): ``stem`` (``features.0``, stride 4) and ``layer1``..``layer4`` (strides
    4, 8, 16, 32; with ``small_input`` the stem's stride is ``stem_stride``: 1, 1, 2, 4, 8 by default; a dilated
    stage keeps the stride before it).
    """

    torchvision_classifier = "fc"

    def __init__(
        self,
        depth: int = 50,
        widths: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
        num_classes: int = 1000,
        in_chans: int = 3,
        small_input: bool = False,
        drop_rate: float = 0.0,
        norm: str = "switchable",
        stem_stride: int = 1,
        replace_stride_with_dilation: Sequence[bool] | None = None,
    ) -> None:
        super().__init__()
        if depth not in RESNET_SETTINGS:
            raise ValueError(f"ResNet depth {depth} is not supported; choose one of {sorted(RESNET_SETTINGS)}")
        dilate = tuple(bool(d) for d in (replace_stride_with_dilation or (False, False, False)))
        if len(dilate) != 3:
            raise ValueError(
                f"replace_stride_with_dilation={replace_stride_with_dilation!r} needs three flags, for layer2..layer4"
            )
        if stem_stride not in (1, 2) or (stem_stride != 1 and not small_input):
            raise ValueError(
                f"stem_stride={stem_stride!r}: the small-input stem takes stride 1 or 2 (with small_input=True); the "
                "ImageNet stem (small_input=False) has its fixed stride 4"
            )
        bottleneck, blocks = RESNET_SETTINGS[depth]
        if any(dilate) and not bottleneck:
            raise ValueError(
                f"replace_stride_with_dilation needs bottleneck blocks (depth 50, 101, 152), not ResNet-{depth}'s "
                "basic blocks (torchvision's BasicBlock has no dilation either)"
            )
        self.depth, self.bottleneck = depth, bottleneck
        plan = ChannelPlan(widths, _int_round, norm=norm)
        self.num_classes = num_classes
        rule = plan.rule(64)
        c = rule.max_channels
        if small_input:
            stem: list[nn.Module] = [SlimConv2d(in_chans, c, 3, stem_stride, 1, bias=False, out_rule=rule)]
        else:
            stem = [SlimConv2d(in_chans, c, 7, 2, 3, bias=False, out_rule=rule)]
        stem += [plan.norm(rule, c), nn.ReLU(inplace=True)]
        if not small_input:
            stem.append(nn.MaxPool2d(3, 2, 1))
        features: list[nn.Module] = [nn.Sequential(*stem)]
        total_stride = stem_stride if small_input else 4
        stages = [("stem", 1, total_stride, rule, c)]
        expansion = 4 if bottleneck else 1
        dilation = 1
        for stage, n in enumerate(blocks):
            out_rule = plan.rule(STAGE_CHANNELS[stage] * expansion)
            stride, previous = (2 if stage != 0 else 1), dilation
            if stage != 0 and dilate[stage - 1]:  # torchvision's _make_layer(dilate=True)
                dilation, stride = dilation * stride, 1
            for i in range(n):
                first = i == 0
                features.append(
                    Block(rule, out_rule, stride if first else 1, bottleneck, plan, previous if first else dilation)
                )
                rule = out_rule
            total_stride *= stride
            stages.append((f"layer{stage + 1}", len(features), total_stride, rule, rule.max_channels))
        features.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*features)  # flat, as the official checkpoints' keys (features.N)
        self._set_stages(stages)
        self.stage_depths = blocks
        self.num_features = rule.max_channels
        self.classifier = self.make_classifier(self.num_features, num_classes, drop_rate, slim=True)
        init_weights(self)

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_chans, H, W)`` → logits ``(N, num_classes)`` at the current width."""
        layers = iter(self.features)
        x = next(layers)(x)  # stem
        for depth in self.stage_depths:
            x = _run_stage(layers, depth, x)
        x = next(layers)(x)  # global pooling
        return self.classifier(torch.flatten(x, 1))

    def torchvision_layers(self) -> Iterator[tuple[str, str, str]]:
        """torchvision's ResNet names: ``conv1``/``bn1`` (our stem), ``layerS.B.convK``/``bnK`` and
        ``layerS.B.downsample.{0,1}`` (our ``features.N.body.*`` and ``shortcut.*``)."""
        yield "conv1", "features.0.0", "conv"
        yield "bn1", "features.0.1", "bn"
        # torchvision conv/bn number -> our body index
        names = (("conv1", 0), ("bn1", 1), ("conv2", 3), ("bn2", 4))
        if self.bottleneck:
            names += (("conv3", 6), ("bn3", 7))
        k = 1
        for stage, depth in enumerate(self.stage_depths):
            for b in range(depth):
                tv, ours = f"layer{stage + 1}.{b}", f"features.{k}"
                for name, idx in names:
                    yield f"{tv}.{name}", f"{ours}.body.{idx}", "conv" if name.startswith("conv") else "bn"
                if hasattr(self.features[k], "shortcut"):  # type: ignore[index]
                    yield f"{tv}.downsample.0", f"{ours}.shortcut.0", "conv"
                    yield f"{tv}.downsample.1", f"{ours}.shortcut.1", "bn"
                k += 1


def _run_stage(layers: Iterator[nn.Module], depth: int, x: torch.Tensor) -> torch.Tensor:
    # ``x`` (the stage's input) stays referenced until the whole stage has run, as in torchvision's ResNet, whose
    # forward holds it while ``layerN`` runs. A flat nn.Sequential frees it after the stage's first block; with
    # glibc's malloc that order of frees lets the heap top be trimmed and faulted back in on every forward:
    # ~10k more page faults and 4-6% more time for ResNet-50 at batch 8 (benchmarks/RESULTS.md, "Latency").
    out = x
    for _ in range(depth):
        out = next(layers)(out)
    return out


@register_model
def slim_resnet18(**kwargs) -> SlimResNet:
    """Slimmable ResNet-18 (basic blocks), widths 0.25/0.5/0.75/1.0."""
    return SlimResNet(depth=18, **kwargs)


@register_model
def slim_resnet34(**kwargs) -> SlimResNet:
    """Slimmable ResNet-34 (basic blocks), widths 0.25/0.5/0.75/1.0."""
    return SlimResNet(depth=34, **kwargs)


@register_model(official="s_resnet")
def slim_resnet50(**kwargs) -> SlimResNet:
    """Slimmable ResNet-50, widths 0.25/0.5/0.75/1.0 (official S-ResNet-50)."""
    return SlimResNet(depth=50, **kwargs)


@register_model
def slim_resnet101(**kwargs) -> SlimResNet:
    """Slimmable ResNet-101, widths 0.25/0.5/0.75/1.0."""
    return SlimResNet(depth=101, **kwargs)
