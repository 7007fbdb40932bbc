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
