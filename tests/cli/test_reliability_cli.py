"""Issue 16: no run overwritten, divergence caught, one-line errors for bad folders and full disks (tiny runs)."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fake_data import tiny_recipe, write_malicious_cifar, write_recipe

from slimmable.checkpoint import model_checkpoint, save_checkpoint
from slimmable.cli._common import describe_os_error
from slimmable.cli.main import main
from slimmable.export import export_torchscript, save_dense
from slimmable.models import create_model
from slimmable.train import load_checkpoint

_FAST = ["--no-tensorboard", "--latency-runs", "0"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _strict_json(path: Path) -> object:
    def refuse(const: str) -> None:
        raise AssertionError(f"{path} holds {const}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("slimmable ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_another_runs_folder_is_never_overwritten(
    fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(fmnist, train={"epochs": 1}))
    a, b = tmp_path / "A", tmp_path / "B"
    assert main(["train", "--recipe", str(recipe), "--out", str(a), *_FAST]) == 0
    assert main(["train", "--recipe", str(recipe), "--out", str(b), "--set", "train.seed=9", *_FAST]) == 0
    capsys.readouterr()
    before = _snapshot(b)

    # --resume A/last.pt --out B: refused before anything is written (A finished or not)
    for extra in ([], ["--set", "train.epochs=2"]):
        assert main(["train", "--resume", str(a / "last.pt"), "--out", str(b), *extra, *_FAST]) == 2
        line = _one_line_error(capsys.readouterr().err)
        assert "already holds another run's files (last.pt, best.pt, config.yaml, history.json" in line
        assert f"--resume {a / 'last.pt'} without --out" in line and "--out a new folder" in line
        assert _snapshot(b) == before

    # a folder with best.pt but no last.pt
    c = tmp_path / "C"
    c.mkdir()
    (c / "best.pt").write_bytes(before["best.pt"])
    assert main(["train", "--recipe", str(recipe), "--out", str(c), *_FAST]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "already holds a run (best.pt)" in line and "--out a new folder" in line
    assert _snapshot(c) == {"best.pt": before["best.pt"]}

    # --out pointing at a file
    assert main(["train", "--recipe", str(recipe), "--out", str(c / "best.pt"), *_FAST]) == 2
    assert "is a file, not a folder" in _one_line_error(capsys.readouterr().err)

    # resuming in place is allowed, with or without --out, and clears the temporaries of a killed save
    stale = [b / f".last.pt.{_dead_pid()}.tmp", b / "history.json.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    alive = b / ".best.pt.1.tmp"  # process 1 runs: a save in progress is left alone
    alive.write_bytes(b"in progress")
    rc = main(["train", "--resume", str(b / "last.pt"), "--out", str(b), "--set", "train.epochs=2", *_FAST])
    assert rc == 0, capsys.readouterr().err
    assert load_checkpoint(b / "last.pt")["epoch"] == 2
    assert not any(p.exists() for p in stale) and alive.exists()


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(
    fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # epoch 1 trains normally, then the learning rate jumps x1e8 and epoch 2 diverges
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_recipe(fmnist, optim={"schedule": "multistep", "milestones": [1], "gamma": 1e8}),
    )
    out = tmp_path / "run"
    assert main(["train", "--recipe", str(recipe), "--out", str(out), *_FAST]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "training diverged: non-finite loss at epoch 2, batch" in line and "width 0.25: nan" in line.lower()
    assert f"{out / 'last.pt'} holds the last good state" in line and "train.nonfinite=skip" in line
    for name in ("last.pt", "best.pt"):
        ck = load_checkpoint(out / name)
        assert ck["epoch"] == 1 and all(torch.isfinite(t).all() for t in ck["model"].values()), name
    assert not (out / "final_metrics.json").exists()
    assert len(_strict_json(out / "history.json")) == 1

    # opt-in: skip such steps, count them, and still write valid JSON
    rc = main(["train", "--recipe", str(recipe), "--out", str(tmp_path / "skip"), "--set", "train.nonfinite=skip",
               *_FAST])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    history = _strict_json(tmp_path / "skip" / "history.json")
    assert history[0]["skipped_steps"] == 0 and history[1]["skipped_steps"] > 0
    _strict_json(tmp_path / "skip" / "final_metrics.json")


def test_non_finite_hyper_parameters_are_refused(fmnist: Path, tmp_path: Path, capsys) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(fmnist))
    for value in (".inf", ".nan", "-.inf", "inf"):
        assert main(["train", "--recipe", str(recipe), "--out", str(tmp_path / "x"), "--set", f"optim.lr={value}"]) == 2
        assert "optim.lr must be a finite number" in _one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_unwritable_out_and_full_disk_are_one_line(
    fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(fmnist, train={"epochs": 1}))
    # a folder that cannot be written: read-only for a normal user; /sys for root (chmod does not stop root)
    if os.geteuid() == 0:
        target = Path("/sys/slimmable-test-run")
        try:
            target.mkdir()
        except OSError:
            pass
        else:
            target.rmdir()
            pytest.skip("/sys is writable here")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = ro / "run"
    assert main(["train", "--recipe", str(recipe), "--out", str(target), *_FAST]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert str(target) in line and ("permission" in line.lower() or "not permitted" in line or "read-only" in line)

    # a full disk while saving: one line naming last.pt, and the previous last.pt is intact
    out = tmp_path / "run"
    assert main(["train", "--recipe", str(recipe), "--out", str(out), *_FAST]) == 0
    capsys.readouterr()
    before = (out / "last.pt").read_bytes()

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    rc = main(["train", "--resume", str(out / "last.pt"), "--set", "train.epochs=2", *_FAST])
    assert rc == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"{out / 'last.pt'}: No space left on device" in line and "intact" in line and "free disk space" in line
    assert (out / "last.pt").read_bytes() == before
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert math.isfinite(load_checkpoint(out / "last.pt")["best"]["top1_mean"])


def test_checkpoint_pointing_at_a_malicious_cifar_folder_runs_no_code(
    fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(fmnist, train={"epochs": 1}))
    out = tmp_path / "run"
    assert main(["train", "--recipe", str(recipe), "--out", str(out), *_FAST]) == 0
    marker = tmp_path / "pwned"
    evil = write_malicious_cifar(tmp_path / "evil", marker)
    # a checkpoint that passes weights_only, whose saved recipe points at the folder
    ck = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    ck["config"]["data"].update(dataset="cifar10", root=str(evil), image_size=32, val_size=0)
    torch.save(ck, tmp_path / "innocent.pt")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "innocent.pt"), "--latency-runs", "0"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "refers to posix.mkdir" in line and "could run code" in line
    assert not marker.exists()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 3 MB file system (tmpfs), so that writes fail as on a full disk; skipped unless root can mount."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_real_full_disk_is_one_line_and_keeps_the_previous_file(
    small_fs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # torch.save(obj, path) raises RuntimeError("[enforce fail at inline_container.cc] unexpected pos") on a full
    # disk; every save path must give the same OSError as a monkeypatched ENOSPC: it names the file
    def checkpoint(numel: int) -> dict:
        return {"format_version": 1, "model": {"w": torch.ones(numel)}, "model_name": "m", "model_kwargs": {},
                "widths": [1.0]}  # fmt: skip

    path = small_fs / "last.pt"
    save_checkpoint(path, checkpoint(1000))
    before = path.read_bytes()
    with pytest.raises(OSError) as info:
        save_checkpoint(path, checkpoint(1_000_000))  # 4 MB
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    line = describe_os_error(info.value)
    assert f"{path}: No space left on device" in line and "intact" in line and "free disk space" in line
    assert path.read_bytes() == before and sorted(p.name for p in small_fs.iterdir()) == ["last.pt"]

    # export --format pt and the TorchScript export go through the same path
    big = create_model("slim_mobilenet_v1", num_classes=10, small_input=True, widths=(0.25, 1.0))  # 13 MB
    for save in (save_dense, export_torchscript):
        with pytest.raises(OSError) as info:
            save(big, small_fs / "dense.pt", width=1.0, **({"input_size": 32} if save is export_torchscript else {}))
        assert info.value.errno == errno.ENOSPC and info.value.filename == str(small_fs / "dense.pt")
    assert sorted(p.name for p in small_fs.iterdir()) == ["last.pt"]

    # the CLI: one line, no traceback (convert --out)
    assert main(["convert", "torchvision/resnet18", "--num-classes", "10", "--input-size", "32",
                 "--out", str(small_fs / "conv.pt")]) == 2  # fmt: skip
    line = _one_line_error(capsys.readouterr().err)
    assert f"{small_fs / 'conv.pt'}: No space left on device" in line and "free disk space" in line
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["convert", "torchvision/resnet18", "--input-size", "0"], "argument --input-size: 0 must be >= 1"),
        (["convert", "torchvision/resnet18", "--input-size", "-5"], "argument --input-size: -5 must be >= 1"),
        (["profile", "slim_maskrcnn_resnet18_fpn", "--min-size", "0"], "argument --min-size: 0 must be >= 1"),
        (["profile", "slim_mobilenet_v1", "--runs", "-1"], "argument --runs: -1 must be >= 0"),
        (
            ["export", "--model", "slim_mobilenet_v1", "--input-size", "x"],
            "argument --input-size: 'x' is not an integer",
        ),
        (
            ["serve", "--model", "slim_mobilenet_v1", "--calibration-seconds", "inf"],
            "argument --calibration-seconds: inf must be a finite number > 0",
        ),
    ],
)
def test_numeric_arguments_are_range_checked_by_the_parser(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"slimmable {argv[0]}: error: {message}" in err and "Traceback" not in err


def test_time_budget_is_bounded_before_anything_runs(fmnist: Path, tmp_path: Path, capsys) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(fmnist))
    out = tmp_path / "x"
    assert main(["train", "--recipe", str(recipe), "--out", str(out), "--set", "train.time_budget_min=1e308"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "train.time_budget_min: must be > 0 and at most 10080 minutes" in line and not out.exists()


def test_convert_of_a_registered_model_says_it_is_slimmable_already(capsys) -> None:
    assert main(["convert", "slim_resnet18"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "slim_resnet18 is already slimmable" in line and "torchvision/<arch>" in line
    assert main(["convert", "resnet18"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "convert takes a torchvision model, torchvision/<arch>" in line and "timm/<arch>" in line


def test_one_run_at_a_time_in_a_folder(fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(fmnist, train={"epochs": 1}))
    out = tmp_path / "run"
    out.mkdir()
    # another process holds the folder's lock, as a running `slimmable train` does
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from slimmable.train.outputs import lock_output_dir; "
         f"lock = lock_output_dir({str(out)!r}); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["train", "--recipe", str(recipe), "--out", str(out), *_FAST]) == 2
        line = _one_line_error(capsys.readouterr().err)
        assert f"--out {out} is in use by another slimmable train (process {holder.pid})" in line
        assert sorted(p.name for p in out.iterdir()) == [".slimmable.lock"]
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the dead process's lock; the lock file is not another run's file
    assert main(["train", "--recipe", str(recipe), "--out", str(out), *_FAST]) == 0, capsys.readouterr().err
    assert (out / "last.pt").is_file() and (out / ".slimmable.lock").read_text().strip() == str(os.getpid())


def test_a_run_that_diverged_before_its_first_save_can_be_rerun_in_its_folder(
    fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(fmnist, train={"epochs": 1}))
    out = tmp_path / "run"
    assert (
        main(["train", "--recipe", str(recipe), "--out", str(out), "--set", "optim.lr=1e12", "--latency-runs", "0"])
        == 2
    )
    assert "training diverged" in _one_line_error(capsys.readouterr().err)
    assert not (out / "last.pt").exists() and (out / "config.yaml").exists() and (out / "tb").is_dir()
    assert main(["train", "--recipe", str(recipe), "--out", str(out), *_FAST]) == 0, capsys.readouterr().err
    assert load_checkpoint(out / "last.pt")["epoch"] == 1


def test_eval_of_a_checkpoint_without_a_recipe_says_which_dataset(
    fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    model = create_model("slim_mobilenet_v1", num_classes=10, small_input=True, in_chans=1, widths=(0.25, 1.0))
    ckpt = save_checkpoint(tmp_path / "converted.pt", model_checkpoint(model))  # no "config", as convert --out
    rc = main(["eval", "--checkpoint", str(ckpt), "--data", str(fmnist), "--latency-runs", "0", "--batch-size", "16"])
    assert rc == 0, capsys.readouterr().err
    assert f"{ckpt} holds no saved recipe, so it is evaluated on fashion_mnist, the default dataset" in caplog.text
