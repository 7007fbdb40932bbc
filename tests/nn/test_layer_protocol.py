"""The layer protocol: export, cost and BN calibration ask each slimmable layer, so a new layer type is one class.

The two layer types below exist only in this file: a slimmable GroupNorm (no running statistics) and a BN with a
shared affine and one set of statistics per width. Nothing else in the package knows them, yet ``export_width``,
``count_active_params``/``count_macs`` and ``calibrate_bn`` handle a model built from them.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimmable.export import export_width, is_dense
from slimmable.nn import (
    SharedBatchNorm2d,
    SlimConv2d,
    SlimLinear,
    SlimModule,
    SwitchableBatchNorm2d,
    USBatchNorm2d,
    WidthRange,
    WidthTable,
    record_input_channels,
    set_width,
    use_width,
)
from slimmable.search import count_active_params, count_macs
from slimmable.train import calibrate_bn
from slimmable.train.incremental import FrozenSubnet

WIDTHS = (0.5, 1.0)


class SlimGroupNorm(SlimModule):
    """GroupNorm over the active channels with a fixed group count; affine sliced like a convolution's weight."""

    def __init__(self, rule: WidthTable, num_groups: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.rule, self.num_groups, self.eps = rule, num_groups, eps
        self.weight = nn.Parameter(torch.ones(rule.max_channels))
        self.bias = nn.Parameter(torch.zeros(rule.max_channels))
        self.width = rule.widths[-1]

    @property
    def channel_rules(self) -> tuple[WidthTable, ...]:
        return (self.rule,)

    def _resolve(self, width: float) -> float:
        self.rule(width)  # raises for a width the layer was not built for
        return width

    def _apply_state(self, state: object) -> None:
        self.width = state  # type: ignore[assignment]

    def _get_state(self) -> object:
        return self.width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        return F.group_norm(x, self.num_groups, self.weight[:c], self.bias[:c], self.eps)

    def to_dense(self, in_channels: int, *, fresh_stats: bool = False) -> nn.GroupNorm:
        gn = nn.GroupNorm(self.num_groups, in_channels, self.eps)
        with torch.no_grad():
            gn.weight.copy_(self.weight[:in_channels])
            gn.bias.copy_(self.bias[:in_channels])
        return gn.eval()


class SharedAffineBatchNorm2d(SlimModule):
    """One affine for all widths (sliced), running statistics per width in ``stats[i]`` (no affine)."""

    def __init__(self, rule: WidthTable) -> None:
        super().__init__()
        self.rule = rule
        self.weight = nn.Parameter(torch.ones(rule.max_channels))
        self.bias = nn.Parameter(torch.zeros(rule.max_channels))
        self.stats = nn.ModuleList(nn.BatchNorm2d(c, affine=False) for c in rule.channels)
        self.index = len(rule.widths) - 1
        self.width = rule.widths[-1]

    @property
    def channel_rules(self) -> tuple[WidthTable, ...]:
        return (self.rule,)

    def _resolve(self, width: float) -> tuple[float, int]:
        return (width, self.rule.index(width))

    def _apply_state(self, state: object) -> None:
        self.width, self.index = state  # type: ignore[misc]

    def _get_state(self) -> object:
        return (self.width, self.index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        return self.stats[self.index](x) * self.weight[:c, None, None] + self.bias[:c, None, None]

    def to_dense(self, in_channels: int, *, fresh_stats: bool = False) -> nn.BatchNorm2d:
        stats = self.stats[self.index]
        bn = nn.BatchNorm2d(in_channels, stats.eps)
        with torch.no_grad():
            bn.weight.copy_(self.weight[:in_channels])
            bn.bias.copy_(self.bias[:in_channels])
            if not fresh_stats:
                bn.running_mean.copy_(stats.running_mean)
                bn.running_var.copy_(stats.running_var)
        return bn.eval()

    def stat_layers(self) -> list[nn.modules.batchnorm._BatchNorm]:
        return [self.stats[self.index]]


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        r16, r32 = WidthTable.build(WIDTHS, [8, 16]), WidthTable.build(WIDTHS, [16, 32])
        self.conv1 = SlimConv2d(3, 16, 3, padding=1, bias=False, out_rule=r16)
        self.norm1 = SharedAffineBatchNorm2d(r16)
        self.conv2 = SlimConv2d(16, 32, 3, stride=2, padding=1, out_rule=r32)
        self.norm2 = SlimGroupNorm(r32, num_groups=4)
        self.fc = SlimLinear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(x)))
        x = F.relu(self.norm2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class DenseSqueezeExcite(nn.Module):
    def __init__(self, reduce: nn.Conv2d, expand: nn.Conv2d) -> None:
        super().__init__()
        self.reduce, self.expand = reduce, expand

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))


