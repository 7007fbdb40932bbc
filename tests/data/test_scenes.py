"""Fashion-MNIST scenes: deterministic, honest about being synthetic, annotations derived from the pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from slimmable.data import FASHION_MNIST_SYSTEM_DIR
from slimmable.data.scenes import FASHION_MNIST_CLASSES, INK_THRESHOLD, KEYPOINT_NAMES, make_scenes

pytestmark = pytest.mark.skipif(
    not Path(FASHION_MNIST_SYSTEM_DIR).is_dir(), reason=f"Fashion-MNIST not installed at {FASHION_MNIST_SYSTEM_DIR}"
)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return make_scenes(tmp_path_factory.mktemp("scenes") / "a", "train", 24, seed=3)


def test_same_arguments_same_files_and_splits_differ(scenes: Path, tmp_path: Path) -> None:
    again = make_scenes(tmp_path / "b", "train", 24, seed=3)
    assert again.read_bytes() == scenes.read_bytes()
    for i in (1, 24):
        name = f"images/{i:06d}.png"
        assert (again.parent / name).read_bytes() == (scenes.parent / name).read_bytes()
    other = make_scenes(tmp_path / "c", "test", 24, seed=3)
    assert other.read_bytes() != scenes.read_bytes()
    assert json.loads(other.read_text())["info"]["split"] == "test"


def test_annotations_are_the_visible_pixels(scenes: Path) -> None:
    data = json.loads(scenes.read_text())
    info = data["info"]["description"]
    assert "SYNTHETIC" in info and "NOT COCO" in info
    assert [c["name"] for c in data["categories"]] == list(FASHION_MNIST_CLASSES)
    assert all(c["keypoints"] == list(KEYPOINT_NAMES) for c in data["categories"])
    by_image: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    counts = [len(by_image.get(img["id"], [])) for img in data["images"]]
    assert min(counts) >= 1 and max(counts) <= 6 and np.mean(counts) > 2.5
    for img in data["images"]:
        pixels = np.asarray(Image.open(scenes.parent / img["file_name"]))
        assert pixels.shape == (128, 128)
        union = np.zeros((128, 128), np.int32)
        for a in by_image.get(img["id"], []):
            m = mask_utils.decode(a["segmentation"]).astype(bool)
            union += m
            ys, xs = np.nonzero(m)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            assert a["area"] == m.sum() and 1 <= a["category_id"] <= 10
            kp = np.asarray(a["keypoints"], dtype=float).reshape(5, 3)
            assert (kp[:, 2] == 2).all()
            assert m[(kp[:, 1] - 0.5).astype(int), (kp[:, 0] - 0.5).astype(int)].all()  # on the visible mask
            top, bottom, left, right = kp[0, 1], kp[1, 1], kp[2, 0], kp[3, 0]
            assert (top, bottom, left, right) == (ys.min() + 0.5, ys.max() + 0.5, xs.min() + 0.5, xs.max() + 0.5)
        # masks do not overlap (occlusion resolved), and every inked pixel belongs to an annotated item
        assert union.max() <= 1
        assert ((pixels > INK_THRESHOLD) == (union == 1)).all()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="split 'val'"):
        make_scenes("/nonexistent", "val", 3)
    with pytest.raises(ValueError, match="scale"):
        make_scenes("/nonexistent", "train", 3, scale=(1.0, 6.0))


def test_real_scenes_are_as_recorded_before_semantic_masks(tmp_path: Path) -> None:
    """The scenes of real Fashion-MNIST for these arguments, recorded at commit 1e5d005 (before segmentation used
    them): annotations.json byte for byte, and the decoded pixels."""
    import hashlib

    ann = make_scenes(tmp_path / "s", "train", 4, seed=3)
    data = json.loads(ann.read_text())
    pixels = b"".join(np.asarray(Image.open(ann.parent / i["file_name"])).tobytes() for i in data["images"])
    assert hashlib.sha256(ann.read_bytes()).hexdigest() == (
        "551ef26a4d0033ca81438dd934de9d82f331b8dc3894c2f889542dd5f36d06de"
    )
    assert hashlib.sha256(pixels).hexdigest() == "4ca4d8f1d7d386fb946137f35f2b84c9cfb5d79d14d79c9da1696704ae504bd0"
    assert len(data["annotations"]) == 17


def test_concurrent_processes_generate_the_scenes_once(tmp_path, monkeypatch) -> None:
    """Two ranks of a torchrun job (here: two threads, each with its own lock file handle) asking for the same
    scenes: one generates them, the other waits and finds them complete (no reading of half-written images)."""
    import threading
    import time

    from slimmable.data import detection, scenes

    calls = []

    def fake_make_scenes(folder, split, n, seed, image_size, root):
        calls.append(split)
        time.sleep(0.3)  # the other thread arrives meanwhile
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "annotations.json").write_text("{}")

    monkeypatch.setattr(scenes, "make_scenes", fake_make_scenes)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(detection._scenes(tmp_path, "train", 4, 0, 64, None)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["train"] and len(results) == 2 and results[0] == results[1]
