"""Incremental training keeps the frozen narrow network bit-identical while the added channels learn."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import slimmable
from slimmable.nn import record_input_channels
from slimmable.train.incremental import FrozenSubnet


def test_frozen_subnet_output_unchanged_while_wider_width_trains() -> None:
    torch.manual_seed(0)
    model = slimmable.create_model("slim_mobilenet_v2", widths=(0.5, 1.0), num_classes=10, small_input=True)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    with model.use_width(0.5):
        assert record_input_channels(model.eval(), x[:1])["features.2.body.0"] == 8
    model.eval()
    with torch.no_grad(), model.use_width(0.5):
        narrow_before = model(x)
    with torch.no_grad(), model.use_width(1.0):
        wide_before = model(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    frozen = FrozenSubnet(model, 0.5, x[:1], opt)
    model.train()
    model.set_width(1.0)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        # gradients of the frozen slices are zero already
        assert model.features[2].body[0].weight.grad[:48, :8].abs().sum() == 0
        opt.step()
    model.eval()
    with torch.no_grad(), model.use_width(0.5):
        torch.testing.assert_close(model(x), narrow_before, rtol=0, atol=0)
    with torch.no_grad(), model.use_width(1.0):
        assert not torch.allclose(model(x), wide_before)
    frozen.remove()
    model.train()
    model.set_width(0.5)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert model.features[2].body[0].weight.grad[:48, :8].abs().sum() > 0