class SlimSqueezeExcite(SlimModule):
    """A composite layer: slimmable 1x1 convs inside; exported and counted as one unit (its children are not)."""

    def __init__(self, rule: WidthTable, reduced: WidthTable) -> None:
        super().__init__()
        self.reduce = SlimConv2d(rule.max_channels, reduced.max_channels, 1, out_rule=reduced)
        self.expand = SlimConv2d(reduced.max_channels, rule.max_channels, 1, out_rule=rule)
        self.width = rule.widths[-1]

    def _resolve(self, width: float) -> float:
        return width  # the children resolve their own sizes

    def _apply_state(self, state: object) -> None:
        self.width = state  # type: ignore[assignment]

    def _get_state(self) -> object:
        return self.width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))

    def to_dense(self, in_channels: int, *, fresh_stats: bool = False) -> DenseSqueezeExcite:
        reduce = self.reduce.to_dense(in_channels)
        return DenseSqueezeExcite(reduce, self.expand.to_dense(reduce.out_channels)).eval()


class TinySENet(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.se = SlimSqueezeExcite(WidthTable.build(WIDTHS, [16, 32]), WidthTable.build(WIDTHS, [4, 8]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(x)))
        x = self.se(F.relu(self.norm2(self.conv2(x))))
        return self.fc(x.mean((2, 3)))


def _tiny() -> TinyNet:
    torch.manual_seed(0)
    net = TinyNet()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for bn in net.norm1.stats:
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(4, 3, 16, 16, generator=g) * 2 + 1 for _ in range(n)]


