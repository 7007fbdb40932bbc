"""ONNX export of one width of a slimmable detector, checked with onnxruntime (boxes, labels, scores, masks,
keypoints) against the dense PyTorch export; `slimmable export` on a detector. (export_width itself:
test_export_detection.py.)"""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import KeypointRCNN

import slimmable
from slimmable.cli.main import main
from slimmable.export import export_detector_onnx, export_onnx, export_width, is_dense
from slimmable.export.formats import ort_session

# every proposal scored, a fixed number of detections: outputs are non-empty with random weights
EVAL = {"box_score_thresh": 0.0, "rpn_post_nms_top_n_test": 30, "box_detections_per_img": 8}


def _image(seed: int, shape=(1, 128, 96)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def maskrcnn():
    torch.manual_seed(0)
    return slimmable.create_model("slim_maskrcnn_resnet18_fpn", **EVAL).eval()


def test_maskrcnn_onnx_equals_the_dense_export_in_onnxruntime(maskrcnn, tmp_path) -> None:
    res = export_onnx(maskrcnn, tmp_path / "m.onnx", width=0.5)  # dispatches to export_detector_onnx
    assert res.exporter == "torchscript" and res.opset == 17 and res.max_abs_diff < 1e-4 and res.width == 0.5
    dense = export_width(maskrcnn, 0.5)
    sess = ort_session(res.path, threads=1)
    assert [i.name for i in sess.get_inputs()] == ["image"]
    assert [o.name for o in sess.get_outputs()] == ["boxes", "labels", "scores", "masks"]
    for image in (_image(4), _image(5, (1, 80, 128))):  # height and width are dynamic
        boxes, labels, scores, masks = sess.run(None, {"image": image.numpy()})
        with torch.no_grad():
            (ref,) = dense([image])
        assert boxes.shape == (8, 4) and masks.shape == (8, 1, *image.shape[1:])
        torch.testing.assert_close(torch.from_numpy(boxes), ref["boxes"], atol=1e-3, rtol=0)  # pixels
        assert labels.tolist() == ref["labels"].tolist()
        torch.testing.assert_close(torch.from_numpy(scores), ref["scores"], atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.from_numpy(masks), ref["masks"], atol=1e-4, rtol=0)


def test_export_detector_errors(maskrcnn, tmp_path) -> None:
    with pytest.raises(ValueError, match="opset 10 is too old"):
        export_detector_onnx(maskrcnn, tmp_path / "a.onnx", opset=10)
    with pytest.raises(ValueError, match="TorchScript-based exporter only"):
        export_onnx(maskrcnn, tmp_path / "a.onnx", exporter="dynamo")
    with pytest.raises(TypeError, match="not a torchvision R-CNN detector"):
        export_detector_onnx(slimmable.create_model("slim_mobilenet_v1", num_classes=10), tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx").exists()


def test_export_cli_writes_a_keypoint_detector(capsys, tmp_path) -> None:
    args = ["export", "--model", "slim_keypointrcnn_mobilenet_v2_fpn", "--width", "0.35", "--out", str(tmp_path)]
    assert main(args) == 0
    path = tmp_path / "slim_keypointrcnn_mobilenet_v2_fpn_w0.35.onnx"
    assert path.is_file() and "max diff vs PyTorch" in capsys.readouterr().out
    sess = ort_session(path, threads=1)
    assert [o.name for o in sess.get_outputs()] == ["boxes", "labels", "scores", "keypoints", "keypoints_scores"]
    assert main([*args, "--format", "pt"]) == 0
    dense = torch.load(tmp_path / "slim_keypointrcnn_mobilenet_v2_fpn_w0.35.pt", weights_only=False)["model"]
    assert type(dense) is KeypointRCNN and is_dense(dense)
    assert main([*args, "--bundle"]) == 2
    assert "--bundle is not offered for detectors" in capsys.readouterr().err


def test_detections_are_matched_regardless_of_order() -> None:
    from slimmable.export.detection import _only_at_the_edge, match_detections

    ref = {
        "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0], [50.0, 5.0, 60.0, 30.0]]),
        "labels": torch.tensor([1, 2, 1]),
        "scores": torch.tensor([0.5001, 0.5, 0.2]),
        "masks": torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
    }
    order = torch.tensor([1, 0, 2])  # two near-tied detections swapped by NMS
    got = {k: v[order].clone() for k, v in ref.items()}
    got["boxes"][0, 0] += 0.01  # 0.01 px off
    m = match_detections(ref, got, side=100.0)
    assert sorted(m.pairs) == [(0, 1), (1, 0), (2, 2)] and not m.unmatched_ref and not m.unmatched_got
    assert m.worst["boxes"] == pytest.approx(1e-4, rel=1e-3) and m.worst["scores"] == 0 and m.worst["masks"] == 0

    # a label, a moved box (IoU < 0.9) or a score off by more than the tolerance do not match; named in one line
    for key, index, value in (("labels", 2, 3), ("boxes", 1, torch.tensor([0.0, 0.0, 10.0, 15.0])), ("scores", 2, 0.3)):
        other = {k: v.clone() for k, v in ref.items()}
        other[key][index] = value
        m = match_detections(ref, other, side=100.0)
        assert len(m.pairs) == 2 and len(m.unmatched_ref) == 1 and len(m.unmatched_got) == 1, key
        assert m.describe(3, 3).startswith("1 of 3 PyTorch detections and 1 of 3 onnxruntime detections unmatched")
    # an unmatched detection is tolerated only at the edge of what is kept (a near tie at the lowest score)
    assert not _only_at_the_edge(m, ref["scores"], other["scores"], 1e-3)  # the 0.2 vs 0.3 detection
    cut = {k: v[:2] for k, v in ref.items()}
    edge = {k: torch.cat([v[:1], v[2:]]) for k, v in ref.items()}
    edge["scores"] = torch.tensor([0.5001, 0.4995])
    edge["boxes"][1] = torch.tensor([70.0, 70.0, 80.0, 80.0])
    m = match_detections(cut, edge, side=100.0)
    assert len(m.pairs) == 1 and _only_at_the_edge(m, cut["scores"], edge["scores"], 1e-3)
