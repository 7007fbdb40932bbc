"""Each slim layer at width w equals a plain PyTorch layer built from the sliced weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimmable.nn import (
    SlimConv2d,
    SlimLinear,
    SwitchableBatchNorm2d,
    USBatchNorm2d,
    WidthRange,
    WidthTable,
    make_divisible,
    set_width,
)

WIDTHS = (0.25, 0.5, 1.0)


def _dense_conv(slim: SlimConv2d, cin: int, cout: int, groups: int) -> nn.Conv2d:
    conv = nn.Conv2d(
        cin, cout, slim.kernel_size, slim.stride, slim.padding, slim.dilation, groups, slim.bias is not None
    )
    with torch.no_grad():
        conv.weight.copy_(slim.weight[:cout, : cin // groups])
        if slim.bias is not None:
            conv.bias.copy_(slim.bias[:cout])
    return conv


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_equals_dense_conv_from_sliced_weights(bias: bool, stride: int) -> None:
    out_rule = WidthTable.build(WIDTHS, [4, 8, 16])
    slim = SlimConv2d(12, 16, 3, stride, 1, bias=bias, out_rule=out_rule)
    for w, cin in zip(WIDTHS, (3, 6, 12)):
        slim.set_width(w)
        cout = out_rule(w)
        x = torch.randn(2, cin, 9, 9)
        torch.testing.assert_close(slim(x), _dense_conv(slim, cin, cout, 1)(x), rtol=0, atol=0)


def test_grouped_conv_equals_dense_grouped_conv() -> None:
    out_rule = WidthTable.build(WIDTHS, [6, 12, 24])
    slim = SlimConv2d(24, 24, 1, groups=3, bias=False, out_rule=out_rule)
    for w, cin in zip(WIDTHS, (6, 12, 24)):
        slim.set_width(w)
        x = torch.randn(2, cin, 5, 5)
        torch.testing.assert_close(slim(x), _dense_conv(slim, cin, out_rule(w), 3)(x), rtol=0, atol=0)


def test_depthwise_conv_follows_input_channels() -> None:
    slim = SlimConv2d(16, 16, 3, 2, 1, bias=True, depthwise=True)
    for cin in (4, 8, 16):
        x = torch.randn(2, cin, 8, 8)
        ref = F.conv2d(x, slim.weight[:cin], slim.bias[:cin], 2, 1, 1, cin)
        y = slim(x)
        assert y.shape == (2, cin, 4, 4)
        torch.testing.assert_close(y, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="depthwise"):
        SlimConv2d(8, 16, 3, depthwise=True)


def test_linear_equals_dense_linear() -> None:
    slim = SlimLinear(32, 10)
    for fin in (8, 16, 32):
        x = torch.randn(2, fin)
        torch.testing.assert_close(slim(x), F.linear(x, slim.weight[:, :fin], slim.bias), rtol=0, atol=0)
    slim_out = SlimLinear(32, 20, out_rule=WidthTable.build(WIDTHS, [5, 10, 20]))
    set_width(slim_out, 0.5)
    x = torch.randn(2, 16)
    torch.testing.assert_close(slim_out(x), F.linear(x, slim_out.weight[:10, :16], slim_out.bias[:10]))


def test_switchable_bn_keeps_separate_statistics_per_switch() -> None:
    bn = SwitchableBatchNorm2d(WidthTable.build(WIDTHS, [4, 8, 16]))
    bn.train()
    before = [b.running_mean.clone() for b in bn.bn]
    set_width(bn, 0.5)
    x = torch.randn(8, 8, 4, 4) + 3.0
    y = bn(x)
    # Only the 0.5 switch moved; in training mode the output is normalised with batch statistics.
    assert torch.equal(bn.bn[0].running_mean, before[0])
    assert torch.equal(bn.bn[2].running_mean, before[2])
    assert not torch.equal(bn.bn[1].running_mean, before[1])
    torch.testing.assert_close(bn.bn[1].running_mean, 0.1 * x.mean((0, 2, 3)))
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(8), atol=1e-5, rtol=0)
    bn.eval()
    ref = F.batch_norm(x, bn.bn[1].running_mean, bn.bn[1].running_var, bn.bn[1].weight, bn.bn[1].bias, False, 0, 1e-5)
    torch.testing.assert_close(bn(x), ref)


def test_us_bn_slices_shared_affine_and_uses_per_width_statistics() -> None:
    rule = WidthRange(16, 0.25, 1.0)
    bn = USBatchNorm2d(rule, stat_widths=(0.5, 1.0))
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
        bn.bn[0].running_mean.uniform_(-1, 1)
        bn.bn[0].running_var.uniform_(0.5, 2)
    bn.eval()
    set_width(bn, 0.5)
    x = torch.randn(2, 8, 3, 3)
    s = bn.bn[0]
    ref = F.batch_norm(x, s.running_mean, s.running_var, bn.weight[:8], bn.bias[:8], False, 0.0, 1e-5)
    torch.testing.assert_close(bn(x), ref)
    set_width(bn, 0.75)  # inside the range but without statistics
    with pytest.raises(RuntimeError, match="no statistics for width 0.75"):
        bn(torch.randn(2, 12, 3, 3))
    bn.train()
    assert bn(torch.randn(4, 12, 3, 3)).shape == (4, 12, 3, 3)


def test_make_divisible_matches_tf_slim_rounding() -> None:
    assert make_divisible(32 * 0.35) == 16  # 11.2 -> 8 is >10% down, so 16
    assert make_divisible(16 * 0.35) == 8
    assert make_divisible(24 * 0.75) == 24  # 18 -> 16 is >10% down
    assert make_divisible(96 * 0.35) == 32
    assert make_divisible(3.0, min_value=8) == 8
    assert make_divisible(1280 * 1.4) == 1792


def test_width_range_rule_is_official_us_rounding() -> None:
    rule = WidthRange(32 * 6, 0.35, 1.0, ratio=6)
    assert rule(1.0) == 192
    assert rule(0.35) == make_divisible(192 * 0.35 / 6) * 6 == 96
    with pytest.raises(ValueError, match=r"outside the width range \[0.35, 1\]"):
        rule(0.3)


def test_inference_weight_memo_is_invalidated_by_weight_updates() -> None:
    slim = SlimConv2d(8, 8, 1, bias=False, out_rule=WidthTable.build((0.5, 1.0), [4, 8]))
    slim_fc = SlimLinear(8, 3)
    set_width(slim, 0.5)
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        y1 = slim(x)
        assert slim._weight_memo  # narrowed weight memoised without autograd
        slim.weight.mul_(2.0)  # in-place update (as an optimizer step) bumps the version counter
        torch.testing.assert_close(slim(x), 2 * y1)
        slim.load_state_dict({"weight": torch.ones(8, 8, 1, 1)})
        torch.testing.assert_close(slim(x), x.sum(1, keepdim=True).expand(2, 4, 3, 3))
        torch.testing.assert_close(slim_fc(torch.ones(1, 4)), slim_fc.weight[:, :4].sum(1)[None] + slim_fc.bias)
        slim_fc.weight.zero_()
        torch.testing.assert_close(slim_fc(torch.ones(1, 4)), slim_fc.bias[None])
    # with autograd on, gradients flow into the full weight through the view (no memo involved)
    slim(x).sum().backward()
    assert slim.weight.grad is not None and slim.weight.grad[4:].abs().sum() == 0
    assert slim.weight.grad[:4].abs().sum() > 0


def test_weight_memo_dropped_on_mode_switch_for_writes_autograd_cannot_see() -> None:
    slim = SlimConv2d(8, 8, 1, bias=False, out_rule=WidthTable.build((0.5, 1.0), [4, 8])).eval()
    set_width(slim, 0.5)
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        y1 = slim(x)
        slim.weight.data.mul_(3.0)  # .data shares no version counter: the stamp cannot see this write
        slim.eval()  # what a training loop does before evaluating (e.g. after a dist.broadcast of the weights)
        torch.testing.assert_close(slim(x), 3 * y1)
        slim.weight.data.mul_(2.0)
        slim.clear_weight_memo()
        torch.testing.assert_close(slim(x), 6 * y1)


def test_parametrized_and_pruned_layers_use_their_computed_weights() -> None:
    # The inference fast paths read tensors from the parameter dicts; a parametrization or a pruning mask computes
    # ``weight`` instead, and must not be bypassed.
    from torch.nn.utils import parametrize, prune

    class Double(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    conv = SlimConv2d(8, 8, 1, bias=True, out_rule=WidthTable.build((0.5, 1.0), [4, 8])).eval()
    bn = SwitchableBatchNorm2d(WidthTable.build((0.5, 1.0), [4, 8])).eval()
    fc = SlimLinear(8, 3).eval()
    with torch.no_grad():
        for b in bn.bn:
            b.running_mean.uniform_(-1, 1)
            b.running_var.uniform_(0.5, 2)
        fc.weight.copy_(torch.linspace(-1, 1, 24).view(3, 8))  # the 12 smallest magnitudes include row 1
    parametrize.register_parametrization(conv, "weight", Double())
    prune.l1_unstructured(bn.bn[0], "weight", amount=2)
    prune.l1_unstructured(fc, "weight", amount=12)
    set_width(conv, 0.5)
    set_width(bn, 0.5)
    x = torch.randn(2, 4, 3, 3)
    with torch.inference_mode():
        y = conv(x)
        torch.testing.assert_close(y, F.conv2d(x, 2 * conv.parametrizations.weight.original[:4, :4], conv.bias[:4]))
        b0 = bn.bn[0]
        assert (b0.weight == 0).sum() == 2
        ref = F.batch_norm(y, b0.running_mean, b0.running_var, b0.weight, b0.bias, False, 0.0, b0.eps)
        torch.testing.assert_close(bn(y), ref)
        z = torch.randn(2, 4)
        assert (fc.weight[1] == 0).all()
        torch.testing.assert_close(fc(z), F.linear(z, fc.weight[:, :4], fc.bias))


def test_narrow_inference_compiles_without_graph_breaks() -> None:
    # The weight memo is skipped under torch.compile; its checks must not break the graph (fullgraph raises).
    rule = WidthTable.build((0.5, 1.0), [4, 8])
    net = nn.Sequential(
        SlimConv2d(3, 8, 3, padding=1, bias=False, out_rule=rule),
        SwitchableBatchNorm2d(rule),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        SlimLinear(8, 5),
    ).eval()
    set_width(net, 0.5)
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), net(x))
