"""convert(width_range=...): universally slimmable converted models (any width, US BN, calibration, sandwich)."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import slimmable
from slimmable.checkpoint import build_model_from_checkpoint, model_checkpoint, save_checkpoint
from slimmable.cli.main import main
from slimmable.convert.zoo import create_original_model
from slimmable.export import export_width
from slimmable.nn import USBatchNorm2d, make_divisible
from slimmable.nn.converted import ConvertedUSBatchNorm2d
from slimmable.search.cost import count_macs
from slimmable.train import Sandwich, calibrate_bn, train_step

WIDTHS = (0.37, 0.5, 0.83, 1.0)


class Concat(torch.nn.Module):
    """Two slimmed tensors concatenated: at a width, the active channels are two blocks, not a prefix."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 16, 1), torch.nn.Conv2d(3, 16, 1)
        self.bn = torch.nn.BatchNorm2d(32)
        self.fc = torch.nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(torch.cat([self.a(x), self.b(x)], 1)).mean((2, 3)))


def _original(arch: str) -> torch.nn.Module:
    """A small-input torchvision model whose BN statistics are not the defaults (so equality means something)."""
    torch.manual_seed(2)
    model = create_original_model(f"torchvision/{arch}", num_classes=10, small_input=True)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0.0, 0.2)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize(("arch", "stem"), [("resnet18", "conv1"), ("mobilenet_v2", "features.0.0")])
def test_any_width_runs_equals_the_original_at_one_and_exports(arch: str, stem: str) -> None:
    original = _original(arch)
    x = torch.randn(4, 3, 32, 32)
    us = slimmable.convert(original, width_range=(0.25, 1.0), example_input=x[:1]).eval()
    assert us.width_range == (0.25, 1.0) and us.widths == (0.25, 1.0)
    assert us.conversion_report.max_abs_diff == 0.0
    bns = [m for m in us.modules() if isinstance(m, ConvertedUSBatchNorm2d)]
    assert bns and all(isinstance(m, USBatchNorm2d) for m in bns)  # the US machinery, not a fork
    with torch.no_grad():
        torch.testing.assert_close(us(x), original(x), rtol=0, atol=0)
    # the stem's channels follow the US rule at every width, on the fly (no table)
    full = original.get_submodule(stem).out_channels
    for w in WIDTHS:
        us.set_width(w)
        assert us.get_submodule(stem).active_out == make_divisible(full * w, 8)
    # BN calibration gives the new widths statistics; eval mode then runs them, and their dense export agrees
    batches = [(torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long)) for _ in range(2)]
    calibrate_bn(us, batches, widths=[0.37, 0.5, 0.83])
    assert us.widths == (0.25, 0.37, 0.5, 0.83, 1.0)
    macs = []
    with torch.no_grad():
        torch.testing.assert_close(us.set_width(1.0) or us(x), original(x), rtol=0, atol=0)  # 1.0 kept its stats
        for w in WIDTHS:
            with us.use_width(w):
                y = us(x)
                assert y.shape == (4, 10) and torch.isfinite(y).all()
                macs.append(count_macs(us, x[:1]))
        dense = export_width(us, 0.37, example=x[:1])
        with us.use_width(0.37):
            torch.testing.assert_close(dense(x), us(x), rtol=1e-5, atol=1e-5)
    assert macs == sorted(macs) and macs[0] < 0.2 * macs[-1]


