"""Fuzz of COCO-format data: mutated copies of a small valid dataset either load or are refused in one line.

The script writes a small valid COCO dataset (real PNG images it makes itself: grey and RGB; boxes, polygons,
uncompressed and compressed RLEs, keypoints with a flip map, a crowd annotation), then builds
:class:`~slimmable.data.coco.CocoDetectionDataset` on mutated copies of it. The mutations come from two tables of
functions: targeted ones (the cases of the reliability issue: duplicate ids, category 0, a size that differs from
the file's, NaN/inf numbers, short or odd polygons, bad RLE counts, a flip map out of range, a decompression-bomb
header, JSON nested 200,000 deep, truncated, missing and dangling image files, ...) and random ones, applied at a
random place of the JSON (drop a key, a wrong type, a huge or negative number, NaN/inf, a duplicated entry, deep
nesting, a multi-megabyte string, an empty container).

Each case must end in one of two outcomes:

* ``loads``: the dataset builds, and every item (with a horizontal flip) gives an image and targets a detector
  can train on: the JSON's size, finite boxes with area, labels from 1, finite keypoints, masks of the image size;
* ``refused``: a ``ValueError`` or ``FileNotFoundError`` of one line and at most 500 characters.

Anything else (another exception type, a traceback-sized or multi-line message, an error while reading items,
wrong targets) is a failure: it is listed, and the exit status is 1. A targeted mutation must be refused.

Usage:
    python benchmarks/fuzz_coco.py [--cases 300] [--seed 0] [--json benchmarks/results/fuzz_coco.json]
    python benchmarks/fuzz_coco.py --quick    # the targeted cases and a few dozen random ones, in seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import struct
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _bench import write_json
from PIL import Image
from pycocotools import mask as mask_utils

from slimmable.data.coco import CocoDetectionDataset

H, W = 24, 32
MAX_MESSAGE = 500
DEEP = 200_000  # JSON nesting of the deep-nesting mutations (json.loads recurses once per level)
LONG = 5_000_000  # characters of the long-string mutations
_DEEP_MARK = "__fuzz_deep__"  # replaced in the JSON text by DEEP nested lists (json.dumps cannot nest that deep)

# ------------------------------------------------------------------------------------------------ the valid data


def _png(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width`` x ``height`` with no pixel data (a decompression bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def write_base(folder: Path) -> dict[str, Any]:
    """Four small images (three grey, one RGB) and their COCO annotations; returns the JSON data."""
    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(1, 5):
        mode = "RGB" if i == 4 else "L"
        arr = rng.integers(0, 255, (H, W, 3) if mode == "RGB" else (H, W), dtype=np.uint8)
        Image.fromarray(arr, mode).save(folder / "img" / f"{i}.png")
        images.append({"id": i, "file_name": f"img/{i}.png", "width": W, "height": H})
    mask = np.zeros((H, W), np.uint8)
    mask[4:12, 6:20] = 1
    compressed = mask_utils.encode(np.asfortranarray(mask))
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()  # starts with a run of zeros
    segmentations = [
        [[6, 4, 20, 4, 20, 12, 6, 12]],
        {"size": [H, W], "counts": compressed["counts"].decode("ascii")},
        {"size": [H, W], "counts": runs},
    ]
    aid = 1
    for i in range(1, 5):
        for j in range(2):
            x, y, w, h = 6 + j * 2, 4, 14, 8
            kps = [x + 1, y + 1, 2, x + w - 1, y + 1, 2, x + w / 2, y + h / 2, 1]
            anns.append({
                "id": aid, "image_id": i, "category_id": 1 + j, "bbox": [x, y, w, h], "area": w * h,
                "segmentation": copy.deepcopy(segmentations[aid % 3]), "iscrowd": int(aid == 5), "keypoints": kps,
                "num_keypoints": 3,
            })  # fmt: skip
            aid += 1
    cats = [{"id": c, "name": f"c{c}", "keypoints": ["l", "r", "m"], "keypoint_flip_map": [[0, 1]]} for c in (1, 2)]
    return {"images": images, "annotations": anns, "categories": cats}


# ------------------------------------------------------------------------------------------------- the mutations

# a mutation edits the JSON data in place and may change the image folder; it returns the JSON text to write, or
# None to write json.dumps(data)
Mutation = Callable[[dict, Path, random.Random], "str | None"]


def _ann(i: int, **fields: Any) -> Mutation:
    def edit(data: dict, folder: Path, rng: random.Random) -> None:
        data["annotations"][i].update(copy.deepcopy(fields))

    return edit


def _at(key: str, i: int, field: str, index: int, value: Any) -> Mutation:
    def edit(data: dict, folder: Path, rng: random.Random) -> None:
        data[key][i][field][index] = value

    return edit


def _image_file(write: Callable[[Path], None], name: str = "2.png") -> Mutation:
    def edit(data: dict, folder: Path, rng: random.Random) -> None:
        path = folder / "img" / name
        path.unlink()
        write(path)

    return edit


def _deep_file(data: dict, folder: Path, rng: random.Random) -> str:
    return "[" * DEEP + "]" * DEEP


#: the cases of the reliability issue: each must be refused
TARGETED: dict[str, Mutation] = {
    "duplicate image id": lambda d, f, r: d["images"][2].update(id=2),
    "duplicate annotation id": _ann(4, id=2),
    "duplicate category id": lambda d, f, r: d["categories"][1].update(id=1),
    "category id 0": lambda d, f, r: d["categories"][0].update(id=0),
    "category id negative": lambda d, f, r: d["categories"][0].update(id=-1),
    "json width differs from the file": lambda d, f, r: d["images"][1].update(width=W * 2),
    "json height differs from the file": lambda d, f, r: d["images"][3].update(height=H - 1),
    "bbox NaN": _at("annotations", 1, "bbox", 0, math.nan),
    "bbox inf": _at("annotations", 1, "bbox", 3, math.inf),
    "bbox on the image edge": _ann(0, bbox=[W, 2, 0.5, 3]),
    "keypoint NaN": _at("annotations", 2, "keypoints", 1, math.nan),
    "keypoint -inf": _at("annotations", 2, "keypoints", 0, -math.inf),
    "keypoint visibility 7": _at("annotations", 2, "keypoints", 2, 7),
    "polygon NaN": lambda d, f, r: d["annotations"][2]["segmentation"][0].__setitem__(3, math.nan),
    "polygon of 4 numbers": _ann(0, segmentation=[[1, 2, 3, 4]]),
    "polygon of odd length": _ann(0, segmentation=[[1, 2, 3, 4, 5, 6, 7]]),
    "polygon far outside": _ann(0, segmentation=[[1, 2, 3e12, 4, 5, 6]]),
    "rle negative count": _ann(2, segmentation={"size": [H, W], "counts": [10, -5, H * W - 5]}),
    "rle counts short of h*w": _ann(2, segmentation={"size": [H, W], "counts": [10, 5]}),
    "rle string garbage": _ann(1, segmentation={"size": [H, W], "counts": "\x7f\x7f~~"}),
    "rle size wrong": _ann(1, segmentation={"size": [H + 1, W], "counts": [H * W + W]}),
    "flip map index out of range": lambda d, f, r: d["categories"][0].update(keypoint_flip_map=[[0, 3]]),
    "flip map negative index": lambda d, f, r: d["categories"][0].update(keypoint_flip_map=[[0, -1]]),
    "flip map conflicting pairs": lambda d, f, r: d["categories"][1].update(keypoint_flip_map=[[0, 2]]),
    "png header 50000x50000": _image_file(lambda p: _png(p, 50000, 50000)),
    "png header 10000x10000 (above PIL's limit)": _image_file(lambda p: _png(p, 10000, 10000)),
    "json nested 200,000 deep": _deep_file,
    "image file truncated": _image_file(lambda p: p.write_bytes(b"\x89PNG\r\n")),
    "image file is text": _image_file(lambda p: p.write_text("not an image")),
    "image file missing": _image_file(lambda p: None),
    "image file a dangling link": _image_file(lambda p: p.symlink_to(p.parent / "nowhere.png")),
    "image file a folder": _image_file(lambda p: p.mkdir()),
    "two entries, one file": lambda d, f, r: d["images"][1].update(file_name="img/./1.png"),
    "bbox a long number string": _at("annotations", 0, "bbox", 0, "1" * LONG),
    "file_name a long string": lambda d, f, r: d["images"][0].update(file_name="x" * LONG),
    "annotation without image": _ann(3, image_id=99),
    "iscrowd 'no'": _ann(0, iscrowd="no"),
    "area NaN": _ann(0, area=math.nan),
    "images not a list": lambda d, f, r: d.update(images={"1": d["images"][0]}),
    "not an object": lambda d, f, r: "[1, 2, 3]",
    "huge category id": lambda d, f, r: d["categories"][1].update(id=10**30),
}


def _random_path(data: Any, rng: random.Random) -> tuple:
    """A random place in the JSON (dict keys and list indices from the top), each level's children alike likely,
    so that the top-level lists are hit as often as the numbers deep in one RLE."""
    path: tuple = ()
    node = data
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
        if not keys or (path and rng.random() < 0.25):
            return path
        key = rng.choice(keys)
        path, node = (*path, key), node[key]


def _random_place(op: Callable[[Any, Any, Any, random.Random], None]) -> Mutation:
    """A random mutation: ``op(parent, key, value, rng)`` at a random place of the JSON."""

    def edit(data: dict, folder: Path, rng: random.Random) -> None:
        path = _random_path(data, rng)
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        op(parent, path[-1], parent[path[-1]], rng)

    return edit


def _drop(parent: Any, key: Any, value: Any, rng: random.Random) -> None:
    del parent[key]


def _setter(values: Callable[[Any, random.Random], Any]) -> Callable[[Any, Any, Any, random.Random], None]:
    def op(parent: Any, key: Any, value: Any, rng: random.Random) -> None:
        parent[key] = values(value, rng)

    return op


def _duplicate(parent: Any, key: Any, value: Any, rng: random.Random) -> None:
    if isinstance(parent, list):
        parent.append(copy.deepcopy(value))  # a duplicate entry: duplicate ids among images/annotations/categories
    else:
        parent[key] = copy.deepcopy(parent)  # a copy of the enclosing object in place of one field


#: random mutations, each applied at a random place
RANDOM: dict[str, Mutation] = {
    "drop a key": _random_place(_drop),
    "wrong type": _random_place(_setter(lambda v, r: r.choice(["x", "", [], {}, None, True, [1, 2], {"a": 1}]))),
    "huge number": _random_place(_setter(lambda v, r: r.choice([10**30, -(10**30), 1e308, 2**63, 10**4000]))),
    "negative number": _random_place(_setter(lambda v, r: -abs(v) - 1 if isinstance(v, (int, float)) else -1)),
    "NaN or inf": _random_place(_setter(lambda v, r: r.choice([math.nan, math.inf, -math.inf]))),
    "duplicate": _random_place(_duplicate),
    "deep nesting": _random_place(_setter(lambda v, r: _DEEP_MARK)),
    "nesting 50 deep": _random_place(_setter(lambda v, r: json.loads("[" * 50 + "1" + "]" * 50))),
    "long string": _random_place(_setter(lambda v, r: r.choice("9x\n\u00e9") * LONG)),
    "empty": _random_place(_setter(lambda v, r: r.choice([[], {}, "", 0]))),
}

# ---------------------------------------------------------------------------------------------------- the checks


def _check_items(ds: CocoDetectionDataset) -> str | None:
    """Why the loaded dataset's items are not what a detector can train on (None: they are)."""
    for i in range(len(ds)):
        image, t = ds[i]
        info = ds.coco.imgs[ds.ids[i]]
        if image.ndim != 3 or tuple(image.shape[1:]) != (info["height"], info["width"]):
            return f"item {i}: image {tuple(image.shape)} is not the JSON's {info['height']}x{info['width']}"
        boxes = t["boxes"]
        if not bool(boxes.isfinite().all()) or bool((boxes[:, 2:] <= boxes[:, :2]).any()):
            return f"item {i}: boxes without area or not finite: {boxes.tolist()}"
        if len(t["labels"]) and int(t["labels"].min()) < 1:
            return f"item {i}: label {int(t['labels'].min())} (0 is the background)"
        if "masks" in t and tuple(t["masks"].shape) != (len(boxes), *image.shape[1:]):
            return f"item {i}: masks {tuple(t['masks'].shape)} for {len(boxes)} boxes of a {tuple(image.shape)} image"
        if "keypoints" in t and not bool(t["keypoints"].isfinite().all()):
            return f"item {i}: keypoints not finite"
    return None


