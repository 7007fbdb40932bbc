"""COCO-format data: targets as torchvision detectors want them, validation naming file and annotation, COCOeval AP
on results with known answers."""

from __future__ import annotations

import copy
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slimmable._utils import short_repr
from slimmable.data.coco import CocoDetectionDataset, coco_evaluate, collate_detection, detections_to_coco
from slimmable.data.detection import create_detection_datasets

H, W = 40, 48


def _coco(tmp: Path, mode: str = "L") -> dict:
    """Three images; two objects each, a rectangle mask and keypoints at its corners' centre points."""
    (tmp / "img").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    rng = np.random.default_rng(0)
    aid = 1
    for i in range(1, 4):
        name = f"img/{i}.png"
        arr = rng.integers(0, 255, (H, W, 3) if mode == "RGB" else (H, W), dtype=np.uint8)
        Image.fromarray(arr, mode).save(tmp / name)
        images.append({"id": i, "file_name": name, "width": W, "height": H})
        for j, (x, y, w, h) in enumerate([(2 + i, 3, 10, 12), (20, 10 + i, 16, 20)]):
            poly = [x, y, x + w, y, x + w, y + h, x, y + h]
            kps = [x + 1.5, y + 1.5, 2, x + w - 1.5, y + 1.5, 2, x + w / 2, y + h / 2, 2]
            anns.append({
                "id": aid, "image_id": i, "category_id": 1 + j, "bbox": [x, y, w, h], "area": w * h,
                "segmentation": [poly], "iscrowd": 0, "keypoints": kps, "num_keypoints": 3,
            })  # fmt: skip
            aid += 1
    cats = [{"id": c, "name": f"c{c}", "keypoints": ["a", "b", "c"], "keypoint_flip_map": [[0, 1]]} for c in (1, 2)]
    return {"images": images, "annotations": anns, "categories": cats}


def _write(tmp: Path, data: dict) -> Path:
    path = tmp / "ann.json"
    path.write_text(json.dumps(data))
    return path


def test_targets_as_torchvision_detectors_take_them(tmp_path: Path) -> None:
    data = _coco(tmp_path)
    ds = CocoDetectionDataset(tmp_path, _write(tmp_path, data))
    image, target = ds[0]
    assert image.shape == (1, H, W) and image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1
    torch.testing.assert_close(target["boxes"], torch.tensor([[3.0, 3, 13, 15], [20, 11, 36, 31]]))
    assert target["labels"].tolist() == [1, 2] and int(target["image_id"]) == 1
    assert target["masks"].shape == (2, H, W) and target["masks"].dtype == torch.uint8
    assert target["masks"][0, 5:14, 4:12].all() and target["masks"][0].sum() <= 10 * 12 + 2 * (10 + 12) + 1
    assert target["keypoints"].shape == (2, 3, 3)
    torch.testing.assert_close(target["keypoints"][0, 0], torch.tensor([4.5, 4.5, 2.0]))
    images, targets = collate_detection([ds[0], ds[1]])
    assert len(images) == len(targets) == 2
    assert CocoDetectionDataset(tmp_path, tmp_path / "ann.json", channels=3)[0][0].shape == (3, H, W)


