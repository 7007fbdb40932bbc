"""timm's CNN families converted: equal to the original at width 1.0, ``export_width`` equal at 0.5, MACs at 0.5 at
most 0.6x those at 1.0; the families that still freeze say where and why; ``create_model("timm/<arch>")`` and
``slimmable convert timm/<arch>``. Random weights only (``pretrained=False``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimmable
from slimmable.export import export_width, is_dense
from slimmable.nn.converted import ConvertedBatchNormAct2d
from slimmable.search.cost import count_macs

timm = pytest.importorskip("timm", reason="timm is not installed: pip install 'slimmable[timm]'")

WIDTHS = (0.25, 0.5, 0.75, 1.0)
# family (timm.models module) -> (architecture, input side); the smallest of each family, as in
# benchmarks/convert_zoo.py --timm, except where a smaller sibling keeps the test fast
FAST = {
    "mobilenetv3": ("mobilenetv3_small_050", 32),
    "efficientnet": ("mobilenetv2_035", 32),
    "regnet": ("regnety_002", 32),
    "cspnet": ("cs3darknet_focus_s", 64),
    "byobnet": ("gernet_s", 32),
    "rexnet": ("rexnet_100", 32),
}
SLOW = {
    "byobnet_mobileone": ("mobileone_s1", 64), "convmixer": ("convmixer_768_32", 64),
    "convnext": ("convnext_zepto_rms", 64), "cspnext": ("cspnext_tiny", 64), "densenet": ("densenet121", 64),
    "dla": ("dla46x_c", 64), "dpn": ("dpn48b", 64), "fasternet": ("fasternet_t0", 64),
    "hardcorenas": ("hardcorenas_b", 64), "hgnet": ("hgnetv2_b0", 64), "hrnet": ("hrnet_w18_small", 64),
    "inception_next": ("inception_next_atto", 64), "inception_resnet_v2": ("inception_resnet_v2", 96),
    "inception_v3": ("inception_v3", 96), "inception_v4": ("inception_v4", 96), "lcnetv2": ("lcnetv2_small", 64),
    "nasnet": ("nasnetalarge", 96), "pnasnet": ("pnasnet5large", 96), "rdnet": ("rdnet_tiny", 64),
    "regnetx": ("regnetx_002", 64), "repghost": ("repghostnet_050", 64), "repvit": ("repvit_m1", 64),
    "res2net": ("res2next50", 64), "resnest": ("resnest14d", 64), "resnet": ("resnet10t", 64),
    "resnetv2": ("resnetv2_18", 64), "selecsls": ("selecsls42", 64), "senet": ("legacy_seresnet18", 64),
    "sknet": ("skresnet18", 64), "starnet": ("starnet_s050", 64), "tresnet": ("tresnet_m", 64),
    "vgg": ("vgg11", 64), "vovnet": ("ese_vovnet19b_slim_dw", 64), "xception": ("legacy_xception", 96),
    "xception_aligned": ("xception41p", 64),
}  # fmt: skip


def _original(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False).eval()
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():  # statistics and affine away from their defaults, so that they matter
        if isinstance(m, nn.BatchNorm2d) and m.affine and m.track_running_stats:
            m.running_mean.normal_(0, 0.2, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.normal_(0, 0.2, generator=gen)
    return model


def _check(arch: str, size: int) -> None:
    original = _original(arch)
    x = torch.randn(2, 3, size, size)
    model = slimmable.convert(original, widths=WIDTHS, example_input=x[:1]).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), atol=1e-5, rtol=1e-5)
        model.load_state_dict(original.state_dict(), strict=True)
        with model.use_width(0.5):
            y = model(x)
            dense = export_width(model, 0.5, example=x)
            assert is_dense(dense)
            torch.testing.assert_close(dense(x), y, atol=1e-5, rtol=1e-4)
    macs = {}
    for w in (0.5, 1.0):
        with model.use_width(w):
            macs[w] = count_macs(model, x[:1])
    assert macs[0.5] <= 0.6 * macs[1.0], (macs, model.conversion_report.format())


@pytest.mark.parametrize("family", list(FAST))
def test_timm_family_converts(family: str) -> None:
    _check(*FAST[family])


@pytest.mark.slow
@pytest.mark.parametrize("family", list(SLOW))
def test_timm_family_converts_large(family: str) -> None:
    _check(*SLOW[family])


def test_batchnorm_act_becomes_switchable_and_keeps_its_activation() -> None:
    original = _original("mobilenetv3_small_050")
    model = slimmable.convert(original, widths=(0.5, 1.0), example_input=torch.randn(1, 3, 32, 32)).eval()
    bn = model.get_submodule("bn1")
    assert isinstance(bn, ConvertedBatchNormAct2d) and type(bn.act) is type(original.bn1.act)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad(), model.use_width(0.5):
        c = bn.switches[0].num_features
        ref = original.bn1.act(nn.functional.batch_norm(
            x[:, :c], original.bn1.running_mean[:c], original.bn1.running_var[:c], original.bn1.weight[:c],
            original.bn1.bias[:c], eps=original.bn1.eps,
        ))  # fmt: skip
        torch.testing.assert_close(bn(x[:, :c]), ref)


@pytest.mark.parametrize(
    ("arch", "where", "why"),
    [
        ("ghostnet_050", "blocks.0.0", "add of tensors whose channels do not match"),
        ("nf_regnet_b0", "stem.conv", "ScaledStdConv2d"),
        # MixedConv2d's kernel groups concatenated, gated by one SE convolution: positions differ below 1.0
        ("mixnet_s", "blocks.2.0.se", "mul of tensors whose channels do not match"),
    ],
)
def test_families_that_miss_freeze_with_a_report_and_stay_equal(arch: str, where: str, why: str) -> None:
    original = _original(arch)
    x = torch.randn(1, 3, 64, 64)
    model = slimmable.convert(original, widths=WIDTHS, example_input=x).eval()
    ops = model.conversion_report.frozen_ops
    assert any(w == where and why in r for w, r in ops), ops
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), atol=1e-5, rtol=1e-5)
        with model.use_width(0.25):
            assert model(x).shape == (1, 1000)


def test_create_model_timm_and_cli(tmp_path, capsys) -> None:
    from slimmable.checkpoint import build_model_from_checkpoint
    from slimmable.cli.main import main

    model = slimmable.create_model("timm/mobilenetv3_small_050", widths=(0.5, 1.0), num_classes=7, in_chans=1)
    assert model.model_name == "timm/mobilenetv3_small_050" and model.widths == (0.5, 1.0)
    with torch.no_grad(), model.eval().use_width(0.5):
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    with pytest.raises(ValueError, match="timm/mobilenetv3_small_050"):
        slimmable.create_model("timm/mobilenetv3_smal_050")
    out = tmp_path / "m.pt"
    argv = ["convert", "timm/regnetx_002", "--widths", "0.5,1.0", "--num-classes", "5", "--input-size", "32"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "RegNet" in printed and "MACs at 32x32" in printed
    rebuilt = build_model_from_checkpoint(out)
    assert rebuilt.model_name == "timm/regnetx_002"
    with torch.no_grad():
        assert rebuilt(torch.randn(1, 3, 32, 32)).shape == (1, 5)


class RangesAndSpatialSplits(nn.Module):
    """A concatenation sliced back at its boundary (DPN's ``x[:, :c]``), an equal channel split given by size
    (CSPNet's ``split(c // 2)``), and a split along a spatial dimension as long as the channels (H == C)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 16, 1)
        self.c = nn.Conv2d(8, 8, 1)
        self.d = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x), self.b(x)], 1)
        p, q = y[:, :8], y[:, 8:]
        q1, q2 = q.split(8, dim=1)
        top, bottom = self.c(p).split(4, dim=2)  # H == C == 8: the spatial dimension, not the channels
        return (torch.cat([top, bottom], 2) + self.d(q1 * q2)).mean((2, 3))


def test_channel_ranges_follow_the_width_and_spatial_splits_are_not_channels() -> None:
    model = RangesAndSpatialSplits().eval()
    x = torch.randn(2, 3, 8, 8)
    slim = slimmable.convert(model, widths=(0.5, 1.0), example_input=x).eval()
    assert not slim.conversion_report.frozen_ops, slim.conversion_report.format()
    with torch.no_grad():
        torch.testing.assert_close(slim(x), model(x))
        slim.set_width(0.5)
        # the narrower network: a keeps 4 of 8, b 8 of 16 (two halves of 4); c and d feed the output (all 8 kept)
        a, b = model.a(x)[:, :4], model.b(x)[:, :8]
        b1, b2 = b[:, :4], b[:, 4:]
        c = nn.functional.conv2d(a, model.c.weight[:, :4], model.c.bias)
        d = nn.functional.conv2d(b1 * b2, model.d.weight[:, :4], model.d.bias)
        ref = (c + d).mean((2, 3))
        torch.testing.assert_close(slim(x), ref)
        torch.testing.assert_close(export_width(slim, 0.5, example=x)(x), ref)
