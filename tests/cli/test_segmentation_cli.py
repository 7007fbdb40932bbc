"""Semantic segmentation through the task seam: the same ``train``/``eval``/``profile``/``export``/``serve`` commands
as classification and detection, with mIoU and pixel accuracy per width and class maps in the server's answer."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_data import tiny_segmentation_recipe, write_recipe
from PIL import Image
from pycocotools import mask as mask_utils

import slimmable
from slimmable.checkpoint import load_model
from slimmable.cli.main import main
from slimmable.config import RunConfig
from slimmable.runtime import SlimmableRunner
from slimmable.serve.server import PredictionServer
from slimmable.tasks import create_task, task_of


@pytest.fixture(scope="module")
def trained(fmnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A segmenter trained for 2 epochs of 14 fake scenes by `slimmable train` (its output folder)."""
    out = tmp_path_factory.mktemp("seg") / "run"
    recipe = write_recipe(out.parent / "s.yaml", tiny_segmentation_recipe(fmnist))
    with pytest.MonkeyPatch.context() as mp:  # the scenes go to a private cache (eval finds them there again)
        mp.setenv("SLIMMABLE_CACHE_DIR", str(out.parent / "cache"))
        args = ["train", "--recipe", str(recipe), "--out", str(out), "--latency-runs", "0", "--no-tensorboard"]
        assert main(args) == 0
    return out


def test_segmenter_trains_and_evaluates_per_width(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    history = json.loads((trained / "history.json").read_text())
    assert len(history) == 2 and all({r["width"] for r in h["val"]} == {0.5, 1.0} for h in history)
    for w in (0.5, 1.0):  # Algorithm 1 lowers every width's pixel cross-entropy
        first, second = (next(r["loss"] for r in h["train"] if r["width"] == w) for h in history)
        assert second < first, (w, first, second)
    final = json.loads((trained / "final_metrics.json").read_text())["widths"]
    assert [r["width"] for r in final] == [0.5, 1.0]
    for r in final:
        assert 0.0 <= r["miou"] <= 100.0 and 0.0 <= r["pixel_acc"] <= 100.0 and r["images"] == 6
    assert final[0]["macs"] < final[1]["macs"] and final[0]["params"] < final[1]["params"]
    loaded = load_model(trained / "best.pt")
    assert task_of(loaded.model).name == "segmentation"
    assert loaded.checkpoint["preprocess"]["task"] == "segmentation"

    # eval rebuilds the model and its test scenes from the checkpoint through the task: the run's numbers
    capsys.readouterr()
    args = ["eval", "--checkpoint", str(trained / "best.pt"), "--latency-runs", "0", "--batch-size", "4",
            "--data-cache", str(trained.parent / "cache")]  # fmt: skip
    rc = main(args)
    text = capsys.readouterr().out
    assert rc == 0 and "mIoU %" in text and "pixel acc %" in text, text
    evaluated = json.loads((trained / "eval_best_test.json").read_text())["widths"]
    for a, b in zip(evaluated, final):
        assert a["miou"] == pytest.approx(b["miou"], abs=1e-6) and a["pixel_acc"] == pytest.approx(b["pixel_acc"])


def test_segmentation_model_on_classification_data_is_refused(fmnist: Path) -> None:
    mixed = tiny_segmentation_recipe(fmnist)
    mixed["data"] = {"dataset": "fashion_mnist", "root": str(fmnist)}
    with pytest.raises(ValueError, match="is a segmentation model but data.dataset fashion_mnist is data for"):
        create_task(RunConfig.from_dict(mixed))


def test_profile_counts_a_segmenter(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["profile", "slim_lraspp_mobilenet_v2", "--widths", "0.5,1.0", "--num-classes", "11", "--in-chans", "1",
            "--input-size", "64", "--runs", "0"]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "at 64x64" in text and "MACs (M)" in text


def test_served_class_maps_equal_the_model(trained: Path) -> None:
    """The server answers each image's class map, as a PNG of class indices or COCO RLE per class: the argmax of
    the checkpoint's model at the width asked for."""
    model = load_model(trained / "best.pt").model.eval()
    runner = SlimmableRunner(model, input_size=64, batch_sizes=(1,), calibration_s=0.2)
    server = PredictionServer(runner)
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    for w in (0.5, 1.0):
        slimmable.set_width(model, w)
        with torch.no_grad():
            ref = model(x)["out"].argmax(dim=1)
        answer = server.predict(x, {"width": w}, 0.0)
        assert answer["width"] == w and answer["batch_size"] == 2
        for entry, r in zip(answer["masks"], ref):
            png = Image.open(io.BytesIO(base64.b64decode(entry["mask"]["data"])))
            got = torch.from_numpy(np.array(png)).long()
            assert entry["mask"]["format"] == "png" and entry["size"] == [64, 64]
            assert (got != r).float().mean() < 0.01  # dense copies: BN folded, float rounding may flip a tie
            assert entry["classes"] == sorted(torch.unique(got).tolist())
        (entry,) = server.predict(x[:1], {"width": w, "mask_format": "rle"}, 0.0)["masks"]
        decoded = np.zeros((64, 64), dtype=np.int64)
        for k, rle in entry["mask"]["rle"].items():
            decoded[mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}) > 0] = int(k)
        assert (torch.from_numpy(decoded) != ref[0]).float().mean() < 0.01
    with pytest.raises(ValueError, match="mask_format 'gif' is not one of png, rle"):
        server.predict(x, {"mask_format": "gif"}, 0.0)


