"""Slimmable detectors: torchvision's outputs at width 1.0 after load_torchvision_weights, the width API over the
whole detector, the FPN's laterals equal to zero-padding, frozen BN, slimmed heads, official backbone weights."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection import (
    FasterRCNN,
    fasterrcnn_resnet50_fpn,
    keypointrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn,
)
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d

import slimmable
from slimmable.checkpoint import CheckpointError
from slimmable.models.detection import load_official_backbone
from slimmable.nn import SlimConv2d, get_widths

# small images, few proposals: the R-50-FPN comparisons stay cheap on a CPU
TINY = {
    "min_size": 64,
    "max_size": 64,
    "box_score_thresh": 0.0,
    "box_detections_per_img": 12,
    "rpn_pre_nms_top_n_test": 200,
    "rpn_post_nms_top_n_test": 60,
}
SMALL_EVAL = {"box_score_thresh": 0.0, "rpn_post_nms_top_n_test": 30, "box_detections_per_img": 8}


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random BN statistics and affine (BatchNorm2d and FrozenBatchNorm2d)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                c = m.running_mean.shape[0]
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model.eval()


def _images(channels: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(channels, 64, 64, generator=g), torch.rand(channels, 48, 64, generator=g)]


def _max_diff(a: list[dict], b: list[dict]) -> float:
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        assert set(x) == set(y)
        for k in x:
            assert x[k].shape == y[k].shape, k
            worst = max(worst, (x[k].float() - y[k].float()).abs().max().item() if x[k].numel() else 0.0)
    return worst


@pytest.mark.parametrize(
    ("kind", "builder", "extra"),
    [
        ("fasterrcnn", fasterrcnn_resnet50_fpn, {}),
        ("maskrcnn", maskrcnn_resnet50_fpn, {}),
        ("keypointrcnn", keypointrcnn_resnet50_fpn, {"num_keypoints": 5}),
    ],
)
def test_r50_fpn_detectors_equal_torchvision_at_width_1(kind, builder, extra) -> None:
    ref = _randomize(builder(weights=None, weights_backbone=None, num_classes=4, **extra, **TINY), seed=3)
    model = slimmable.create_model(f"slim_{kind}_resnet50_fpn", num_classes=4, **extra, **TINY).eval()
    slimmable.load_torchvision_weights(model, ref)
    images = _images()
    with torch.no_grad():
        want, got = ref(images), model(images)
    assert all(len(d["boxes"]) > 0 for d in want)
    assert _max_diff(want, got) <= 1e-4
    # narrower widths run and give other detections from the same weights
    with torch.no_grad(), slimmable.use_width(model, 0.25):
        narrow = model(images)
    assert not torch.equal(narrow[0]["scores"], got[0]["scores"])


def test_frozen_batchnorm_detector_state_dict_equals_torchvision() -> None:
    # torchvision's detectors use FrozenBatchNorm2d when built for pretrained weights: no num_batches_tracked
    trunk = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d)
    ref = _randomize(FasterRCNN(trunk, num_classes=3, **TINY), seed=4)
    sd = ref.state_dict()
    assert not any(k.endswith("num_batches_tracked") for k in sd)
    model = slimmable.create_model("slim_fasterrcnn_resnet50_fpn", num_classes=3, frozen_bn=True, **TINY).eval()
    slimmable.load_torchvision_weights(model, sd)
    images = _images()
    with torch.no_grad():
        want, got = ref(images), model(images)
        x = torch.rand(1, 3, 64, 64)
        feats_ref, feats = ref.backbone(x), model.backbone(x)
    # FrozenBatchNorm2d computes x * scale + shift, BatchNorm2d (x - mean) / std * weight + bias: the FPN maps agree to
    # float rounding (1.5e-6 relative), which box decoding amplifies to a few 1e-3 px on a 64 px image
    for k in feats_ref:
        assert (feats[k] - feats_ref[k]).abs().max() <= 1e-5 * feats_ref[k].abs().max(), k
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(b["scores"], a["scores"], rtol=0, atol=1e-4)
        torch.testing.assert_close(b["boxes"], a["boxes"], rtol=0, atol=1e-4 * 64)
    # every width's BN switch was filled from the one BN: its leading channels
    bn_ref = ref.backbone.body.layer1[0].bn1
    switches = model.backbone.body.features[1].body[1].bn
    for sw in switches:
        c = sw.num_features
        torch.testing.assert_close(sw.running_var, bn_ref.running_var[:c], rtol=0, atol=0)
        torch.testing.assert_close(sw.weight, bn_ref.weight[:c], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("name", "builder"),
    [
        ("slim_resnet18", torchvision.models.resnet18),
        ("slim_resnet50", torchvision.models.resnet50),
        ("slim_mobilenet_v2", torchvision.models.mobilenet_v2),
    ],
)
def test_classification_equals_torchvision_at_width_1(name, builder) -> None:
    ref = _randomize(builder(num_classes=7), seed=5)
    model = slimmable.create_model(name, num_classes=7).eval()
    slimmable.load_torchvision_weights(model, ref)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-4 * max(1.0, want.abs().max().item()))
        for w in model.widths:  # every width runs on the loaded weights
            with model.use_width(w):
                assert torch.isfinite(model(x)).all()


def test_classification_weights_fill_a_small_detectors_backbone_only() -> None:
    ref = _randomize(torchvision.models.resnet18(), seed=6)
    det = slimmable.create_model("slim_fasterrcnn_resnet18_fpn", in_chans=3)
    fpn_before = det.backbone.fpn.inner_blocks[0][0].weight.clone()
    slimmable.load_torchvision_weights(det, ref)
    torch.testing.assert_close(det.backbone.body.features[0][0].weight, ref.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(det.backbone.fpn.inner_blocks[0][0].weight, fpn_before, rtol=0, atol=0)
    # MobileNet v2: the 1x1 conv head after the last stage used is dropped from the backbone, and from the load
    mnv2 = _randomize(torchvision.models.mobilenet_v2(), seed=6)
    det = slimmable.create_model("slim_fasterrcnn_mobilenet_v2_fpn", in_chans=3)
    slimmable.load_torchvision_weights(det, mnv2)
    torch.testing.assert_close(det.backbone.body.features[17].body[6].weight, mnv2.features[17].conv[2].weight)
    assert isinstance(det.backbone.body.features[18], nn.Identity)


def test_load_torchvision_weights_errors_name_the_problem() -> None:
    r18 = torchvision.models.resnet18(num_classes=7)
    model = slimmable.create_model("slim_resnet34", num_classes=7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"missing in the source: layer1\.2\.conv1\.weight"):
        slimmable.load_torchvision_weights(model, r18)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # all or nothing
    with pytest.raises(ValueError, match=r"fc\.weight \(7, 512\) does not fit classifier\.0\.weight \(10, 512\)"):
        slimmable.load_torchvision_weights(slimmable.create_model("slim_resnet18", num_classes=10), r18)
    with pytest.raises(ValueError, match="in_chans"):
        slimmable.load_torchvision_weights(slimmable.create_model("slim_resnet18", num_classes=7, in_chans=1), r18)
    det_sd = slimmable.create_model("slim_fasterrcnn_resnet18_fpn").state_dict()
    with pytest.raises(ValueError, match="source is a detector"):
        slimmable.load_torchvision_weights(model, {k: v for k, v in det_sd.items()})


# -- the width API, the FPN's laterals, BN options, slimmed heads, channels ------------------------------------------


@pytest.fixture(scope="module")
def small_det() -> nn.Module:
    torch.manual_seed(0)
    return _randomize(slimmable.create_model("slim_maskrcnn_resnet18_fpn", **SMALL_EVAL), seed=7)


def test_width_api_switches_the_whole_detector(small_det) -> None:
    assert get_widths(small_det).switches == small_det.widths == (0.25, 0.5, 0.75, 1.0)
    x = [torch.rand(1, 128, 128)]
    outs = {}
    for w in small_det.widths:
        with torch.no_grad(), slimmable.use_width(small_det, w):
            stages = small_det.backbone.body.forward_stages(x[0][None], small_det.backbone.out_indices)
            assert [t.shape[1] for t in stages.values()] == [int(c * w) for c in (64, 128, 256, 512)]
            outs[w] = small_det(x)[0]
    assert slimmable.get_width(small_det) == 1.0
    assert not torch.equal(outs[0.25]["scores"], outs[1.0]["scores"])
    with pytest.raises(ValueError, match=r"width 0\.3 .*widths are \(0\.25, 0\.5, 0\.75, 1\)"):
        slimmable.set_width(small_det, 0.3)


def test_fpn_laterals_equal_zero_padding_to_full_width(small_det) -> None:
    # the paper's official code zero-pads each stage output back to full width before a full-width FPN
    trunk = small_det.backbone
    dense_fpn = FeaturePyramidNetwork([64, 128, 256, 512], trunk.out_channels).eval()
    dense_fpn.load_state_dict(trunk.fpn.state_dict())
    x = torch.rand(2, 1, 96, 128)
    with torch.no_grad(), slimmable.use_width(small_det, 0.5):
        ours = trunk(x)
        stages = trunk.body.forward_stages(x, trunk.out_indices)
        padded = OrderedDict(
            (str(i), nn.functional.pad(t, (0, 0, 0, 0, 0, full - t.shape[1])))
            for i, (t, full) in enumerate(zip(stages.values(), (64, 128, 256, 512)))
        )
        want = dense_fpn(padded)
    assert list(ours) == ["0", "1", "2", "3", "pool"]
    for k in want:
        torch.testing.assert_close(ours[k], want[k], rtol=0, atol=1e-5)


def test_frozen_bn_keeps_statistics_and_affine_fixed_in_training() -> None:
    images = [torch.rand(1, 128, 128)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 70.0]]), "labels": torch.tensor([3])}]
    for frozen in (True, False):
        torch.manual_seed(0)
        model = slimmable.create_model("slim_fasterrcnn_resnet18_fpn", frozen_bn=frozen).train()
        bn = model.backbone.body.features[0][1].bn[0]
        assert bn.weight.requires_grad is not frozen
        assert bn.training is not frozen  # model.train() leaves frozen BN in eval mode
        before = bn.running_mean.clone()
        with slimmable.use_width(model, 0.25):
            sum(model(images, targets).values()).backward()
        assert torch.equal(bn.running_mean, before) is frozen
        assert (bn.weight.grad is None) is frozen


def test_slim_heads_slim_fpn_and_heads_and_keep_predictors_whole() -> None:
    torch.manual_seed(0)
    model = slimmable.create_model("slim_keypointrcnn_resnet18_fpn", slim_heads=True, **SMALL_EVAL).eval()
    rpn_conv = model.rpn.head.conv[0][0]
    assert isinstance(rpn_conv, SlimConv2d) and rpn_conv.out_rule is not None
    assert model.roi_heads.keypoint_head[-2].out_rule is None  # feeds the (dense) transposed-conv predictor
    x = [torch.rand(1, 128, 128)]
    for w in model.widths:
        with torch.no_grad(), slimmable.use_width(model, w):
            feats = model.backbone(x[0][None])
            assert all(t.shape[1] == int(64 * w) for t in feats.values())
            out = model(x)[0]
        assert out["keypoints"].shape[1:] == (5, 3)
    # the same names as the default detector: state dicts are interchangeable
    plain = slimmable.create_model("slim_keypointrcnn_resnet18_fpn")
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_image_channels() -> None:
    torch.manual_seed(0)
    rgb = slimmable.create_model("slim_fasterrcnn_mobilenet_v2_fpn", in_chans=3, **SMALL_EVAL).eval()
    with torch.no_grad():
        grey = rgb([torch.rand(1, 128, 128)])  # grey is broadcast over the three channels by the normalisation
    assert grey[0]["boxes"].shape[1] == 4
    mono = slimmable.create_model("slim_fasterrcnn_mobilenet_v2_fpn").eval()
    with pytest.raises(ValueError, match=r"takes 1-channel images but got 3 channels.*convert\('L'\)"):
        mono([torch.rand(3, 128, 128)])


def test_create_detector_errors() -> None:
    with pytest.raises(ValueError, match="num_keypoints=5 is only for keypointrcnn"):
        slimmable.create_model("slim_fasterrcnn_resnet18_fpn", num_keypoints=5)
    # options torchvision's **kwargs would swallow, and counts/thresholds out of range: refused, naming the option
    bad = {
        "bogus": (1, "model option 'bogus' is not an argument of torchvision's KeypointRCNN; known: bbox_reg_weights"),
        "num_keypoints": (-1, "model option num_keypoints must be an int >= 1, got -1"),
        "box_score_thresh": (1.5, r"model option box_score_thresh must be a number in \[0, 1\], got 1.5"),
        "rpn_post_nms_top_n_test": (0, "model option rpn_post_nms_top_n_test must be an int >= 1"),
        "min_size": ([128, 0], r"model option min_size must be an int >= 1 \(or a list of them\)"),
        "image_std": ([0.0], "model option image_std must be a list of finite numbers"),
    }
    for key, (value, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            slimmable.create_model("slim_keypointrcnn_resnet18_fpn", **{key: value})
    ok = {"num_keypoints": 3, "box_score_thresh": 0.0, "min_size": [96, 128], "max_size": 128, "size_divisible": 32}
    assert slimmable.create_model("slim_keypointrcnn_resnet18_fpn", **ok).roi_heads.score_thresh == 0.0
    assert slimmable.list_models("slim_*rcnn*", task="detection") == slimmable.list_models("slim_*rcnn*")
    assert "slim_maskrcnn_resnet50_fpn" not in slimmable.list_models(task="classification")


def test_official_s_resnet50_checkpoint_loads_as_the_backbone_at_every_width(official: Path) -> None:
    ref = json.loads((official / "s_resnet.keys.json").read_text())
    torch.manual_seed(0)
    src = _randomize(slimmable.create_model("slim_resnet50"), seed=8)
    ckpt = {"model": {f"module.{k}": v for k, v in src.state_dict().items()}}
    # the synthetic checkpoint has the official layout
    assert {k: list(v.shape) for k, v in ckpt["model"].items()} == ref["keys"]
    det = slimmable.create_model("slim_fasterrcnn_resnet50_fpn", frozen_bn=True, **TINY).eval()
    load_official_backbone(ckpt, det)
    body = det.backbone.body
    x = torch.rand(1, 3, 64, 64)
    for w in ref["widths"]:
        with torch.no_grad(), slimmable.use_width(det, w), slimmable.use_width(src, w):
            got = body.forward_stages(x)
            want = src.forward_stages(x)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="widths differ"):
        load_official_backbone(ckpt, slimmable.create_model("slim_fasterrcnn_resnet50_fpn", widths=(0.5, 1.0)))


@pytest.mark.parametrize("name", [n for n in slimmable.list_models(task="detection") if "resnet50" not in n])
def test_every_small_detector_runs_at_every_width(name) -> None:
    # the R-50-FPN detectors run at every width in the torchvision comparisons above
    torch.manual_seed(0)
    model = slimmable.create_model(name, **SMALL_EVAL).eval()
    x = [torch.rand(1, 128, 128)]
    scores = []
    for w in model.widths:
        with torch.no_grad(), slimmable.use_width(model, w):
            out = model(x)[0]
        assert out["boxes"].shape == (8, 4) and torch.isfinite(out["boxes"]).all()
        scores.append(out["scores"])
    assert not torch.equal(scores[0], scores[-1])