def run_case(base: Path, data: dict, name: str, mutation: Mutation, rng: random.Random, work: Path) -> dict:
    """Apply one mutation to a fresh copy of the dataset and build it; the case's outcome."""
    folder = work / "case"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(base, folder, symlinks=True)
    data = copy.deepcopy(data)
    text = mutation(data, folder, rng)
    if text is None:
        text = json.dumps(data).replace(json.dumps(_DEEP_MARK), "[" * DEEP + "]" * DEEP)
    ann = folder / "ann.json"
    ann.write_text(text)
    case = {"mutation": name, "json_bytes": len(text)}
    start = time.perf_counter()
    try:
        ds = CocoDetectionDataset(folder, ann, hflip=1.0)
    except (ValueError, FileNotFoundError) as err:
        message = str(err)
        one_line = "\n" not in message and len(message) <= MAX_MESSAGE
        case.update(outcome="refused" if one_line else "FAIL: message", error=type(err).__name__,
                    message=message[:300], message_chars=len(message))  # fmt: skip
    except Exception as err:  # any other type is what this script looks for
        case.update(outcome="FAIL: exception", error=type(err).__name__, message=str(err)[:300],
                    traceback=traceback.format_exc()[-2000:])  # fmt: skip
    else:
        try:
            why = _check_items(ds)
        except Exception as err:  # reading items: mid-epoch in a real run
            case.update(outcome="FAIL: item", error=type(err).__name__, message=str(err)[:300],
                        traceback=traceback.format_exc()[-2000:])  # fmt: skip
        else:
            case.update(outcome="loads" if why is None else "FAIL: targets", message=why)
    case["seconds"] = round(time.perf_counter() - start, 4)
    return case


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the targeted cases and 3 random ones per kind")
    p.add_argument("--cases", type=int, default=300, help="random cases (default 300; --quick: 3 per kind)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="benchmarks/results/fuzz_coco.json", help="where to write the results")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    kinds = list(RANDOM)
    n_random = 3 * len(kinds) if args.quick else args.cases
    cases: list[dict] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fuzz_coco_") as tmp:
        work = Path(tmp)
        base = work / "base"
        data = write_base(base)
        base_case = run_case(base, data, "none (the valid data)", lambda d, f, r: None, rng, work)
        if base_case["outcome"] != "loads":
            raise SystemExit(f"the valid data does not load: {base_case}")
        cases.append({**base_case, "kind": "valid"})
        for name, mutation in TARGETED.items():
            case = run_case(base, data, name, mutation, rng, work)
            if case["outcome"] == "loads":
                case["outcome"] = "FAIL: loads"  # a targeted mutation must be refused
            cases.append({**case, "kind": "targeted"})
        for i in range(n_random):
            kind = kinds[i % len(kinds)]
            cases.append({**run_case(base, data, f"{kind} #{i // len(kinds)}", RANDOM[kind], rng, work),
                          "kind": "random"})  # fmt: skip
    wall = time.perf_counter() - start
    width = max(len(c["mutation"]) for c in cases)
    print(f"{'mutation':<{width}}  {'outcome':<16} message")
    for c in cases:
        msg = (c.get("message") or "").replace(str(work), "<tmp>")
        print(f"{c['mutation']:<{width}}  {c['outcome']:<16} {msg[:110]}")
    failures = [c for c in cases if c["outcome"].startswith("FAIL")]
    counts = {o: sum(c["outcome"] == o for c in cases) for o in sorted({c["outcome"] for c in cases})}
    print(f"\n{len(cases)} cases in {wall:.1f} s: " + ", ".join(f"{n} {o}" for o, n in counts.items()))
    for c in failures:
        print(f"FAILED {c['mutation']}: {c['outcome']} {c.get('error', '')}\n{c.get('traceback', '')}", file=sys.stderr)
    write_json(args.json, {"seed": args.seed, "quick": args.quick, "wall_seconds": round(wall, 2),
                           "outcomes": counts, "failures": len(failures), "cases": cases})  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