def test_hflip_moves_boxes_masks_keypoints_and_swaps_left_right(tmp_path: Path) -> None:
    ann = _write(tmp_path, _coco(tmp_path))
    plain = CocoDetectionDataset(tmp_path, ann)
    flipped = CocoDetectionDataset(tmp_path, ann, hflip=1.0)
    (im0, t0), (im1, t1) = plain[0], flipped[0]
    assert torch.equal(im1, im0.flip(-1)) and torch.equal(t1["masks"], t0["masks"].flip(-1))
    torch.testing.assert_close(t1["boxes"][0], torch.tensor([W - 13.0, 3, W - 3, 15]))
    # keypoint "a" (left corner) becomes "b" of the flipped object: swapped, and mirrored
    torch.testing.assert_close(t1["keypoints"][0, 1], torch.tensor([W - 4.5, 4.5, 2.0]))
    torch.testing.assert_close(t1["keypoints"][0, 0], torch.tensor([W - t0["keypoints"][0, 1, 0], 4.5, 2.0]))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["images"][1].update(file_name="img/missing.png"), r"image id 2 file .*missing\.png does not"),
        (lambda d: d["annotations"][3].update(bbox=[40, 10, 16, 20]), r"annotation id 4 \(image img/2\.png\).*outside"),
        (lambda d: d["annotations"][2]["keypoints"].pop(), r"annotation id 3 .*8 keypoint values.*declares 3"),
        (lambda d: d["annotations"][0].update(category_id=7), r"annotation id 1 .*category_id 7 is not in"),
        (lambda d: d["annotations"][5].update(bbox=[1, 1, 0, 4]), r"annotation id 6 .*no area"),
    ],
)
def test_bad_annotations_name_the_file_and_the_entry(tmp_path: Path, edit, message) -> None:
    data = _coco(tmp_path)
    edit(data)
    ann = _write(tmp_path, data)
    with pytest.raises(ValueError, match=message) as info:
        CocoDetectionDataset(tmp_path, ann)
    assert str(ann) in str(info.value)


def _gt_results(data: dict, shift: float = 0.0) -> list[dict]:
    out = []
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        kp = list(a["keypoints"])
        out.append({
            "image_id": a["image_id"], "category_id": a["category_id"], "bbox": [x + shift, y, w, h],
            "score": 0.9, "segmentation": a["segmentation"], "keypoints": kp,
        })  # fmt: skip
    return out


def test_coco_evaluate_known_answers(tmp_path: Path) -> None:
    data = _coco(tmp_path)
    perfect = coco_evaluate(data, _gt_results(data), ("bbox", "segm", "keypoints"))
    for iou_type in ("bbox", "segm", "keypoints"):
        assert perfect[iou_type] == {"AP": 1.0, "AP50": 1.0, "AP75": 1.0}, iou_type
    # boxes shifted by 30% of the small boxes' width: IoU 0.54 (small) and 0.68 (large): AP50 1, AP75 0
    shifted = coco_evaluate(data, [dict(r, bbox=[r["bbox"][0] + 0.3 * r["bbox"][2], *r["bbox"][1:]])
                                   for r in _gt_results(data)])  # fmt: skip
    assert shifted["bbox"]["AP50"] == 1.0 and shifted["bbox"]["AP75"] == 0.0 and 0 < shifted["bbox"]["AP"] < 0.5
    # a wrong class everywhere: nothing matches
    wrong = [dict(r, category_id=3 - r["category_id"]) for r in _gt_results(data)]
    assert coco_evaluate(data, wrong)["bbox"]["AP"] == 0.0
    assert coco_evaluate(data, [])["bbox"] == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with pytest.raises(ValueError, match="3 keypoints"):
        coco_evaluate(data, _gt_results(data), ("keypoints",), kpt_oks_sigmas=[0.05] * 17)
    with pytest.raises(ValueError, match="iou_types"):
        coco_evaluate(data, _gt_results(data), ("boxes",))


def test_detector_outputs_convert_to_results_with_perfect_ap(tmp_path: Path) -> None:
    data = _coco(tmp_path)
    ds = CocoDetectionDataset(tmp_path, _write(tmp_path, copy.deepcopy(data)))
    results = []
    for i in range(len(ds)):
        _, t = ds[i]
        det = {
            "boxes": t["boxes"],
            "scores": torch.full((len(t["boxes"]),), 0.8),
            "labels": t["labels"],
            "masks": t["masks"][:, None].float() * 0.9,  # probabilities (N, 1, H, W)
            "keypoints": t["keypoints"],
        }
        results += detections_to_coco(int(t["image_id"]), det)
    ap = coco_evaluate(ds.coco, results, ("bbox", "segm", "keypoints"))
    assert all(v["AP"] == 1.0 for v in ap.values()), ap


# ---------------------------------------------------------------------------------------- hostile COCO-format data


