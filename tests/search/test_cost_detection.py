"""Profiling whole detectors: MACs per width and per part, checked against the classification backbone's MACs and
the FPN laterals' closed form; `slimmable profile` on a detector."""

from __future__ import annotations

import json

import pytest
import torch

import slimmable
from slimmable.cli.main import main
from slimmable.search import count_macs, count_macs_by_part, detector_image_size, detector_images, profile_widths

WIDTHS = (0.25, 0.5, 0.75, 1.0)
# every proposal is scored and kept: the heads' work does not depend on what the random weights detect
FIXED_HEADS = {"box_score_thresh": 0.0, "rpn_post_nms_top_n_test": 30, "box_detections_per_img": 8}


@pytest.fixture(scope="module")
def det():
    torch.manual_seed(0)
    return slimmable.create_model("slim_fasterrcnn_resnet18_fpn", **FIXED_HEADS).eval()


def test_detector_macs_fall_with_width_and_parts_add_up(det) -> None:
    profs = profile_widths(det, latency_runs=1)
    assert [p.width for p in profs] == list(WIDTHS) and slimmable.get_width(det) == 1.0
    assert all(p.input_size == 128 and p.latency_ms > 0 for p in profs)
    macs = [p.macs for p in profs]
    backbone = [p.parts["backbone.body"] for p in profs]
    fpn = [p.parts["backbone.fpn"] for p in profs]
    params = [p.params for p in profs]
    assert macs == sorted(set(macs)) and backbone == sorted(set(backbone)) and fpn == sorted(set(fpn))
    assert params == sorted(set(params))
    # the RPN and RoI heads are full width and shared: the same work at every width
    assert len({p.parts["rpn"] for p in profs}) == 1 and len({p.parts["roi_heads"] for p in profs}) == 1
    for p in profs:  # the four parts cover everything the detector computes (the transform has no MACs)
        assert sum(p.parts.values()) == p.macs
    # the backbone's MACs grow with the square of the width: 15x from 0.25 to 1.0 (the stem is full width)
    assert 12 * backbone[0] < backbone[-1] < 16 * backbone[0]
    assert profs[-1].to_dict()["parts"]["rpn"] == profs[-1].parts["rpn"]


def test_profile_runs_the_heads_at_capacity_whatever_the_threshold() -> None:
    """A detector that keeps nothing (score threshold 0.999, random weights) is profiled as if it kept every
    detection: its RoI-head MACs equal those of the same weights with threshold 0, and the threshold comes back."""
    kwargs = {k: v for k, v in FIXED_HEADS.items() if k != "box_score_thresh"}
    torch.manual_seed(0)
    strict = slimmable.create_model("slim_maskrcnn_resnet18_fpn", widths=(0.5, 1.0), box_score_thresh=0.999, **kwargs)
    torch.manual_seed(0)
    open_ = slimmable.create_model("slim_maskrcnn_resnet18_fpn", widths=(0.5, 1.0), box_score_thresh=0.0, **kwargs)
    x = detector_images(strict)
    with torch.no_grad():
        assert len(strict.eval()(x)[0]["boxes"]) == 0 and len(open_.eval()(x)[0]["boxes"]) == 8
    got, want = profile_widths(strict, latency_runs=0), profile_widths(open_, latency_runs=0)
    assert [p.parts for p in got] == [p.parts for p in want] and [p.macs for p in got] == [p.macs for p in want]
    assert strict.roi_heads.score_thresh == 0.999
    # what it avoids: counted as the model runs, the kept-nothing detector's heads skip the mask head entirely
    assert count_macs_by_part(strict, x)["roi_heads"] < got[-1].parts["roi_heads"]


@pytest.mark.parametrize("width", [0.25, 1.0])
def test_backbone_macs_equal_the_classification_network(det, width) -> None:
    # The detector's backbone at width w computes what slim_resnet18 (one grey channel) computes at width w on the
    # same 128 px image, without its classifier (pooling has no MACs; the classifier is a linear layer).
    cls = slimmable.create_model("slim_resnet18", num_classes=10, in_chans=1).eval()
    x = torch.rand(1, 1, 128, 128)
    with slimmable.use_width(cls, width), slimmable.use_width(det, width):
        classifier_macs = int(512 * width) * 10
        expected = count_macs(cls, x) - classifier_macs
        parts = count_macs_by_part(det, detector_images(det))
    assert parts["backbone.body"] == expected


def test_fpn_lateral_macs_follow_the_active_channels(det) -> None:
    # 1x1 laterals read the active channels: H*W*c_in(w)*64 per level (strides 4..32 of a 128 px image)
    images = detector_images(det)
    for w in WIDTHS:
        with slimmable.use_width(det, w):
            got = count_macs_by_part(det, images, ["backbone.fpn.inner_blocks", "backbone.fpn.layer_blocks"])
        expected = sum((128 // s) ** 2 * int(c * w) * 64 for s, c in ((4, 64), (8, 128), (16, 256), (32, 512)))
        assert got["backbone.fpn.inner_blocks"] == expected
        # the 3x3 output convolutions are full width: 64 -> 64 channels at every width
        assert got["backbone.fpn.layer_blocks"] == sum((128 // s) ** 2 * 64 * 64 * 9 for s in (4, 8, 16, 32))


def test_count_macs_by_part_errors(det) -> None:
    with pytest.raises(ValueError, match="'backbone.nope' is not a submodule"):
        count_macs_by_part(det, detector_images(det), ["backbone.nope"])
    with pytest.raises(ValueError, match="no default parts"):
        count_macs_by_part(slimmable.create_model("slim_mobilenet_v1", num_classes=10), torch.rand(1, 3, 32, 32))


def test_profile_cli_on_a_detector(capsys, tmp_path) -> None:
    out = tmp_path / "p.json"
    args = ["profile", "slim_maskrcnn_mobilenet_v2_fpn", "--runs", "0", "--min-size", "96", "--json", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "on one 96x96 image" in text and "RoI heads" in text
    data = json.loads(out.read_text())
    assert [p["width"] for p in data["profiles"]] == [0.35, 0.5, 0.75, 1.0]
    assert all(p["input_size"] == 96 and set(p["parts"]) >= {"backbone.body", "rpn"} for p in data["profiles"])
    assert main(["profile", "slim_fasterrcnn_resnet18_fpn", "--runs", "0", "--input-size", "64"]) == 2
    assert "use --min-size 64 instead" in capsys.readouterr().err


def test_detector_image_size_is_the_resize_side() -> None:
    assert detector_image_size(slimmable.create_model("slim_fasterrcnn_resnet50_fpn")) == 800
    assert detector_image_size(slimmable.create_model("slim_keypointrcnn_resnet18_fpn", min_size=96, max_size=96)) == 96
