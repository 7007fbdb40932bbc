"""``slimmable train`` / ``slimmable eval`` on fake data, and SIGKILL mid-epoch then ``--resume``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fake_data import tiny_recipe, write_image_folder, write_recipe

from slimmable.cli.main import main
from slimmable.train import load_checkpoint


def test_train_then_eval(fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(fmnist))
    out = tmp_path / "run"
    rc = main(["train", "--recipe", str(recipe), "--out", str(out), "--set", "train.epochs=1", "--latency-runs", "2"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "width  top-1 %  top-5 %" in text and "0.125" in text and "0.25" in text
    assert str(out / "best.pt") in text and "tensorboard --logdir" in text
    for name in ("config.yaml", "last.pt", "best.pt", "history.json", "final_metrics.json", "final_metrics.csv"):
        assert (out / name).exists(), name
    assert list((out / "tb").iterdir())
    # eval: the recipe and data come from the checkpoint
    rc = main(["eval", "--checkpoint", str(out / "best.pt"), "--latency-runs", "0", "--batch-size", "10"])
    text = capsys.readouterr().out
    assert rc == 0, text
    report = json.loads((out / "eval_best_test.json").read_text())
    final = json.loads((out / "final_metrics.json").read_text())
    assert [r["top1"] for r in report["widths"]] == [r["top1"] for r in final["widths"]]
    assert (out / "eval_best_test.csv").exists() and "fashion_mnist test (48 images" in text
    # the held-out split, and an explicit output stem
    rc = main(["eval", "--checkpoint", str(out / "last.pt"), "--split", "val", "--out", str(tmp_path / "v"),
               "--latency-runs", "0", "--widths", "0.25"])  # fmt: skip
    assert rc == 0
    val = json.loads((tmp_path / "v.json").read_text())
    assert [r["width"] for r in val["widths"]] == [0.25] and val["widths"][0]["images"] == 16


def test_train_refuses_to_overwrite_and_needs_a_recipe(
    fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(fmnist, train={"epochs": 1}))
    out = tmp_path / "run"
    assert main(["train", "--recipe", str(recipe), "--out", str(out), "--no-tensorboard", "--latency-runs", "0"]) == 0
    capsys.readouterr()
    assert main(["train", "--recipe", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and f"--resume {out / 'last.pt'}" in err
    assert main(["train"]) == 2
    assert "give --recipe YAML" in capsys.readouterr().err
    assert main(["train", "--recipe", str(recipe), "--set", "train.epoch=2"]) == 2
    assert "unknown key 'train.epoch'" in capsys.readouterr().err
    # --resume without --recipe uses the recipe saved in the checkpoint; --set extends the run
    rc = main(["train", "--resume", str(out / "last.pt"), "--set", "train.epochs=2", "--no-tensorboard",
               "--latency-runs", "0"])  # fmt: skip
    assert rc == 0
    assert load_checkpoint(out / "last.pt")["epoch"] == 2


def test_eval_errors(fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "x.pt"
    bogus.write_bytes(b"")
    assert main(["eval", "--checkpoint", str(bogus)]) == 2
    assert "empty (0 bytes)" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_eval_official_checkpoint(official: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = write_image_folder(tmp_path / "img", n_train=1, n_val=2, size=40)
    fixture = torch.load(official / "s_mobilenet_v2.fixture.pt", weights_only=True)
    ckpt = tmp_path / "s_mobilenet_v2_0.35_0.5_0.75_1.0.pt"  # as the official code saves it
    torch.save(fixture["checkpoint"], ckpt)
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(images)]) == 2
    assert "--model slim_mobilenet_v2 --widths" in capsys.readouterr().err
    rc = main(["eval", "--checkpoint", str(ckpt), "--model", "slim_mobilenet_v2", "--widths", "0.35,0.5,0.75,1.0",
               "--dataset", "image_folder", "--data", str(images), "--image-size", "32", "--latency-runs", "0",
               "--out", str(tmp_path / "official")])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0, text
    rows = json.loads((tmp_path / "official.json").read_text())["widths"]
    assert [r["width"] for r in rows] == [0.35, 0.5, 0.75, 1.0] and all(r["images"] == 6 for r in rows)
    assert "official checkpoint" in text


def test_help_explains_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in ("train", "eval"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = capsys.readouterr().out
        assert "examples:" in text and "--checkpoint" in text if cmd == "eval" else "--resume" in text


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(fmnist: Path, tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_recipe(fmnist, train={"epochs": 3, "log_interval": 1}, data={"batch_size": 8, "val_size": 16}),
    )
    env = {**os.environ, "SLIMMABLE_CACHE_DIR": str(tmp_path / "cache"), "CI": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "slimmable.cli.main", "train", "--recipe", str(recipe), "--device", "cpu",
           "--no-tensorboard", "--latency-runs", "0"]  # fmt: skip
    full = subprocess.run([*cmd, "--out", "full"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]

    # kill -9 during epoch 2: the last checkpoint is the end of epoch 1
    proc = subprocess.Popen(
        [*cmd, "--out", "killed"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    deadline = time.monotonic() + 240
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("epoch 2 step 3/"):
            proc.send_signal(signal.SIGKILL)
            break
        assert time.monotonic() < deadline, "the run never reached epoch 2"
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    ck = load_checkpoint(tmp_path / "killed" / "last.pt")
    assert (ck["epoch"], ck["batch_in_epoch"]) == (1, 0)  # at most one epoch is repeated

    resumed = subprocess.run(
        [*cmd, "--resume", str(tmp_path / "killed" / "last.pt")], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr and "at epoch 2, batch 0" in resumed.stderr
    a = json.loads((tmp_path / "full" / "final_metrics.json").read_text())["widths"]
    b = json.loads((tmp_path / "killed" / "final_metrics.json").read_text())["widths"]
    assert a == b