def _png_header(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb's header; no pixels follow)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def _dangling_link(tmp: Path, data: dict) -> None:
    (tmp / "img" / "2.png").unlink()
    (tmp / "img" / "2.png").symlink_to(tmp / "gone.png")


def _truncated(tmp: Path, data: dict) -> None:
    (tmp / "img" / "2.png").write_bytes((tmp / "img" / "2.png").read_bytes()[:10])


def _rle(counts: list[int] | str) -> dict:
    return {"size": [H, W], "counts": counts}


def _set(key: str, index: int, field: str, value: object, at: int | None = None):
    """An edit of the JSON: ``data[key][index][field] = value`` (or its item ``at``)."""

    def edit(tmp: Path, data: dict) -> None:
        if at is None:
            data[key][index][field] = value
        else:
            data[key][index][field][at] = value

    return edit


NAN, INF = float("nan"), float("inf")
_BOMB = r"image id 3 file .*3\.png is (50000x50000 = )?2500000000 pixels, above the limit .*raise PIL\.Image\.MAX_IMAGE"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # issue item 2: data that trained silently wrong
        (_set("images", 2, "id", 2), r"image id 2 appears twice \(images\[1\] and images\[2\]\)"),
        (_set("annotations", 4, "id", 2), r"annotation id 2 appears twice"),
        (_set("categories", 0, "id", 0), r"category id 0: category ids run from 1"),
        (_set("categories", 1, "id", -3), r"category id -3: category ids run from 1"),
        (_set("images", 1, "width", W + 8), rf"image id 2 file .*2\.png is {W}x{H} pixels but the JSON says width 56"),
        (_set("annotations", 1, "bbox", NAN, at=0), r"annotation id 2 .*bbox \[nan, .*finite"),
        (_set("annotations", 1, "bbox", INF, at=2), r"annotation id 2 .*bbox .*inf.*finite"),
        (_set("annotations", 1, "bbox", [W, 3, 0.5, 4]), r"annotation id 2 .*no area inside the 48x40 image"),
        (_set("annotations", 1, "bbox", [3, 3, 1e-30, 4]), r"annotation id 2 .*no area inside"),
        (_set("annotations", 2, "keypoints", NAN, at=4), r"annotation id 3 .*keypoints .*nan"),
        (_set("annotations", 3, "segmentation", [[1, -INF, 3, 4, 5, 6]]), r"annotation id 4 .*polygon 0 .*-inf"),
        # issue item 3: data that gave a traceback, mostly mid-epoch
        (_set("annotations", 0, "segmentation", [[1, 2, 3, 4]]), r"annotation id 1 .*polygon 0 .*6 numbers"),
        (_set("annotations", 0, "segmentation", [[1, 2, 3, 4, 5, 6, 7]]), r"annotation id 1 .*polygon 0 .*x, y pairs"),
        (_set("annotations", 0, "segmentation", _rle([5, -3, H * W - 2])), r"annotation id 1 .*negative run length"),
        (_set("annotations", 0, "segmentation", _rle([5, 3, 7])), rf"annotation id 1 .*sum to 15, not .* {H}x{W}"),
        (_set("annotations", 0, "segmentation", _rle("o" * 10**6)), r"annotation id 1 .*not a compressed COCO RLE"),
        (_set("annotations", 0, "segmentation", [[1, 2, 3e12, 4, 5, 6]]), r"polygon 0 .*lies outside the 48x40"),
        (_set("categories", 1, "keypoint_flip_map", [[0, 3]]), r"category id 2: keypoint_flip_map entry \[0, 3\]"),
        (_set("categories", 1, "keypoint_flip_map", [[0, 2]]), r"pairs keypoint 0 with both 1 and 2"),
        (lambda tmp, d: _png_header(tmp / "img" / "3.png", 50000, 50000), _BOMB),
        (_dangling_link, r"image id 2 file .*2\.png is a link to a missing file"),
        (_truncated, r"image id 2 file .*2\.png cannot be read as an image"),
        (lambda tmp, d: (tmp / "img" / "1.png").unlink() or (tmp / "img" / "1.png").mkdir(), r"1\.png is not a file"),
    ],
)
def test_hostile_data_is_refused_when_built_in_one_line(tmp_path: Path, edit, message) -> None:
    data = _coco(tmp_path)
    edit(tmp_path, data)
    ann = _write(tmp_path, data)
    with pytest.raises(ValueError, match=message) as info:
        CocoDetectionDataset(tmp_path, ann)
    text = str(info.value)
    assert text.startswith(str(ann)) and "\n" not in text and len(text) < 500, text


