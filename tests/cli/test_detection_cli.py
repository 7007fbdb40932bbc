"""``slimmable train`` / ``slimmable eval`` of a slimmable detector on Fashion-MNIST scenes (made from fake data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_data import sigterm_during_epoch, write_recipe
from fake_data import tiny_detection_recipe as _detection_recipe

from slimmable.checkpoint import load_checkpoint
from slimmable.cli.main import main
from slimmable.config import RunConfig
from slimmable.tasks import create_task


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
    with pytest.raises(ValueError, match="detection and segmentation data, whose only augmentation is data.hflip"):
        RunConfig.from_dict(flipped)
    clash = _detection_recipe(fmnist)
    clash["model"]["options"]["widths"] = [1.0]
    recipe = write_recipe(fmnist.parent / "c.yaml", clash)
    assert main(["train", "--recipe", str(recipe), "--out", str(fmnist.parent / "c")]) == 2
    assert "model.options repeats ['widths']: set them as model.widths instead" in capsys.readouterr().err
    bogus = _detection_recipe(fmnist)
    bogus["model"]["options"]["bogus"] = 1  # torchvision's **kwargs would swallow it and the run would train
    recipe = write_recipe(fmnist.parent / "b.yaml", bogus)
    assert main(["train", "--recipe", str(recipe), "--out", str(fmnist.parent / "b")]) == 2
    err = capsys.readouterr().err
    assert "error: model option 'bogus' is not an argument of torchvision's" in err and "Traceback" not in err


def test_detector_sigterm_mid_epoch_then_resume_is_exact(
    fmnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A detection run stopped by SIGTERM in its second epoch and resumed ends with the weights and AP of the run
    that was never stopped (flips and the RPN/RoI samplers draw from the restored RNG)."""
    import torch

    from slimmable.train import run as run_module
    from slimmable.train import train_from_config

    recipe = _detection_recipe(fmnist)
    recipe["data"]["hflip"] = True
    cfg = RunConfig.from_dict(recipe)

    def train(out: Path, **kw: object) -> run_module.TrainResult:
        return train_from_config(cfg, out, device="cpu", latency_runs=0, tensorboard=False,
                                 cache_dir=tmp_path / "cache", **kw)  # fmt: skip

    full = train(tmp_path / "full")
    with sigterm_during_epoch(monkeypatch, 1):  # during epoch 2: the run stops after its first step
        stopped = train(tmp_path / "resumed")
    assert stopped.interrupted and stopped.epochs_done == 1
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["batch_in_epoch"] == 1
    resumed = train(tmp_path / "resumed", resume=tmp_path / "resumed" / "last.pt")
    assert not resumed.interrupted and resumed.report == full.report
    a = load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