def test_a_mask_folder_trains_through_the_task(tmp_path: Path) -> None:
    """`mask_folder` data (images/ + masks/ PNGs, classes.txt): the task builds it, a segmenter trains on it and the
    report covers every width."""
    from fake_data import write_segmentation_folder

    from slimmable.train import train_from_config

    root = write_segmentation_folder(tmp_path / "masks", num_classes=4, n_train=8, n_test=4, size=(32, 32))
    recipe = {
        "model": {"name": "slim_lraspp_mobilenet_v2", "widths": [0.5, 1.0]},
        "data": {"dataset": "mask_folder", "root": str(root), "augment": "none", "image_size": 32, "batch_size": 4},
        "train": {"epochs": 1, "seed": 0, "amp": "off", "channels_last": False},
    }
    cfg = RunConfig.from_dict(recipe)
    task = create_task(cfg)
    data = task.load_data(cfg, tmp_path / "cache")
    assert task.name == "segmentation" and data.num_classes == 4 and data.in_chans == 3 and len(data.train) == 8
    result = train_from_config(cfg, tmp_path / "run", device="cpu", latency_runs=0, tensorboard=False)
    assert [r["width"] for r in result.report] == [0.5, 1.0] and all(r["images"] == 4 for r in result.report)


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_export_writes_the_out_logits_per_width(trained: Path, tmp_path: Path, fmt: str) -> None:
    """`slimmable export` writes each width of a segmenter as a file computing its `out` logits (verified by the
    command against the slim model); the file run here gives the checkpoint model's logits."""
    from slimmable.export import get_exporter

    out = tmp_path / "exp"
    assert main(["export", "--checkpoint", str(trained / "best.pt"), "--out", str(out), "--format", fmt]) == 0
    model = load_model(trained / "best.pt").model.eval()
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(5))
    exporter = get_exporter(fmt)
    for w, name in ((0.5, "w0.5"), (1.0, "w1")):
        (path,) = out.glob(f"*_{name}{exporter.suffix}")
        run = exporter.load(path)
        slimmable.set_width(model, w)
        with torch.no_grad():
            ref = model(x)["out"]
        torch.testing.assert_close(run(x), ref, atol=1e-4, rtol=1e-4)