def test_calibrated_statistics_are_the_narrow_network_statistics() -> None:
    original = _original("resnet18")
    us = slimmable.convert(original, width_range=(0.25, 1.0), example_input=torch.randn(1, 3, 32, 32))
    x = torch.randn(16, 3, 32, 32)
    calibrate_bn(us, [(x, torch.zeros(16, dtype=torch.long))], widths=[0.37])
    bn1 = us.get_submodule("bn1")
    slot = bn1.bn[bn1.stat_widths.index(0.37)]
    with torch.no_grad():
        h = F.conv2d(x, original.conv1.weight[:24], None, 1, 3)  # 0.37 * 64 -> 24 channels, stride-1 stem
    torch.testing.assert_close(slot.running_mean, h.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(slot.running_var, h.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-5)
    full = bn1.bn[bn1.stat_widths.index(1.0)]
    torch.testing.assert_close(full.running_mean, original.bn1.running_mean)  # untouched


def test_sandwich_step_with_inplace_distillation_trains_the_range_ends() -> None:
    us = slimmable.convert(_original("mobilenet_v2"), width_range=(0.25, 1.0), example_input=torch.randn(1, 3, 32, 32))
    us.train()
    before = copy.deepcopy(us.state_dict())
    widths = Sandwich(0.25, 1.0, n=4).widths_for_step(0, random.Random(0))
    assert widths[0] == 1.0 and widths[-1] == 0.25 and all(0.25 < w < 1.0 for w in widths[1:-1])
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    opt = torch.optim.SGD(us.parameters(), lr=0.1)
    res = train_step(us, opt, x, y, widths, inplace_distill=True)
    assert torch.isfinite(res.losses).all() and res.losses.shape == (4,)
    after = us.state_dict()
    assert not torch.equal(after["features.0.0.weight"], before["features.0.0.weight"])
    # the range ends keep statistics (trained), the random widths have none: batch statistics only
    bn = "features.0.1"
    assert not torch.equal(after[f"{bn}.bn.0.running_mean"], before[f"{bn}.bn.0.running_mean"])
    assert not torch.equal(after[f"{bn}.bn.1.running_mean"], before[f"{bn}.bn.1.running_mean"])
    assert us.get_submodule(bn).stat_widths == (0.25, 1.0)


def test_checkpoint_rebuilds_with_its_calibrated_widths_and_the_cli_converts_a_range(tmp_path: Path, capsys) -> None:
    us = slimmable.create_model("torchvision/mobilenet_v2", num_classes=10, small_input=True, width_range=(0.25, 1.0))
    calibrate_bn(us, [(torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long))], widths=[0.6])
    path = save_checkpoint(tmp_path / "us.pt", model_checkpoint(us))
    again = build_model_from_checkpoint(path)
    assert again.widths == (0.25, 0.6, 1.0) and again.width_range == (0.25, 1.0)
    x = torch.randn(2, 3, 32, 32)
    us.eval()
    with torch.no_grad(), us.use_width(0.6), again.use_width(0.6):
        torch.testing.assert_close(again(x), us(x), rtol=0, atol=0)
    out = tmp_path / "cli.pt"
    argv = ["convert", "torchvision/resnet18", "--width-range", "0.25,1.0", "--stat-widths", "0.25,0.5,1.0",
            "--num-classes", "10", "--input-size", "32", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "any width in [0.25, 1]" in text and "0.5" in text
    assert build_model_from_checkpoint(out).widths == (0.25, 0.5, 1.0)


def test_original_state_dict_loads_into_the_range_model() -> None:
    original = _original("resnet18")
    x = torch.randn(2, 3, 32, 32)
    us = slimmable.convert(create_original_model("torchvision/resnet18", num_classes=10, small_input=True),
                           width_range=(0.25, 1.0), example_input=x[:1]).eval()  # fmt: skip
    us.load_state_dict(original.state_dict())  # the original's keys: every statistics slot starts from them
    with torch.no_grad():
        torch.testing.assert_close(us(x), original(x), rtol=0, atol=0)
    torch.testing.assert_close(us.bn1.bn[0].running_var, original.bn1.running_var[:16])


def test_width_range_errors() -> None:
    model = _original("resnet18")
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="give widths .* or width_range .*, not both"):
        slimmable.convert(model, widths=(0.5, 1.0), width_range=(0.25, 1.0), example_input=x)
    with pytest.raises(ValueError, match=r"must be \(lo, 1.0\)"):
        slimmable.convert(model, width_range=(0.25, 0.75), example_input=x)
    with pytest.raises(ValueError, match="hold 1.0"):
        slimmable.convert(model, width_range=(0.25, 1.0), stat_widths=(0.25, 0.5), example_input=x)
    with pytest.raises(ValueError, match="give width_range too"):
        slimmable.convert(model, stat_widths=(0.5, 1.0), example_input=x)
    # a concatenation of two slimmed tensors: not a prefix at every width
    with pytest.raises(ValueError, match="bn takes channels that are not a prefix at every width.*widths=..."):
        slimmable.convert(Concat().eval(), width_range=(0.5, 1.0), example_input=torch.randn(1, 3, 4, 4))
