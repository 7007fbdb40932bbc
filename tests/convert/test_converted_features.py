"""Feature stages of converted models: feature_info, forward_features, features-only backbones under a detector."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.feature_extraction import create_feature_extractor

import slimmable
from slimmable.checkpoint import build_model_from_checkpoint, model_checkpoint, save_checkpoint
from slimmable.convert.zoo import create_original_model
from slimmable.models.detection import SlimBackboneWithFPN

ZOO = "torchvision/resnet18"


def test_stages_are_the_original_stage_outputs_with_channels_per_width() -> None:
    torch.manual_seed(0)
    original = create_original_model(ZOO, num_classes=10).eval()
    slim = slimmable.convert(original, widths=(0.5, 1.0), example_input=torch.randn(1, 3, 64, 64)).eval()
    infos = slim.feature_info
    assert [f.stride for f in infos] == [2, 4, 8, 16, 32]
    assert [f.num_channels for f in infos] == [64, 64, 128, 256, 512]
    assert [f.channels(0.5) for f in infos] == [32, 32, 64, 128, 256]
    x = torch.randn(2, 3, 64, 64)
    ref = create_feature_extractor(original, {f"layer{i}": f"layer{i}" for i in range(1, 5)})
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(slim.forward_features(x), want["layer4"], rtol=0, atol=0)
        slim.set_width(0.5)
        assert slim.forward_features(x).shape == (2, 256, 2, 2)
    # MobileNet v2: block outputs (as torchvision's backbones take them), not the next block's expansion
    mnv2 = slimmable.create_model("torchvision/mobilenet_v2", widths=(0.5, 1.0))
    assert [(f.stride, f.num_channels) for f in mnv2.feature_info] == [(2, 16), (4, 24), (8, 32), (16, 96), (32, 1280)]


def test_features_only_backbone_equals_the_original_stages_and_rebuilds(tmp_path: Path) -> None:
    torch.manual_seed(0)
    original = create_original_model(ZOO, num_classes=10).eval()
    path = tmp_path / "w.pt"
    torch.save(original.state_dict(), path)
    body = slimmable.create_model(ZOO, num_classes=10, widths=(0.5, 1.0), weights=path, features_only=True,
                                  out_indices=(1, 2, 3, 4), out_names=("c2", "c3", "c4", "c5")).eval()  # fmt: skip
    assert body.out_names == ("c2", "c3", "c4", "c5") and not hasattr(body, "fc")  # the head is dropped
    x = torch.randn(2, 3, 64, 64)
    ref = create_feature_extractor(original, {f"layer{i}": f"c{i + 1}" for i in range(1, 5)})
    with torch.no_grad():
        got, want = body(x), ref(x)
        assert list(got) == ["c2", "c3", "c4", "c5"]
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
        with body.use_width(0.5):
            half = body(x)
        assert [t.shape[1] for t in half.values()] == [f.channels(0.5) for f in body.out_feature_info]
    saved = save_checkpoint(tmp_path / "body.pt", model_checkpoint(body))
    again = build_model_from_checkpoint(saved)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(again(x).values(), got.values()))
    with pytest.raises(ValueError, match="out_indices \\[7\\] must be distinct positions in the 5 stages"):
        slimmable.create_model(ZOO, widths=(0.5, 1.0), features_only=True, out_indices=(7,))


def test_a_converted_backbone_feeds_a_detector_at_two_widths() -> None:
    torch.manual_seed(0)
    body = slimmable.create_model(ZOO, widths=(0.5, 1.0), features_only=True, out_indices=(1, 2, 3, 4))
    backbone = SlimBackboneWithFPN(body, out_channels=64)
    detector = FasterRCNN(backbone, num_classes=3, min_size=64, max_size=64).eval()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 48)]
    for w in (0.5, 1.0):
        slimmable.set_width(detector, w)
        with torch.no_grad():
            pyramid = backbone(torch.rand(2, 3, 64, 64))
            out = detector(images)
        assert [tuple(t.shape) for t in pyramid.values()] == [(2, 64, 16, 16), (2, 64, 8, 8), (2, 64, 4, 4),
                                                              (2, 64, 2, 2), (2, 64, 1, 1)]  # fmt: skip
        assert len(out) == 2 and all(set(o) == {"boxes", "labels", "scores"} for o in out)
    # training mode: the detector's losses backpropagate into the converted backbone at the narrow width
    detector.train()
    slimmable.set_width(detector, 0.5)
    target = {"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([1])}
    losses = detector(images[:1], [target])
    sum(losses.values()).backward()
    assert body.get_submodule("conv1").weight.grad[:32].abs().sum() > 0
    assert body.get_submodule("conv1").weight.grad[32:].abs().sum() == 0  # channels the narrow width leaves out
