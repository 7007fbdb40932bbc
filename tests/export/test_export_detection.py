"""export_width turns a slimmable detector into a plain torchvision detector at a width, with equal outputs."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import KeypointRCNN, MaskRCNN

import slimmable
from slimmable.export import export_width, is_dense

EVAL = {"box_score_thresh": 0.0, "rpn_post_nms_top_n_test": 30, "box_detections_per_img": 8}


@pytest.mark.parametrize(
    ("name", "kwargs", "cls"),
    [
        ("slim_maskrcnn_resnet18_fpn", {}, MaskRCNN),
        ("slim_keypointrcnn_mobilenet_v2_fpn", {"slim_heads": True}, KeypointRCNN),
    ],
)
def test_export_width_gives_a_plain_detector_equal_to_the_slim_one(name, kwargs, cls) -> None:
    torch.manual_seed(0)
    model = slimmable.create_model(name, **kwargs, **EVAL).eval()
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(1, 128, 128, generator=g), torch.rand(1, 96, 128, generator=g)]
    for w in model.widths:
        dense = export_width(model, w)
        assert type(dense) is cls and is_dense(dense) and not dense.training
        with torch.no_grad(), slimmable.use_width(model, w):
            want = model(images)
        with torch.no_grad():
            got = dense(images)
        for a, b in zip(want, got, strict=True):
            assert set(a) == set(b) and len(a["boxes"]) > 0
            for k in a:
                torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4)
    assert slimmable.get_width(model) == 1.0  # the source is untouched
