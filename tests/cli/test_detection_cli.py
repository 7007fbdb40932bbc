"""``slimmable train`` / ``slimmable eval`` of a slimmable detector on Fashion-MNIST scenes (made from fake data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_data import write_recipe

from slimmable.checkpoint import load_checkpoint
from slimmable.cli.main import main
from slimmable.config import RunConfig
from slimmable.train.tasks import create_task


def _detection_recipe(fmnist: Path, **train: object) -> dict:
    return {
        "model": {
            "name": "slim_maskrcnn_resnet18_fpn",
            "widths": [0.5, 1.0],
            "options": {"rpn_batch_size_per_image": 32, "box_batch_size_per_image": 32},
        },
        "data": {
            "dataset": "fmnist_scenes",
            "root": str(fmnist),
            "augment": "none",
            "scenes_train": 20,
            "scenes_test": 6,
            "val_size": 6,
            "batch_size": 4,
        },
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "grad_clip": 35.0},
        "train": {"epochs": 2, "seed": 0, "amp": "off", "channels_last": False, **train},
    }


def test_detector_trains_with_algorithm_1_and_evaluates_per_width(
    fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(tmp_path / "det.yaml", _detection_recipe(fmnist))
    out = tmp_path / "run"
    rc = main(["train", "--recipe", str(recipe), "--out", str(out), "--latency-runs", "0"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "bbox AP / AP50 / AP75  segm AP / AP50 / AP75" in text and "mean val box AP" in text
    history = json.loads((out / "history.json").read_text())
    assert [set(r["width"] for r in h["train"]) for h in history] == [{0.5, 1.0}] * 2
    for w in (0.5, 1.0):  # Algorithm 1 lowers every width's summed detection loss
        first, second = (next(r["loss"] for r in h["train"] if r["width"] == w) for h in history)
        assert second < first, (w, first, second)
    assert all("val_ap_mean" in h and {r["width"] for r in h["val"]} == {0.5, 1.0} for h in history)
    final = json.loads((out / "final_metrics.json").read_text())
    assert [r["width"] for r in final["widths"]] == [0.5, 1.0]
    for r in final["widths"]:
        assert all(0.0 <= r[k] <= 100.0 for k in ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP75"))
        assert r["images"] == 6 and r["macs"] > 0
    assert final["widths"][0]["params"] < final["widths"][1]["params"]
    ck = load_checkpoint(out / "best.pt")
    assert ck["preprocess"]["task"] == "detection" and ck["preprocess"]["num_classes"] == 11
    assert ck["best"]["epoch"] in (1, 2) and "ap_mean" in ck["best"]

    # eval rebuilds the detector and its test scenes from the checkpoint: the same AP as the run's report
    rc = main(["eval", "--checkpoint", str(out / "best.pt"), "--latency-runs", "0", "--batch-size", "3"])
    text = capsys.readouterr().out
    assert rc == 0, text
    report = json.loads((out / "eval_best_test.json").read_text())
    keys = ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75")
    assert [[r[k] for k in keys] for r in report["widths"]] == [[r[k] for k in keys] for r in final["widths"]]
    assert (out / "eval_best_test.csv").read_text().startswith("width,bbox_AP,bbox_AP50")


def test_model_and_data_of_different_tasks_are_refused(fmnist: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mixed = _detection_recipe(fmnist)
    mixed["model"] = {"name": "slim_resnet18"}
    with pytest.raises(ValueError, match="slim_resnet18 is a classification model but data.dataset fmnist_scenes"):
        create_task(RunConfig.from_dict(mixed))
    flipped = _detection_recipe(fmnist)
    flipped["data"]["augment"] = "crop_flip"
    with pytest.raises(ValueError, match="detection data, whose only augmentation is data.hflip"):
        RunConfig.from_dict(flipped)
    clash = _detection_recipe(fmnist)
    clash["model"]["options"]["widths"] = [1.0]
    recipe = write_recipe(fmnist.parent / "c.yaml", clash)
    assert main(["train", "--recipe", str(recipe), "--out", str(fmnist.parent / "c")]) == 2
    assert "model.options repeats ['widths']: set them as model.widths instead" in capsys.readouterr().err
