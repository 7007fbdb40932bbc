"""Converted layers: the switchable BN keeps the original keys; indexed conv/linear equal dense layers."""

from __future__ import annotations

import torch
from torch import nn

from slimmable.nn import WidthTable
from slimmable.nn.converted import ConvertedBatchNorm2d, IndexedSlimConv2d


def test_converted_bn_loads_original_state_dict_and_restarts_switches() -> None:
    bn = nn.BatchNorm2d(8).eval()
    index = {0.5: torch.tensor([0, 1, 4, 5]), 1.0: torch.arange(8)}
    conv_bn = ConvertedBatchNorm2d(bn, index)
    other = nn.BatchNorm2d(8)
    other.running_mean.normal_()
    conv_bn.load_state_dict(other.state_dict(), strict=True)
    torch.testing.assert_close(conv_bn.switches[0].running_mean, other.running_mean[index[0.5]])
    assert set(other.state_dict()) < set(conv_bn.state_dict())


def test_indexed_conv_equals_dense_conv_of_gathered_weights() -> None:
    conv = nn.Conv2d(8, 6, 3, padding=1)
    idx = torch.tensor([0, 2, 3, 7])
    slim = IndexedSlimConv2d(conv, WidthTable.build((0.5, 1.0), [3, 6]), {0.5: idx, 1.0: None}).eval()
    slim.set_width(0.5)
    x = torch.randn(2, 4, 5, 5)
    ref = nn.functional.conv2d(x, conv.weight[:3][:, idx], conv.bias[:3], padding=1)
    torch.testing.assert_close(slim(x), ref)
    torch.testing.assert_close(slim.to_dense(4)(x), ref)
