"""Semantic segmentation data: scene masks from the instance masks (the scenes themselves unchanged), COCO-format
annotations painted into class maps, image+mask folders refused with errors that name the file and the fix."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_data import segmentation_pair, write_fashion_mnist, write_segmentation_folder
from PIL import Image
from pycocotools import mask as mask_utils

from slimmable.data import IGNORE_INDEX, create_segmentation_datasets
from slimmable.data.detection import create_detection_datasets
from slimmable.data.scenes import INK_THRESHOLD, make_scenes, scene_semantic_mask
from slimmable.data.segmentation import (
    CocoSegmentationDataset,
    FolderSegmentationDataset,
    coco_semantic_mask,
)


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fashion_mnist(tmp_path_factory.mktemp("data") / "fm", n_train=16, n_test=16)


def _decoded(ann: dict) -> np.ndarray:
    return mask_utils.decode(ann["segmentation"]).astype(bool)


# ------------------------------------------------------------------------------------------------------ scenes

# make_scenes' files for these arguments, recorded before semantic masks existed (commit 1e5d005): segmentation
# must leave the detection data as it was. The hashes are of annotations.json and of the decoded pixels.
_RECORDED = {
    "train": ("a83a3425e19f1bdc0617237ea999a16efff6a1c4e6538704415a44d56010bbef", 15),
    "test": ("0b270461f2fed6f379296ecae5ab68b9b51963cd0533ef52c6e2bbc32869d22f", 19),
}
_RECORDED_PIXELS = {
    "train": "b157df444631c635fcd75fba9e66c535d382637ec17ff54a7c51bd29af9c68aa",
    "test": "577d95c6418f6ac7f9d9f58320b983300a1acc2647fdf2693c9cd2f13d52a51c",
}


@pytest.mark.parametrize("split", ["train", "test"])
def test_the_same_seed_gives_the_same_detection_scenes_as_before(fmnist: Path, tmp_path: Path, split: str) -> None:
    ann = make_scenes(tmp_path / split, split, 5, seed=7, root=fmnist, image_size=64, scale=(0.8, 1.5))
    data = json.loads(ann.read_text())
    pixels = b"".join(np.asarray(Image.open(ann.parent / i["file_name"])).tobytes() for i in data["images"])
    assert (hashlib.sha256(ann.read_bytes()).hexdigest(), len(data["annotations"])) == _RECORDED[split]
    assert hashlib.sha256(pixels).hexdigest() == _RECORDED_PIXELS[split]
    assert sorted(p.name for p in ann.parent.iterdir()) == ["annotations.json", "images"]  # nothing added


def test_scene_masks_are_the_instance_masks_classes(fmnist: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    splits = create_segmentation_datasets(
        "fmnist_scenes", fmnist, image_size=64, scenes_train=10, scenes_test=6, val_size=3, cache_dir=cache
    )
    assert (splits.num_classes, splits.in_chans, splits.image_size, splits.name) == (11, 1, 64, "fmnist_scenes")
    assert splits.class_names[:3] == ["background", "T-shirt/top", "Trouser"] and splits.ignore_index == 255
    assert (len(splits.train), len(splits.val), len(splits.test)) == (7, 3, 6)
    test = splits.test
    seen = set()
    for i in range(len(test)):
        image, mask = test[i]
        assert image.shape == (1, 64, 64) and image.dtype == torch.float32
        assert mask.shape == (64, 64) and mask.dtype == torch.int64
        anns = test.coco.imgToAnns[test.ids[i]]
        expected = np.zeros((64, 64), np.int64)
        for a in anns:  # annotation order is drawing order: a later item on top
            expected[_decoded(a)] = a["category_id"]  # ids 1-10: the Fashion-MNIST class + 1
        assert torch.equal(mask, torch.from_numpy(expected))
        for a in anns:  # every instance pixel has its class (the visible masks are disjoint: each is on top)
            assert (mask.numpy()[_decoded(a)] == a["category_id"]).all()
        # background exactly where no item was pasted
        ink = (image[0] * 255).round() > INK_THRESHOLD
        assert torch.equal(mask > 0, ink)
        seen |= set(mask.unique().tolist())
    assert 0 in seen and len(seen) >= 4 and IGNORE_INDEX not in seen
    # the detection data reads the same cached scenes, and holds out the same training scenes
    det = create_detection_datasets(
        "fmnist_scenes", fmnist, image_size=64, scenes_train=10, scenes_test=6, val_size=3, cache_dir=cache
    )
    assert det.val.ids == splits.val.ids and det.train.ids == splits.train.ids and det.root == splits.root
    assert len([p for p in (cache / "fmnist_scenes").iterdir() if not p.name.startswith(".")]) == 2  # .locks
    rgb = create_segmentation_datasets(
        "fmnist_scenes", fmnist, image_size=64, scenes_test=6, cache_dir=cache, load_train=False, channels=3
    )
    assert rgb.in_chans == 3 and rgb.train is None and torch.equal(rgb.test[0][0][2], test[0][0][0])


def test_scene_semantic_mask_draws_later_items_on_top() -> None:
    first, second = np.zeros((6, 8), np.uint8), np.zeros((6, 8), np.uint8)
    first[1:4, 1:5], second[2:5, 3:7] = 1, 1
    anns = []
    for k, (cat, m) in enumerate(((4, first), (9, second))):
        rle = mask_utils.encode(np.asfortranarray(m))
        anns.append({"id": k + 1, "category_id": cat, "segmentation": {**rle, "counts": rle["counts"].decode()}})
    out = scene_semantic_mask(anns, 6, 8)
    expected = np.zeros((6, 8), np.uint8)
    expected[1:4, 1:5] = 4
    expected[2:5, 3:7] = 9
    assert np.array_equal(out, expected)
    assert np.array_equal(scene_semantic_mask(anns[::-1], 6, 8)[2:4, 3:5], np.full((2, 2), 4))
    with pytest.raises(ValueError, match=r"annotation id 1: category_id 11 has no class index"):
        scene_semantic_mask([{**anns[0], "category_id": 11}], 6, 8)


def test_training_flips_image_and_mask_together(fmnist: Path, tmp_path: Path) -> None:
    splits = create_segmentation_datasets(
        "fmnist_scenes", fmnist, image_size=64, scenes_train=4, scenes_test=2, cache_dir=tmp_path
    )
    assert splits.train.hflip == 0.5 and splits.test.hflip == 0.0
    plain, flipped = splits.train.view(range(4), hflip=0.0), splits.train.view(range(4), hflip=1.0)
    for i in range(4):
        (x0, y0), (x1, y1) = plain[i], flipped[i]
        assert torch.equal(x1, x0.flip(-1)) and torch.equal(y1, y0.flip(-1))
    torch.manual_seed(0)
    flips = [torch.equal(splits.train[0][1], plain[0][1]) for _ in range(40)]
    assert 5 < sum(flips) < 35  # about half the draws are flipped


# ----------------------------------------------------------------------------------------------- COCO format

H, W = 10, 12


def _rle_columns(rows: slice, cols: slice) -> list[int]:
    """Uncompressed COCO RLE run lengths (column-major, starting with zeros) of a rectangle, by hand."""
    counts, run, on = [], 0, False
    for x in range(W):
        for y in range(H):
            inside = rows.start <= y < rows.stop and cols.start <= x < cols.stop
            if inside != on:
                counts.append(run)
                run, on = 0, inside
            run += 1
    return [*counts, run]


def _hand_coco(tmp: Path) -> dict:
    """One 12x10 image: a polygon (category 3), an uncompressed RLE over it (category 7), a compressed RLE
    (category 3) and a crowd region (category 7) partly under the RLE instance; category 5 has no annotation."""
    (tmp / "img").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((H, W), 90, np.uint8), "L").save(tmp / "img" / "a.png")
    strip = np.zeros((H, W), np.uint8)
    strip[8, 0:3] = 1
    compressed = mask_utils.encode(np.asfortranarray(strip))
    crowd = np.zeros((H, W), np.uint8)
    crowd[6:10, 6:12] = 1
    crowd_rle = mask_utils.encode(np.asfortranarray(crowd))

    def ann(i: int, cat: int, seg: object, bbox: list[int], crowd: int = 0) -> dict:
        return {"id": i, "image_id": 1, "category_id": cat, "segmentation": seg, "bbox": bbox, "area": 1,
                "iscrowd": crowd}  # fmt: skip

    return {
        "images": [{"id": 1, "file_name": "img/a.png", "width": W, "height": H}],
        "annotations": [
            ann(1, 3, [[1, 1, 5, 1, 5, 5, 1, 5]], [1, 1, 4, 4]),  # rows 1-4, columns 1-4
            ann(2, 7, {"size": [H, W], "counts": _rle_columns(slice(3, 7), slice(4, 9))}, [4, 3, 5, 4]),
            ann(3, 3, {"size": [H, W], "counts": compressed["counts"].decode()}, [0, 8, 3, 1]),
            ann(4, 7, {"size": [H, W], "counts": crowd_rle["counts"].decode()}, [6, 6, 6, 4], crowd=1),
        ],
        "categories": [{"id": 3, "name": "cat"}, {"id": 5, "name": "bird"}, {"id": 7, "name": "dog"}],
    }


def _expected_hand_mask() -> np.ndarray:
    out = np.zeros((H, W), np.int64)
    out[1:5, 1:5] = 1  # category 3 -> class 1
    out[6:10, 6:12] = 255  # the crowd region: ignored ...
    out[3:7, 4:9] = 3  # ... except where the later RLE instance (category 7 -> class 3) covers it
    out[8, 0:3] = 1
    return out


def test_coco_annotations_become_a_class_map(tmp_path: Path) -> None:
    data = _hand_coco(tmp_path)
    (tmp_path / "ann.json").write_text(json.dumps(data))
    ds = CocoSegmentationDataset(tmp_path, tmp_path / "ann.json", hflip=0.0)
    assert ds.class_names == ["background", "cat", "bird", "dog"] and ds.class_index == {3: 1, 5: 2, 7: 3}
    image, mask = ds[0]
    assert image.shape == (1, H, W) and torch.allclose(image, torch.full((1, H, W), 90 / 255))
    assert np.array_equal(mask.numpy(), _expected_hand_mask()), mask
    # the same from the plain function; a crowd region drawn before an instance gives way to it as well
    painted = coco_semantic_mask(data["annotations"][::-1], H, W, ds.class_index)
    assert painted[1:5, 1:5].tolist() == [[1] * 4] * 4 and painted[6, 6:9].tolist() == [3, 3, 3]
    # fixed size: bilinear image, nearest mask (only values of the original map)
    small = CocoSegmentationDataset(tmp_path, tmp_path / "ann.json", image_size=(5, 6), channels=3)
    image, mask = small[0]
    assert image.shape == (3, 5, 6) and mask.shape == (5, 6)
    assert set(mask.unique().tolist()) <= {0, 1, 3, 255}
    assert np.array_equal(mask.numpy(), _expected_hand_mask()[1::2, 1::2])  # PIL: source 2i + 1


def test_coco_data_is_validated_as_for_detection(tmp_path: Path) -> None:
    data = _hand_coco(tmp_path)
    del data["annotations"][2]["segmentation"]
    (tmp_path / "ann.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"ann\.json: annotation id 3 .*segmentation must be polygons or an RLE"):
        CocoSegmentationDataset(tmp_path, tmp_path / "ann.json")
    data = _hand_coco(tmp_path)
    (tmp_path / "ann.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"category id 5 \('bird'\) is not among the classes"):
        CocoSegmentationDataset(tmp_path, tmp_path / "ann.json", categories=[{"id": 3, "name": "cat"}])


def test_coco_splits_number_the_classes_of_both_alike(tmp_path: Path) -> None:
    for split in ("train", "test"):
        data = _hand_coco(tmp_path / split)
        if split == "test":  # the test split lacks category 7: it keeps the class index train gives it
            data["annotations"] = data["annotations"][:1]
            data["categories"] = data["categories"][:2]
        (tmp_path / split / "annotations.json").write_text(json.dumps(data))
    splits = create_segmentation_datasets("coco", tmp_path, hflip=False)
    assert splits.class_names == ["background", "cat", "bird", "dog"] and splits.num_classes == 4
    assert splits.in_chans == 3 and splits.image_size == W and splits.val is None
    assert np.array_equal(splits.train[0][1].numpy(), _expected_hand_mask())
    assert int(splits.test[0][1].max()) == 1
    with pytest.raises(ValueError, match=r"val_size 1 leaves none of the 1 training images"):
        create_segmentation_datasets("coco", tmp_path, val_size=1)
    with pytest.raises(ValueError, match=r"'pascal' is not a segmentation dataset; use one of fmnist_scenes"):
        create_segmentation_datasets("pascal", tmp_path)


# ------------------------------------------------------------------------------------------------------ folders


def test_folder_pairs_load_as_written(tmp_path: Path) -> None:
    root = write_segmentation_folder(tmp_path / "seg", num_classes=4, n_train=6, n_test=3)
    splits = create_segmentation_datasets("folder", root, val_size=2, split_seed=1)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4, 2, 3)
    assert splits.class_names == ["background", "c1", "c2", "c3"] and splits.num_classes == 4
    assert (splits.in_chans, splits.image_size) == (3, 24)
    image, mask = splits.test[1]
    want_image, want_mask = segmentation_pair(20, 24, 4, seed=1001)
    assert torch.equal(mask, torch.from_numpy(want_mask.astype(np.int64)))
    assert torch.equal((image * 255).round().byte(), torch.from_numpy(want_image).permute(2, 0, 1))
    assert (mask == IGNORE_INDEX).any()
    fixed = create_segmentation_datasets("folder", root, image_size=16, channels=1)
    batch = next(iter(torch.utils.data.DataLoader(fixed.train, batch_size=3)))
    assert batch[0].shape == (3, 1, 16, 16) and batch[1].shape == (3, 16, 16) and batch[1].dtype == torch.int64
    assert set(batch[1].unique().tolist()) <= {0, 1, 2, 3, 255}
    # palette PNGs hold indices too, and num_classes can stand in for classes.txt
    (root / "classes.txt").unlink()
    pal = Image.fromarray(want_mask, "L").convert("P")
    pal.putpalette(list(range(256)) * 3)
    pal.save(root / "test" / "masks" / "001.png")
    assert torch.equal(FolderSegmentationDataset(root / "test", num_classes=4)[1][1], mask)
    assert create_segmentation_datasets("folder", root, num_classes=4).class_names[1] == "class1"
    (root / "classes.txt").write_text("bg\nc1\n")
    with pytest.raises(ValueError, match=r"num_classes 4 disagrees with the 2 classes of .*classes\.txt; fix one"):
        create_segmentation_datasets("folder", root, num_classes=4)


def _save_mask(path: Path, array: np.ndarray, mode: str = "L") -> None:
    Image.fromarray(array, mode).save(path)


def _drop_mask(root: Path) -> None:
    (root / "train" / "masks" / "002.png").unlink()


def _extra_mask(root: Path) -> None:
    _save_mask(root / "train" / "masks" / "zzz.png", np.zeros((20, 24), np.uint8))


def _small_mask(root: Path) -> None:
    _save_mask(root / "train" / "masks" / "001.png", np.zeros((10, 24), np.uint8))


def _class_7(root: Path) -> None:
    mask = np.zeros((20, 24), np.uint8)
    mask[3, 4] = 7
    _save_mask(root / "test" / "masks" / "000.png", mask)


def _rgb_mask(root: Path) -> None:
    _save_mask(root / "train" / "masks" / "000.png", np.zeros((20, 24, 3), np.uint8), "RGB")


def _jpeg_mask(root: Path) -> None:
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(root / "train" / "masks" / "004.jpg")


def _two_images_one_stem(root: Path) -> None:
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(root / "train" / "images" / "003.jpg")


def _broken_image(root: Path) -> None:
    (root / "test" / "images" / "002.png").write_bytes(b"\x89PNG broken")


@pytest.mark.parametrize(
    ("edit", "kind", "message"),
    [
        (
            _drop_mask,
            ValueError,
            r"1 of 6 images have no mask, e\.g\. 002\.png has no masks/002\.png; add their masks or",
        ),
        (
            _extra_mask,
            ValueError,
            r"1 of 7 masks have no image, e\.g\. masks/zzz\.png has no images/zzz\.png\|jpg; add the images",
        ),
        (_small_mask, ValueError, r"mask .*train/masks/001\.png is 24x10 pixels but its image .*001\.png is 24x20; a"),
        (
            _class_7,
            ValueError,
            r"mask .*test/masks/000\.png has class indices \[7\] but the dataset declares 4 classes",
        ),
        (_rgb_mask, ValueError, r"mask .*000\.png is a RGB PNG; a mask holds one class index per pixel as 8-bit grey"),
        (_jpeg_mask, ValueError, r"mask .*004\.jpg is not a PNG; masks must be lossless PNGs .*save it as masks/"),
        (_two_images_one_stem, ValueError, r"images 003\.jpg and 003\.png share the stem '003'.*rename or remove one"),
        (_broken_image, ValueError, r"image .*test/images/002\.png cannot be read as an image .*replace or remove it"),
        (lambda r: (r / "classes.txt").unlink(), ValueError, r"does not declare its classes: write .*classes\.txt"),
        (
            lambda r: (r / "classes.txt").write_text("bg\nc1\n\nc3\n"),
            ValueError,
            r"classes\.txt: line 3 is blank; name",
        ),
        (lambda r: (r / "train" / "masks").rename(r / "m"), FileNotFoundError, r"train has no masks/ folder; it holds"),
    ],
)
def test_folder_errors_name_the_problem_and_the_fix(tmp_path: Path, edit, kind, message) -> None:
    root = write_segmentation_folder(tmp_path / "seg", num_classes=4)
    edit(root)
    with pytest.raises(kind, match=message) as info:
        create_segmentation_datasets("folder", root)
    assert "\n" not in str(info.value)


def test_folder_mask_changed_after_building_is_one_line_from_a_worker(tmp_path: Path) -> None:
    root = write_segmentation_folder(tmp_path / "seg", num_classes=4, n_test=2)
    ds = FolderSegmentationDataset(root / "test", num_classes=4)
    mask = np.full((20, 24), 9, np.uint8)
    _save_mask(root / "test" / "masks" / "001.png", mask)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1)
    with pytest.raises(ValueError, match=r"mask .*001\.png has class indices \[9\]") as info:
        for _ in loader:
            pass
    assert "Traceback" not in str(info.value)
