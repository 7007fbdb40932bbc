"""convert's coupling and degradation on small hand-written models, create_model("torchvision/..."), the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import slimmable
from slimmable.export import export_width
from slimmable.nn.converted import ConvertedBatchNorm2d, IndexedSlimConv2d, IndexedSlimLinear


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.b = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(24)
        self.head = nn.Conv2d(24, 8, 1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        return self.fc(torch.flatten(y, 1))


def test_concat_consumer_takes_both_prefixes_and_flatten_takes_hw_blocks() -> None:
    model = Concat().eval()
    x = torch.randn(2, 3, 4, 4)
    slim = slimmable.convert(model, widths=(0.5, 1.0), example_input=x).eval()
    assert isinstance(slim.head, IndexedSlimConv2d) and isinstance(slim.bn, ConvertedBatchNorm2d)
    slim.set_width(0.5)
    # a keeps 8 of 16, b 4 of 8: the concat holds positions 0..7 and 16..19
    assert slim.head._index().tolist() == [*range(8), *range(16, 20)]
    # head keeps 4 of 8 channels: flatten gives the first 4 blocks of 4*4 features, a prefix
    assert isinstance(slim.fc, IndexedSlimLinear) and slim.fc._index() is None
    with torch.no_grad():
        y = slim(x)
        a, b = model.a(x)[:, :8], model.b(x)[:, :4]
        bn = slim.bn.switches[0]
        # the narrow switch started from the original statistics of the kept channels
        keep = torch.tensor([*range(8), *range(16, 20)])
        torch.testing.assert_close(bn.running_mean, model.bn.running_mean[keep])
        h = nn.functional.conv2d(bn(torch.cat([a, b], 1)), model.head.weight[:4, keep], model.head.bias[:4])
        ref = nn.functional.linear(h.flatten(1), model.fc.weight[:, :64], model.fc.bias)
        torch.testing.assert_close(y, ref)
        torch.testing.assert_close(export_width(slim, 0.5, example=x)(x), y)


class Untraceable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return x
        return -x


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.odd = Untraceable()
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.c3 = nn.Conv2d(16, 32, 3, padding=1)
        self.c4 = nn.Conv2d(32, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.odd(self.c1(x))
        x = torch.roll(self.c2(x), 1, dims=1)  # an operation the analysis does not know
        return self.c4(self.c3(x)).mean((2, 3))


def test_untraceable_module_and_unknown_op_freeze_their_channels_and_are_reported() -> None:
    model = Mixed().eval()
    x = torch.randn(1, 3, 8, 8)
    slim = slimmable.convert(model, widths=(0.5, 1.0), example_input=x).eval()
    report = slim.conversion_report
    assert "odd" in report.untraced and "TraceError" in report.untraced["odd"]
    frozen = {layer: why for layers, why in report.frozen_groups for layer in layers}
    assert "cannot be traced" in frozen["c1"] and "roll" in frozen["c2"]
    assert [g.layers for g in report.groups] == [("c3",)]  # only c3's output slims
    assert "roll" in report.format()
    with torch.no_grad():
        torch.testing.assert_close(slim(x), model(x))
        slim.set_width(0.5)
        assert slim(x).shape == (1, 8)


def test_convert_rejects_widths_without_one() -> None:
    with pytest.raises(ValueError, match="must be 1.0"):
        slimmable.convert(Concat(), widths=(0.25, 0.5))


def test_torchvision_model_checkpoint_rebuilds(tmp_path: Path) -> None:
    from slimmable.checkpoint import build_model_from_checkpoint
    from slimmable.cli.main import main

    out = tmp_path / "sq.pt"
    assert main(["convert", "torchvision/squeezenet1_1", "--widths", "0.5,1.0", "--num-classes", "7",
                 "--input-size", "64", "--out", str(out)]) == 0  # fmt: skip
    model = build_model_from_checkpoint(out)
    assert model.model_name == "torchvision/squeezenet1_1" and model.widths == (0.5, 1.0)
    x = torch.randn(1, 3, 64, 64)
    ref = torch.load(out, weights_only=True)["model"]
    assert all(torch.equal(ref[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert model(x).shape == (1, 7)


def test_create_model_torchvision_in_chans_and_unknown_name() -> None:
    model = slimmable.create_model("torchvision/mobilenet_v3_small", widths=(0.5, 1.0), num_classes=10, in_chans=1,
                                   small_input=True).eval()  # fmt: skip
    stem = model.get_submodule("features.0.0")
    assert stem.in_channels == 1 and stem.stride == (1, 1)
    with torch.no_grad(), model.use_width(0.5):
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="mobilenet_v3_small"):
        slimmable.create_model("torchvision/mobilenet_v3_smal")


def test_calibrate_bn_and_profile_work_on_a_converted_model() -> None:
    from slimmable.search.cost import profile_widths
    from slimmable.train import calibrate_bn

    model = Concat().eval()
    slim = slimmable.convert(model, widths=(0.5, 1.0), example_input=torch.randn(1, 3, 4, 4))
    batches = [(torch.randn(8, 3, 4, 4) * 3 + 1, torch.zeros(8, dtype=torch.long)) for _ in range(2)]
    calibrate_bn(slim, batches, widths=[0.5])
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        feats = torch.cat([model.a(x)[:, :8], model.b(x)[:, :4]], 1)
    # width 0.5's switch now holds the statistics of the calibration data; width 1.0's are untouched
    torch.testing.assert_close(slim.bn.switches[0].running_mean, feats.mean((0, 2, 3)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(slim.bn.running_mean, model.bn.running_mean)
    macs = [p.macs for p in profile_widths(slim, input_size=(3, 4, 4), latency_runs=0)]
    assert macs[0] < macs[1]


class UserSE(nn.Module):
    """Squeeze-excitation as user code writes it: sizes read from the tensor, view, expand_as, squeeze."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.fc = nn.Sequential(nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 32), nn.Sigmoid())
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        b, c, _, _ = x.size()
        y = self.fc(x.mean((2, 3)).view(b, c)).view(b, c, 1, 1)
        x = x * y.expand_as(x)
        return self.head(nn.functional.adaptive_avg_pool2d(x, 1).squeeze(-1).squeeze(-1))


def test_user_written_squeeze_excitation_slims() -> None:
    model = UserSE().eval()
    x = torch.randn(2, 3, 8, 8)
    slim = slimmable.convert(model, widths=(0.5, 1.0), example_input=x).eval()
    report = slim.conversion_report
    layers = sorted(sorted(g.layers) for g in report.groups)
    # the excitation's output is tied to the convolution's channels by the multiply; its hidden layer slims alone
    assert layers == [["conv", "fc.2"], ["fc.0"]], report.format()
    assert not report.frozen_ops
    with torch.no_grad():
        torch.testing.assert_close(slim(x), model(x))
        slim.set_width(0.5)
        torch.testing.assert_close(export_width(slim, 0.5, example=x)(x), slim(x))
