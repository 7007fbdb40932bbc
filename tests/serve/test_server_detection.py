"""Serving a slimmable detector: the runner's dense copies equal the slimmable detector at each width, and the
HTTP API answers boxes, labels, scores, masks as COCO RLE and keypoints (loopback, a real HTTP client)."""

from __future__ import annotations

import http.client
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

import slimmable
from slimmable.runtime import SlimmableRunner
from slimmable.serve import PredictionServer

EVAL = {"box_score_thresh": 0.0, "rpn_post_nms_top_n_test": 30, "box_detections_per_img": 6}


def _post(server, body, headers, path="/predict"):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _image(seed=0, shape=(1, 96, 112)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def mask_model():
    torch.manual_seed(0)
    return slimmable.create_model("slim_maskrcnn_resnet18_fpn", widths=(0.5, 1.0), **EVAL).eval()


@pytest.fixture(scope="module")
def mask_server(mask_model):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    runner = SlimmableRunner(mask_model, calibration_s=0.2)
    srv = PredictionServer(runner, "127.0.0.1", 0, labels=[f"c{i}" for i in range(11)])
    srv.start()
    yield srv
    srv.stop()
    torch.set_num_threads(n)


def test_runner_serves_each_width_equal_to_the_slimmable_detector(mask_server, mask_model) -> None:
    runner = mask_server.runner
    assert runner.task.name == "detection" and runner.input_shape == (1, 128, 128) and runner.widths == (0.5, 1.0)
    assert runner.info()["task"] == "detection" and runner.base_latency(0.5, 1) > 0
    images = [_image(1), _image(2, (1, 128, 80))]
    for w in runner.widths:
        with torch.no_grad(), slimmable.use_width(mask_model, w):
            ref = mask_model(images)
        res = runner.run(images, width=w)
        assert res.width == w and len(res.output) == 2
        for got, exp in zip(res.output, ref):  # BN folded into the convolutions: float rounding only
            assert got["labels"].tolist() == exp["labels"].tolist()
            torch.testing.assert_close(got["boxes"], exp["boxes"], atol=1e-3, rtol=0)
            torch.testing.assert_close(got["masks"], exp["masks"], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"takes \(1, H, W\) images"):
        runner.run([torch.rand(3, 64, 64)])


def test_json_tensor_answers_boxes_labels_scores_and_rle_masks(mask_server) -> None:
    x = _image(3)
    status, body = _post(
        mask_server, json.dumps({"tensor": x.tolist(), "width": 0.5}), {"Content-Type": "application/json"}
    )
    assert status == 200, body
    assert "predictions" not in body and body["width"] == 0.5 and body["batch_size"] == 1
    (dets,) = body["detections"]
    (ref,) = mask_server.runner(x, width=0.5)
    assert len(dets) == len(ref["boxes"]) == 6
    assert [d["label"] for d in dets] == ref["labels"].tolist()
    assert all(d["label_name"] == f"c{d['label']}" for d in dets)
    np.testing.assert_allclose([d["box"] for d in dets], ref["boxes"].numpy(), atol=1e-2)
    np.testing.assert_allclose([d["score"] for d in dets], ref["scores"].numpy(), atol=1e-5)
    for d, m in zip(dets, ref["masks"]):
        rle = d["mask"]
        assert rle["size"] == [96, 112] and isinstance(rle["counts"], str)
        decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert np.array_equal(decoded, (m[0] > 0.5).numpy().astype(np.uint8))


def test_png_with_a_budget_and_min_score(mask_server) -> None:
    img = Image.fromarray((np.random.default_rng(0).random((70, 90)) * 255).astype(np.uint8), "L")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    status, body = _post(mask_server, buf.getvalue(), {"Content-Type": "image/png"}, "/predict?budget_ms=100000")
    assert status == 200, body
    assert body["width"] == 1.0 and body["budget_met"] in (True, False)
    (dets,) = body["detections"]
    assert all(d["mask"]["size"] == [70, 90] for d in dets)
    scores = sorted(d["score"] for d in dets)
    cut = scores[len(scores) // 2]
    status, body = _post(mask_server, buf.getvalue(), {"Content-Type": "image/png"}, f"/predict?min_score={cut}")
    assert status == 200 and all(d["score"] >= cut for d in body["detections"][0])
    assert len(body["detections"][0]) == sum(s >= cut for s in scores)
    status, body = _post(mask_server, buf.getvalue(), {"Content-Type": "image/png"}, "/predict?min_score=0")
    assert status == 200 and len(body["detections"][0]) == len(scores)  # 0 keeps every detection
    status, body = _post(mask_server, buf.getvalue(), {"Content-Type": "image/png"}, "/predict?min_score=-1")
    assert status == 400 and "min_score must be a finite number >= 0" in body["error"]


def _png(width: int, height: int) -> bytes:
    """A 1x1 grey PNG whose header claims ``width`` x ``height`` (no memory for the pixels)."""
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


def test_oversized_and_elongated_images_are_4xx_not_500(mask_server) -> None:
    # a header claiming more pixels than Pillow's own bomb limit: the documented 413, not 400
    status, body = _post(mask_server, _png(30000, 20000), {"Content-Type": "image/png"})
    assert status == 413 and "too large" in body["error"], body
    # a 1x4000 image resizes to a side of 0 in the detector: 400 naming the shape, not a 500
    buf = io.BytesIO()
    Image.new("L", (4000, 1)).save(buf, "PNG")
    status, body = _post(mask_server, buf.getvalue(), {"Content-Type": "image/png"})
    assert status == 400 and "4000x1 pixels, more elongated than 20:1" in body["error"], body
    status, body = _post(mask_server, json.dumps({"tensor": torch.zeros(1, 1, 4000).tolist()}),
                         {"Content-Type": "application/json"})  # fmt: skip
    assert status == 400 and "more elongated than 20:1" in body["error"], body


def test_keypoint_detector_answers_keypoints() -> None:
    torch.manual_seed(0)
    model = slimmable.create_model("slim_keypointrcnn_mobilenet_v2_fpn", **EVAL).eval()
    runner = SlimmableRunner(model, widths=[0.5], calibrate=False)
    with PredictionServer(runner, "127.0.0.1", 0) as srv:
        payload = {"tensor": [_image(4).tolist(), _image(5).tolist()]}
        status, body = _post(srv, json.dumps(payload), {"Content-Type": "application/json"})
    assert status == 200, body
    assert body["batch_size"] == 2 and body["predicted_ms"] is None
    for dets in body["detections"]:
        assert len(dets) == 6 and "mask" not in dets[0]
        for d in dets:
            assert len(d["keypoints"]) == 5 and len(d["keypoint_scores"]) == 5
            assert all(len(k) == 3 and k[2] in (0, 1) for k in d["keypoints"])
