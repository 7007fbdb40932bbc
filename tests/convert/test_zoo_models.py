"""The conversion guarantees on the torchvision zoo and a user-written CNN: at width 1.0 the converted model equals
the original; the original's state dict loads; at every width the output keeps its shape, ``export_width`` gives
a plain model with equal outputs, and MACs fall as the width falls."""

from __future__ import annotations

import itertools

import pytest
import torch
import torchvision
from torch import nn

import slimmable
from slimmable.export import export_width, is_dense
from slimmable.search.cost import count_macs

WIDTHS = (0.25, 0.5, 0.75, 1.0)


class PlainCNN(nn.Module):
    """A user-written CNN that ends in flatten then Linear (fixed 32x32 input)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 8 * 8, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.flatten(x, 1)
        return self.fc2(torch.relu(self.fc1(x)))


# model -> smallest convenient square input side
FAST = {
    "plain_cnn": 32,
    "resnet18": 32,
    "mobilenet_v2": 32,
    "mobilenet_v3_small": 32,
    "mnasnet1_0": 32,
    "efficientnet_b0": 32,
    "regnet_y_400mf": 32,
    "shufflenet_v2_x1_0": 32,
    "squeezenet1_1": 64,
    "googlenet": 32,
    "convnext_tiny": 32,
}
SLOW = {
    "resnet50": 32,
    "resnext50_32x4d": 32,
    "wide_resnet50_2": 32,
    "mobilenet_v3_large": 32,
    "densenet121": 32,
    "vgg11_bn": 32,
}


def _build(name: str) -> nn.Module:
    if name == "plain_cnn":
        model = PlainCNN()
    else:
        kwargs = {"init_weights": True} if name == "googlenet" else {}
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():  # statistics and affine away from their defaults, so that they matter
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.normal_(0, 0.2, generator=gen)
    return model.eval()


_CACHE: dict[str, tuple] = {}


def _case(name: str, size: int) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """(original, converted, input, original output), converted once per model."""
    if name not in _CACHE:
        torch.manual_seed(0)
        original = _build(name)
        x = torch.randn(1, 3, size, size)
        before = {k: v.clone() for k, v in original.state_dict().items()}
        converted = slimmable.convert(original, widths=WIDTHS, example_input=x).eval()
        # the original is untouched: same tensors, same layer types
        after = original.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert not any(isinstance(m, slimmable.nn.SlimModule) for m in original.modules())
        with torch.no_grad():
            ref = original(x)
        _CACHE[name] = (original, converted, x, ref)
    return _CACHE[name]


def _check(name: str, size: int) -> None:
    original, model, x, ref = _case(name, size)
    report = model.conversion_report
    assert len(report.groups) > 0, report.format()
    if name == "googlenet":  # auxiliary heads only run in training mode: the report says the graph follows eval
        assert any("self.training" in note for note in report.notes)
    with torch.no_grad():
        # the original's state dict loads (same keys; narrower switches restart from the loaded statistics)
        model.load_state_dict(original.state_dict(), strict=True)
        model.set_width(1.0)
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0)
        macs = []
        for w in WIDTHS:
            model.set_width(w)
            y = model(x)
            assert y.shape == ref.shape
            dense = export_width(model, w, example=x)
            assert is_dense(dense)
            torch.testing.assert_close(dense(x), y, atol=1e-5, rtol=1e-4)
            macs.append(count_macs(model, x))
        model.set_width(1.0)
    assert all(a < b for a, b in itertools.pairwise(macs)), f"MACs per width {macs}"


@pytest.mark.parametrize("name", list(FAST))
def test_converts(name: str) -> None:
    _check(name, FAST[name])
    _CACHE.pop(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW))
def test_converts_large(name: str) -> None:
    _check(name, SLOW[name])
    _CACHE.pop(name)