@pytest.mark.parametrize("width", WIDTHS)
def test_export_width_handles_layer_types_defined_outside_the_package(width: float) -> None:
    net = _tiny()
    dense = export_width(net, width)
    assert is_dense(dense)
    assert type(dense.norm1) is nn.BatchNorm2d and type(dense.norm2) is nn.GroupNorm
    assert dense.norm2.num_channels == (16 if width == 0.5 else 32)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), use_width(net, width):
        torch.testing.assert_close(dense(x), net(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("width", WIDTHS)
def test_cost_of_new_layer_types_equals_their_dense_export(width: float) -> None:
    net = _tiny()
    x = torch.randn(1, 3, 16, 16)
    dense = export_width(net, width)
    with use_width(net, width):
        params = count_active_params(net, x)
        macs = count_macs(net, x)
    # every parameter of the dense export is used; the default active_params counts to_dense's parameters
    assert params == sum(p.numel() for p in dense.parameters())
    c1, c2 = (8, 16) if width == 0.5 else (16, 32)
    assert params == c1 * 3 * 9 + 2 * c1 + (c2 * c1 * 9 + c2) + 2 * c2 + (5 * c2 + 5)
    assert macs == count_macs(dense, x) == c1 * 3 * 9 * 16 * 16 + c2 * c1 * 9 * 8 * 8 + 5 * c2


@pytest.mark.parametrize("width", WIDTHS)
def test_a_composite_layer_is_exported_and_counted_as_one_unit(width: float) -> None:
    torch.manual_seed(0)
    net = TinySENet().eval()
    dense = export_width(net, width)
    assert type(dense.se) is DenseSqueezeExcite and is_dense(dense)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), use_width(net, width):
        torch.testing.assert_close(dense(x), net(x), atol=1e-5, rtol=0)
        params = count_active_params(net, x)
    assert params == sum(p.numel() for p in dense.parameters())  # the inner convs are not counted twice
    c2, r = (16, 4) if width == 0.5 else (32, 8)
    assert sum(p.numel() for p in dense.se.parameters()) == (r * c2 + r) + (c2 * r + c2)


def test_calibrate_bn_fills_the_statistics_a_new_layer_type_names() -> None:
    net = _tiny()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    used = calibrate_bn(net, _batches(3), widths=[0.5], num_batches=3)
    assert used == {0.5: 12}
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"norm1.stats.0.running_mean", "norm1.stats.0.running_var", "norm1.stats.0.num_batches_tracked"}
    with torch.no_grad(), use_width(net, 0.5):
        acts = torch.stack([net.conv1(x) for x in _batches(3)])  # (batch, N, C, H, W)
    # the cumulative average over the batches of each batch's mean and (unbiased) variance
    torch.testing.assert_close(net.norm1.stats[0].running_mean, acts.mean((1, 3, 4)).mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(net.norm1.stats[0].running_var, acts.var((1, 3, 4)).mean(0), rtol=1e-4, atol=1e-5)
    assert not net.training and not any(m.training for m in net.modules())


def test_incremental_training_freezes_the_blocks_a_new_layer_type_uses() -> None:
    net = _tiny()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    with torch.no_grad(), use_width(net, 0.5):
        narrow = net(x)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    frozen = FrozenSubnet(net, 0.5, x[:1], opt)
    net.train()
    set_width(net, 1.0)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        assert net.norm2.weight.grad[:16].abs().sum() == 0 and net.norm2.weight.grad[16:].abs().sum() > 0
        opt.step()
    frozen.remove()
    net.eval()
    with torch.no_grad(), use_width(net, 0.5):
        torch.testing.assert_close(net(x), narrow, rtol=0, atol=0)


def test_record_input_channels_reads_each_layers_channel_dim() -> None:
    net = _tiny()
    set_width(net, 0.5)
    seen = record_input_channels(net, torch.randn(1, 3, 16, 16))
    assert seen == {"conv1": 3, "norm1": 8, "conv2": 8, "norm2": 16, "fc": 16}


def test_a_layer_without_to_dense_is_a_clear_error() -> None:
    class NoDense(SlimGroupNorm):
        to_dense = SlimModule.to_dense

    net = _tiny()
    net.norm2 = NoDense(WidthTable.build(WIDTHS, [16, 32]), 4)
    with pytest.raises(TypeError, match=r"NoDense has no dense equivalent; implement NoDense.to_dense"):
        export_width(net, 1.0)


def _built_in_layers() -> list[tuple[SlimModule, int]]:
    """Each built-in slimmable layer with random tensors, set to a narrow width, and its input channels there."""
    table = WidthTable.build(WIDTHS, [4, 8])
    us = USBatchNorm2d(WidthRange(16, 0.5, 1.0), stat_widths=WIDTHS)  # 8 channels at 0.5
    layers: list[tuple[SlimModule, int]] = [
        (SlimConv2d(8, 8, 3, padding=1, out_rule=table), 4),
        (SlimConv2d(8, 8, 3, padding=1, depthwise=True), 4),
        (SlimLinear(8, 8, out_rule=table), 4),
        (SwitchableBatchNorm2d(table), 4),
        (us, 8),
        (SharedBatchNorm2d(table), 4),
    ]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m, _ in layers:
            for t in [*m.parameters(), *(b for b in m.buffers() if b.is_floating_point())]:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            m.set_width(0.5)
            m.eval()
    return layers


def test_built_in_layers_to_dense_load_dense_and_active_params_agree() -> None:
    for m, cin in _built_in_layers():
        x = torch.randn(2, cin, 5, 5) if m.channel_dim == 1 else torch.randn(2, cin)
        dense = m.to_dense(cin)
        assert not any(isinstance(c, SlimModule) for c in dense.modules())
        with torch.no_grad():
            torch.testing.assert_close(dense(x), m(x), atol=1e-6, rtol=0)
        assert m.active_params(cin) == sum(p.numel() for p in dense.parameters()), type(m).__name__
        assert m.active_params(cin) == sum(p[idx].numel() for p, idx in m.active_slices(cin)), type(m).__name__
        # load_dense writes the active part only: into a zeroed copy it restores exactly what to_dense took
        blank = copy.deepcopy(m)
        with torch.no_grad():
            for t in [*blank.parameters(), *(b for b in blank.buffers() if b.is_floating_point())]:
                t.zero_()
        blank.load_dense(dense)
        with torch.no_grad():
            torch.testing.assert_close(blank(x), m(x), atol=1e-6, rtol=0)
        wide = blank.to_dense(cin)
        for (k, a), b in zip(dense.state_dict().items(), wide.state_dict().values()):
            assert torch.equal(a, b), (type(m).__name__, k)


def test_shared_bn_exports_at_the_current_width() -> None:
    table = WidthTable.build(WIDTHS, [4, 8])
    m = SharedBatchNorm2d(table)
    with torch.no_grad():
        m.running_mean.copy_(torch.arange(8.0))
        m.running_var.copy_(torch.arange(1.0, 9.0))
    m.set_width(0.5)
    dense = m.to_dense(4)
    assert type(dense) is nn.BatchNorm2d and dense.num_features == 4
    assert torch.equal(dense.running_mean, torch.arange(4.0)) and torch.equal(dense.running_var, torch.arange(1.0, 5.0))
    assert torch.equal(m.to_dense(4, fresh_stats=True).running_var, torch.ones(4))
    assert m.stats_shared_by_widths and m.stat_layers() == [m]