def test_json_nested_too_deep_is_not_a_coco_file(tmp_path: Path) -> None:
    ann = tmp_path / "ann.json"
    ann.write_text("[" * 200_000 + "]" * 200_000)
    (tmp_path / "img").mkdir()
    with pytest.raises(ValueError, match=r"ann\.json is not a COCO annotation file \(its JSON is nested too deep"):
        CocoDetectionDataset(tmp_path / "img", ann)


def test_messages_quote_at_most_200_characters_of_a_value(tmp_path: Path) -> None:
    data = _coco(tmp_path)
    data["annotations"][0]["bbox"][0] = "1" * 3_000_000  # a number as a huge string
    data["images"][0]["file_name"] = "x" * 5000 + ".png"
    for part in ("annotations", "images"):
        ann = _write(tmp_path, {**_coco(tmp_path), part: data[part]})
        with pytest.raises(ValueError) as info:
            CocoDetectionDataset(tmp_path, ann)
        assert "'1111" in str(info.value) or "'xxxx" in str(info.value)
        assert len(str(info.value)) < 500, len(str(info.value))
    assert len(short_repr("y" * 10**7)) == 200 and len(short_repr(list(range(10**6)))) < 200


def test_an_image_unreadable_mid_run_is_one_line_from_a_worker(tmp_path: Path) -> None:
    ds = CocoDetectionDataset(tmp_path, _write(tmp_path, _coco(tmp_path)))
    (tmp_path / "img" / "2.png").write_bytes(b"\x89PNG not any more")
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1, collate_fn=collate_detection)
    with pytest.raises(ValueError, match=r"image id 2 file .*2\.png cannot be read") as info:
        for _ in loader:
            pass
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)


def _coco_folder(tmp: Path, edit_train=None, edit_test=None) -> Path:
    for split, edit in (("train", edit_train), ("test", edit_test)):
        data = _coco(tmp / split)
        if edit is not None:
            edit(data)
        (tmp / split / "annotations.json").write_text(json.dumps(data))
    return tmp


def _extra_category(data: dict) -> None:
    data["categories"].append({**data["categories"][1], "id": 9, "name": "c9"})
    data["annotations"][1]["category_id"] = 9


def test_a_category_only_in_train_is_a_class_of_the_model(tmp_path: Path) -> None:
    splits = create_detection_datasets("coco", _coco_folder(tmp_path, edit_train=_extra_category), val_size=1)
    assert splits.num_classes == 10 and [c["id"] for c in splits.categories] == [1, 2, 9]
    labels = torch.cat([t["labels"] for _, t in (splits.train[i] for i in range(len(splits.train)))])
    assert int(labels.max()) == 9 < splits.num_classes


@pytest.mark.parametrize(
    ("edit_train", "edit_test", "message"),
    [
        (None, lambda d: d.update(images=[], annotations=[]), r"test split .*test/annotations\.json has no images"),
        (
            lambda d: d.update(images=[], annotations=[]),
            None,
            r"training split .*train/annotations\.json has no images",
        ),
        (lambda d: d["categories"][0].update(name="dog"), None, r"category id 1 is 'dog' in .*train.* but 'c1' in"),
    ],
)
def test_splits_that_cannot_train_together_are_refused(tmp_path: Path, edit_train, edit_test, message) -> None:
    with pytest.raises(ValueError, match=message):
        create_detection_datasets("coco", _coco_folder(tmp_path, edit_train, edit_test))
