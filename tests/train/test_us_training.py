"""US-Net training end to end: sandwich + in-place distillation, BN calibration before the final checkpoints.

(That the distillation target is detached is tested in test_algorithm1.py.)
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from fake_data import tiny_recipe, write_fashion_mnist

from slimmable.checkpoint import model_checkpoint
from slimmable.config import RunConfig
from slimmable.data import create_datasets, create_loader
from slimmable.nn import USBatchNorm2d, slim_modules
from slimmable.train import (
    build_model_from_checkpoint,
    calibrate_bn,
    evaluate,
    load_checkpoint,
    save_checkpoint,
    train_from_config,
)
from slimmable.train import run as run_module

STAT_WIDTHS = [0.25, 0.375, 0.5]


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fashion_mnist(tmp_path_factory.mktemp("data") / "fm", n_train=96, n_test=48)


def _us_cfg(fmnist: Path) -> RunConfig:
    model = {"name": "us_mobilenet_v1", "widths": None, "width_range": [0.25, 0.5], "stat_widths": STAT_WIDTHS}
    train = {"width_sampler": "sandwich", "num_sampled_widths": 4, "inplace_distill": True, "calib_batches": 2}
    return RunConfig.from_dict(tiny_recipe(fmnist, model=model, train=train))


def _train(cfg: RunConfig, out: Path, **kw: object) -> run_module.TrainResult:
    return train_from_config(
        cfg, out, device="cpu", latency_runs=0, tensorboard=False, cache_dir=out.parent / "c", **kw
    )


@pytest.fixture(scope="module")
def us_run(fmnist: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, Path, run_module.TrainResult]:
    cfg = _us_cfg(fmnist)
    out = tmp_path_factory.mktemp("us") / "run"
    return cfg, out, _train(cfg, out)


def _calib_loader(cfg: RunConfig) -> torch.utils.data.DataLoader:
    """The batches train_from_config calibrates on: training split, no augmentation, fixed seed order."""
    dc = cfg.data
    data = create_datasets(dc.dataset, dc.root, image_size=dc.image_size, augment=dc.augment,
                           crop_padding=dc.crop_padding, val_size=dc.val_size, split_seed=dc.split_seed,
                           download=False)  # fmt: skip
    return create_loader(data.train.view(augment="none"), dc.batch_size, train=True, seed=cfg.train.seed)


def _us_bn(model: torch.nn.Module) -> list[USBatchNorm2d]:
    return [m for _, m in slim_modules(model) if isinstance(m, USBatchNorm2d)]


def test_sandwich_distillation_run_trains_and_reports_every_stat_width(us_run) -> None:
    _, out, result = us_run
    assert not result.interrupted and result.epochs_done == 2
    history = json.loads((out / "history.json").read_text())
    for h in history:  # the random widths are pooled; validation at the widths trained every step (range ends)
        assert [t["width"] for t in h["train"]] == [0.5, "random", 0.25]
        assert all(torch.isfinite(torch.tensor(t["loss"])) for t in h["train"])
        assert [v["width"] for v in h["val"]] == [0.25, 0.5]
    # the final report covers every stat width (calibrated), with MACs growing with the width
    assert [r["width"] for r in result.report] == STAT_WIDTHS
    assert result.report[0]["macs"] < result.report[1]["macs"] < result.report[2]["macs"]
    last = load_checkpoint(out / "last.pt")
    assert last["step"] == 10 and list(last["model_kwargs"]["stat_widths"]) == STAT_WIDTHS
    assert last["widths"] == STAT_WIDTHS and last["config"]["train"]["width_sampler"] == "sandwich"
    # it learns: the epoch-mean training loss of every key falls from epoch 1 to epoch 2 (a seeded run)
    first, second = ({t["width"]: t["loss"] for t in h["train"]} for h in history)
    assert all(second[k] < first[k] for k in first), (first, second)


def test_checkpoints_carry_calibrated_statistics_for_every_stat_width(us_run) -> None:
    cfg, out, result = us_run
    for name in ("best.pt", "last.pt"):
        model = build_model_from_checkpoint(out / name)
        for bn in _us_bn(model):
            assert bn.stat_widths == tuple(STAT_WIDTHS)
            # cumulative average over calib_batches=2 batches (momentum None counts batches from 0)
            assert all(int(slot.num_batches_tracked) == 2 for slot in bn.bn), name
            mid = bn.bn[1]  # 0.375: never trained exactly, so its statistics come from calibration only
            assert not torch.allclose(mid.running_var, torch.ones_like(mid.running_var))
        # ... exactly the statistics calibrate_bn computes on the training batches without augmentation
        again = build_model_from_checkpoint(out / name)
        calibrate_bn(again, _calib_loader(cfg), STAT_WIDTHS, num_batches=cfg.train.calib_batches)
        for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
            assert torch.equal(a, b), (name, k)
    # the final report is best.pt evaluated as loaded, without recalibration
    model = build_model_from_checkpoint(out / "best.pt")
    data = create_datasets("fashion_mnist", cfg.data.root, image_size=16, download=False, load_train=False)
    metrics = evaluate(model, create_loader(data.test, 16, train=False), STAT_WIDTHS)
    assert [m.top1 for m in metrics] == [r["top1"] for r in result.report]


def test_checkpoint_reloads_identically_at_stat_and_newly_calibrated_widths(us_run, tmp_path: Path) -> None:
    cfg, out, _ = us_run
    ckpt = load_checkpoint(out / "best.pt")
    model = build_model_from_checkpoint(ckpt)
    calibrate_bn(model, _calib_loader(cfg), [0.3], num_batches=2)
    assert model.widths == (0.25, 0.3, 0.375, 0.5)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        before = {w: model.set_width(w)(x) for w in (0.375, 0.3)}
    save_checkpoint(tmp_path / "c.pt", {**ckpt, **model_checkpoint(model)})  # records the new statistics slot
    again = build_model_from_checkpoint(tmp_path / "c.pt")
    with torch.no_grad():
        for w, y in before.items():
            torch.testing.assert_close(again.set_width(w)(x), y, rtol=0, atol=0)
    with torch.no_grad(), pytest.raises(RuntimeError, match="no statistics for width 0.45"):
        again.set_width(0.45)(x)  # eval mode refuses a width without statistics


def test_sigterm_mid_epoch_then_resume_is_exact(us_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The random widths depend on (seed, step) only, so a resumed sandwich run ends as the uninterrupted one."""
    cfg, full_dir, full = us_run
    seed_epoch = run_module._seed_epoch

    def seed_and_signal(seed: int, epoch: int, rank: int) -> None:
        seed_epoch(seed, epoch, rank)
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(run_module, "_seed_epoch", seed_and_signal)
    stopped = _train(cfg, tmp_path / "r")
    assert stopped.interrupted and load_checkpoint(tmp_path / "r" / "last.pt")["step"] == 6
    monkeypatch.setattr(run_module, "_seed_epoch", seed_epoch)
    resumed = _train(cfg, tmp_path / "r", resume=tmp_path / "r" / "last.pt")
    assert resumed.report == full.report
    a, b = (load_checkpoint(d / "last.pt")["model"] for d in (full_dir, tmp_path / "r"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_us_setting_errors(fmnist: Path, tmp_path: Path) -> None:
    snet = RunConfig.from_dict(tiny_recipe(fmnist, train={"width_sampler": "sandwich"}))
    with pytest.raises(ValueError, match="sandwich.*fixed switches.*us_mobilenet_v1.*width_sampler: all"):
        _train(snet, tmp_path / "a")
    widths_on_us = RunConfig.from_dict(tiny_recipe(fmnist, model={"name": "us_mobilenet_v1"}))
    with pytest.raises(ValueError, match="us_mobilenet_v1 runs at any width in its width_range and takes no widths"):
        _train(widths_on_us, tmp_path / "b")


def test_per_layer_random_widths_train_and_report_the_pooled_random_loss(fmnist: Path, tmp_path: Path) -> None:
    base = _us_cfg(fmnist).to_dict()
    base["train"].update(per_layer_widths=True, epochs=1)
    result = _train(RunConfig.from_dict(base), tmp_path / "pl")
    history = json.loads((tmp_path / "pl" / "history.json").read_text())
    train_keys = {row["width"] for row in history[-1]["train"]}
    assert train_keys == {0.5, "random", 0.25}  # the per-layer draws are pooled as "random"
    assert {r["width"] for r in result.report} == set(STAT_WIDTHS)  # calibrated and evaluated as usual
