"""A family of random user-style CNNs through ``slimmable.convert``: every construct (concatenation, residual add,
``view``/``reshape``/``flatten`` with ``-1``, ``permute`` to channels-last and back, a mean over dimensions,
adaptive pooling) is converted or frozen with a report, never a crash. Spatial sizes are drawn to coincide with
channel counts, so a spatial dimension taken for a channel dimension would show."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

import slimmable
from slimmable.export import export_width, is_dense
from slimmable.nn import set_width
from slimmable.search.cost import count_macs

WIDTHS = (0.25, 0.5, 0.75, 1.0)


class Branches(nn.Module):
    """Two convolutions concatenated on the channels (an Inception-style block), then a 1x1 mix."""

    def __init__(self, c: int, rng: random.Random) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU())
        self.mix = nn.Conv2d(2 * c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(torch.cat([self.a(x), self.b(x)], 1))


class Residual(nn.Module):
    def __init__(self, c: int, rng: random.Random) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv(x))


class ChannelsLastMLP(nn.Module):
    """ConvNeXt-style: permute to (N, H, W, C), LayerNorm and Linear on the channels, permute back."""

    def __init__(self, c: int, rng: random.Random) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.fc = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.permute(0, 2, 3, 1)
        y = self.fc(self.norm(y))
        return x + y.permute(0, 3, 1, 2)


class MeanGate(nn.Module):
    """Squeeze-excitation written with a mean over the spatial dimensions."""

    def __init__(self, c: int, rng: random.Random) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, max(1, c // 2), 1), nn.Conv2d(max(1, c // 2), c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


class Down(nn.Module):
    def __init__(self, c_in: int, c_out: int, rng: random.Random) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, rng.choice([2, 3]), stride=2, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


BLOCKS = (Branches, Residual, ChannelsLastMLP, MeanGate)


class Head(nn.Module):
    """One of the ways user code ends a CNN."""

    def __init__(self, c: int, side: int, kind: str, num_classes: int = 5) -> None:
        super().__init__()
        self.kind = kind
        if kind in ("view", "reshape", "flatten", "method_flatten"):
            self.fc = nn.Linear(c * side * side, num_classes)  # flattens the whole feature map
        elif kind == "adaptive":
            self.pool = nn.AdaptiveAvgPool2d(2)
            self.fc = nn.Linear(c * 4, num_classes)
        else:  # "mean"
            self.fc = nn.Linear(c, num_classes)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "view":
            return self.fc(y.view(y.size(0), -1))
        if self.kind == "reshape":
            return self.fc(y.reshape(y.shape[0], -1))
        if self.kind == "flatten":
            return self.fc(torch.flatten(y, 1))
        if self.kind == "method_flatten":
            return self.fc(y.flatten(1))
        if self.kind == "adaptive":
            return self.fc(self.pool(y).view(y.size(0), -1))
        return self.fc(y.mean(dim=[2, 3]))


class RandomCNN(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        rng = random.Random(seed)
        c = rng.choice([4, 8])
        self.side = side = rng.choice([16, 17, 18, 32])
        layers: list[nn.Module] = [nn.Conv2d(3, c, 3, padding=1), nn.ReLU()]
        for _ in range(rng.randint(1, 3)):
            layers.append(rng.choice(BLOCKS)(c, rng))
            if rng.random() < 0.6:
                c_out = rng.choice([c, 2 * c])
                layers.append(Down(c, c_out, rng))
                side = (side - layers[-1].conv.kernel_size[0]) // 2 + 1
                c = c_out
        self.body = nn.Sequential(*layers)
        self.head = Head(c, side, rng.choice(["view", "reshape", "flatten", "method_flatten", "adaptive", "mean"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@pytest.mark.parametrize("seed", range(24))
def test_random_cnn_converts_or_freezes_never_crashes(seed: int) -> None:
    torch.manual_seed(seed)
    model = RandomCNN(seed).eval()
    for m in model.modules():  # statistics and affine parameters away from their defaults
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.weight.data.normal_()
    x = torch.randn(2, 3, model.side, model.side)
    with torch.no_grad():
        ref = model(x)
    slim = slimmable.convert(model, widths=WIDTHS, example_input=x[:1]).eval()
    report = slim.conversion_report
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    assert slim.example_input_size == (3, model.side, model.side)
    text = report.format()
    for where, why in report.frozen_ops:  # everything kept at full width is named with a reason
        assert why and where in text
    with torch.no_grad():
        torch.testing.assert_close(slim(x), ref, atol=1e-4, rtol=1e-4)
        macs = {}
        for w in WIDTHS:
            set_width(slim, w)
            y = slim(x)
            assert y.shape == ref.shape
            macs[w] = count_macs(slim, x)
            # the default probe of export_width is the traced input size: no example needed
            dense = export_width(slim, w)
            assert is_dense(dense)
            torch.testing.assert_close(dense(x), y, atol=1e-4, rtol=1e-4)
    assert macs[0.5] <= 0.6 * macs[1.0]  # every construct here slims: only the classifier's outputs stay
