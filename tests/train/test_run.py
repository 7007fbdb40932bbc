"""Whole runs on small fake Fashion-MNIST: outputs, best-checkpoint tracking, exact resume, setting errors."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from fake_data import sigterm_during_epoch, tiny_recipe, write_fashion_mnist

from slimmable.config import RunConfig, load_recipe
from slimmable.data import create_datasets, create_loader
from slimmable.train import build_model_from_checkpoint, evaluate, load_checkpoint, train_from_config
from slimmable.train import run as run_module


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fashion_mnist(tmp_path_factory.mktemp("data") / "fm", n_train=96, n_test=48)


def _cfg(fmnist: Path, **overrides: dict) -> RunConfig:
    return RunConfig.from_dict(tiny_recipe(fmnist, **overrides))


def _train(cfg: RunConfig, out: Path, **kw) -> run_module.TrainResult:
    kw.setdefault("tensorboard", False)
    return train_from_config(cfg, out, device="cpu", latency_runs=0, cache_dir=out.parent / "cache", **kw)


def test_run_writes_checkpoints_metrics_and_config(fmnist: Path, tmp_path: Path) -> None:
    cfg = _cfg(fmnist)
    out = tmp_path / "run"
    result = _train(cfg, out, tensorboard=True)
    assert not result.interrupted and result.epochs_done == 2 and result.selection_split == "val"
    assert load_recipe(out / "config.yaml") == cfg
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    best = max(history, key=lambda h: h["val_top1_mean"])
    assert result.best_epoch == best["epoch"] and result.best_top1_mean == pytest.approx(best["val_top1_mean"])
    for h in history:
        assert [t["width"] for t in h["train"]] == [0.25, 0.125] and [v["width"] for v in h["val"]] == [0.125, 0.25]
    last, best_ck = load_checkpoint(out / "last.pt"), load_checkpoint(out / "best.pt")
    assert (last["epoch"], last["batch_in_epoch"], last["step"], last["steps_per_epoch"]) == (2, 0, 10, 5)
    assert best_ck["epoch"] == result.best_epoch and last["model_kwargs"]["in_chans"] == 1
    assert last["preprocess"]["image_size"] == 16 and last["config"] == cfg.to_dict()
    assert (out / "accuracy_vs_macs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "final_metrics.json").read_text())
    assert report["meta"]["split"] == "test" and report["meta"]["epoch"] == result.best_epoch
    rows = report["widths"]
    assert [r["width"] for r in rows] == [0.125, 0.25] and rows == result.report
    assert rows[0]["macs"] < rows[1]["macs"] and rows[0]["params"] < rows[1]["params"] and rows[0]["images"] == 48
    header = (out / "final_metrics.csv").read_text().splitlines()[0]
    assert header == "width,top1,top5,loss,images,macs,params,latency_ms"
    assert list((out / "tb").glob("events.out.tfevents.*"))
    # the report is the best checkpoint evaluated on the test split
    model = build_model_from_checkpoint(out / "best.pt")
    splits = create_datasets("fashion_mnist", fmnist, image_size=16, download=False, cache_dir=tmp_path / "cache")
    metrics = evaluate(model, create_loader(splits.test, 16, train=False), [0.125, 0.25])
    assert [m.top1 for m in metrics] == [r["top1"] for r in rows]


def test_training_learns(fmnist: Path, tmp_path: Path) -> None:
    cfg = _cfg(fmnist, train={"epochs": 4}, optim={"lr": 0.05})
    result = _train(cfg, tmp_path / "run")
    assert all(r["top1"] > 40 for r in result.report), result.report  # 10 classes: chance is 10 %


def test_sigterm_mid_epoch_then_resume_is_exact(fmnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(fmnist, train={"epochs": 3}, model={"drop_rate": 0.2})
    full = _train(cfg, tmp_path / "full")

    with sigterm_during_epoch(monkeypatch, 1):  # SIGTERM arrives during epoch 2: the run stops after its first step
        stopped = _train(cfg, tmp_path / "resumed")
    assert stopped.interrupted and stopped.epochs_done == 1
    ck = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert (ck["epoch"], ck["batch_in_epoch"], ck["step"]) == (1, 1, 6)
    resumed = _train(cfg, tmp_path / "resumed", resume=tmp_path / "resumed" / "last.pt")
    assert not resumed.interrupted and resumed.report == full.report
    a = load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    history = json.loads((tmp_path / "resumed" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]


def test_setting_errors(fmnist: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"has 10 classes \(labels 0..9\) but model.num_classes is 5"):
        _train(_cfg(fmnist, model={"num_classes": 5}), tmp_path / "a")
    with pytest.raises(ValueError, match="model.in_chans is 3 but the images"):
        _train(_cfg(fmnist, model={"in_chans": 3}), tmp_path / "b")
    cfg = _cfg(fmnist, train={"epochs": 1})
    _train(cfg, tmp_path / "c")
    other = _cfg(fmnist, model={"widths": [0.125, 0.375]})
    with pytest.raises(ValueError, match="--resume .*the checkpoint is slim_resnet18"):
        _train(other, tmp_path / "c", resume=tmp_path / "c" / "last.pt")
    with pytest.raises(ValueError, match="train.amp=fp16 needs a CUDA device"):
        _train(_cfg(fmnist, train={"amp": "fp16"}), tmp_path / "d")


def test_recipe_file_of_the_fixture_is_valid(fmnist: Path, tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(fmnist)))
    assert load_recipe(path) == _cfg(fmnist)


def test_time_budget_sizes_the_epochs_and_a_resume_keeps_the_plan(fmnist: Path, tmp_path: Path) -> None:
    cfg = _cfg(fmnist, train={"epochs": 3, "time_budget_min": 1e-4})  # not even one epoch fits: 1 epoch
    out = tmp_path / "run"
    result = _train(cfg, out)
    assert result.plan is not None and result.plan.epochs == 1 == result.epochs == result.epochs_done
    assert result.plan.max_epochs == 3 and result.plan.seconds_per_step > 0 and result.plan.steps_per_epoch == 5
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [1]
    hw = json.loads((out / "hardware.json").read_text())
    assert hw["plan"] == result.plan.to_dict() and hw["numerics"]["amp"] == "off"
    assert hw["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert load_checkpoint(out / "last.pt")["plan"] == result.plan.to_dict()
    # a resumed run keeps the plan it started with, whatever the budget says now
    again = _train(_cfg(fmnist, train={"epochs": 3, "time_budget_min": 1e4}), out, resume=out / "last.pt")
    assert again.epochs == 1 and again.plan == result.plan
    # a generous budget is capped by train.epochs
    roomy = _train(_cfg(fmnist, train={"epochs": 2, "time_budget_min": 1e4}), tmp_path / "roomy")
    assert roomy.plan is not None and roomy.plan.epochs == 2 == roomy.epochs_done


def test_progress_lines_are_timed_with_rate_and_eta(
    fmnist: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _cfg(fmnist, train={"epochs": 2, "log_seconds": 1e6, "log_interval": 1})
    with caplog.at_level("INFO", logger="slimmable.train.engine"):
        _train(cfg, tmp_path / "run")
    lines = [r.getMessage() for r in caplog.records if "steps/s" in r.getMessage()]
    # log_interval=1 no longer prints a line per step: one line after each epoch's first step, then every 1e6 s
    assert len(lines) == 2, lines
    assert lines[0].startswith("epoch 1 step 1/5") and ", ETA " in lines[0]
    assert lines[1].startswith("epoch 2 step 1/5")


def test_auto_numerics_are_decided_recorded_and_kept_on_resume(fmnist: Path, tmp_path: Path) -> None:
    from slimmable.hardware import cpu_native_bf16

    cfg = _cfg(fmnist, train={"epochs": 1, "amp": "auto", "channels_last": "auto"})
    out = tmp_path / "run"
    result = _train(cfg, out)
    n = result.numerics
    assert n is not None and n.requested == {"amp": "auto", "channels_last": "auto"}
    if cpu_native_bf16()[0]:  # both precisions and both formats were timed on the real step
        assert sorted(n.probe) == ["bf16", "bf16+channels_last", "fp32", "fp32+channels_last"]
    else:
        assert (n.amp, n.channels_last, n.probe) == ("off", False, {})
    assert json.loads((out / "hardware.json").read_text())["numerics"] == n.to_dict()
    again = _train(
        _cfg(fmnist, train={"epochs": 2, "amp": "auto", "channels_last": "auto"}), out, resume=out / "last.pt"
    )
    assert (again.numerics.amp, again.numerics.channels_last) == (n.amp, n.channels_last)
    assert again.numerics.reasons["amp"].startswith("kept from the checkpoint")


def test_a_resume_with_other_numerics_says_so_and_keeps_their_history(
    fmnist: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    _train(_cfg(fmnist, train={"epochs": 1, "amp": "bf16"}), out)
    with caplog.at_level("WARNING", logger="slimmable.train.run"):
        _train(_cfg(fmnist, train={"epochs": 2, "amp": "off"}), out, resume=out / "last.pt")
    assert any("resuming a run trained with bf16 in fp32" in r.getMessage() and "not exactly" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    history = [{"label": "bf16", "from_step": 0}, {"label": "fp32", "from_step": 5}]
    assert json.loads((out / "hardware.json").read_text())["numerics_history"] == history
    assert load_checkpoint(out / "last.pt")["numerics_history"] == history


def test_time_budget_ends_in_a_partial_epoch_with_the_schedule(
    fmnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from slimmable.train.plan import plan_epochs

    # 1 s per step, 5 steps + 1 validation batch (~0.33 s) per epoch: 8.53 s fit 7 steps and 2 validations (8 steps
    # would overrun: 8.67 s)
    monkeypatch.setattr(run_module, "measure_step_seconds", lambda step, **kw: 1.0)
    monkeypatch.setattr(run_module, "replan", lambda *a, **kw: None)  # the start-up plan only (steps take ms here)
    cfg = _cfg(fmnist, train={"epochs": 4, "time_budget_min": 1.6 * (5 + 1 / 3) / 60}, optim={"schedule": "cosine"})
    out = tmp_path / "run"
    result = _train(cfg, out)
    plan = result.plan
    assert plan is not None and (plan.total_steps, plan.epochs, plan.seconds_per_step) == (7, 2, 1.0)
    assert plan == plan_epochs(cfg.train.time_budget_min, 4, 5, 1.0, 1, 2, 2)
    last = load_checkpoint(out / "last.pt")
    assert (last["epoch"], last["step"]) == (2, 7) and [h["epoch"] for h in result_history(out)] == [1, 2]
    # the cosine follows the time spent (real here: far less than the budget) or the steps (7 of at most 20)
    assert result_history(out)[-1]["lr"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 7 / 20)), rel=1e-3)
    assert not result.interrupted and result.epochs_done == 2


def result_history(out: Path) -> list[dict]:
    return json.loads((out / "history.json").read_text())


def test_replan_follows_the_machine_both_ways() -> None:
    from slimmable.train.plan import EpochPlan, replan

    plan = EpochPlan(epochs=10, total_steps=100, max_epochs=10, budget_minutes=1.0, seconds_per_step=0.1,
                     steps_per_epoch=10, eval_seconds=0.0, estimated_minutes=0.17)  # fmt: skip
    kw = {"steps_done": 10, "validations_done": 1, "spent_seconds": 30.0}
    shorter = replan(plan, seconds_per_step=3.0, **kw)  # 3 s per step now: 10 more steps fit the 30 s left
    assert shorter is not None and (shorter.total_steps, shorter.epochs, shorter.first_total_steps) == (20, 2, 100)
    assert shorter.seconds_per_step == 3.0 and shorter.estimated_minutes == pytest.approx(1.0)
    # quiet again: it grows back, up to train.epochs
    assert replan(shorter, seconds_per_step=0.3, **kw).total_steps == 100
    longer = replan(shorter, seconds_per_step=1.0, **kw)  # 30 more steps fit
    assert longer is not None and (longer.total_steps, longer.epochs, longer.first_total_steps) == (40, 4, 100)
    assert replan(longer, seconds_per_step=1.0, **kw) is None  # on plan: unchanged
    assert replan(longer, seconds_per_step=0.995, **kw) is None  # within 1%: no flicker
    # validations count: 4 s each, 3 epochs still to end -> 12 s fewer for steps
    assert replan(longer, seconds_per_step=1.0, eval_seconds=4.0, **kw).total_steps == 30
    # a spent budget ends the run where it is, never before one epoch
    assert replan(longer, seconds_per_step=1.0, steps_done=14, validations_done=1, spent_seconds=70).total_steps == 14
    assert replan(longer, seconds_per_step=1.0, steps_done=4, validations_done=0, spent_seconds=70).total_steps == 10
    # a validation not measured yet is estimated at the steps' speed: a busy probe overestimated both alike
    busy = EpochPlan(epochs=1, total_steps=10, max_epochs=10, budget_minutes=1.0, seconds_per_step=2.0,
                     steps_per_epoch=10, eval_seconds=20.0, estimated_minutes=1.0)  # fmt: skip
    quiet = replan(busy, steps_done=5, validations_done=0, spent_seconds=10.0, seconds_per_step=0.2)
    assert quiet is not None and quiet.eval_seconds == pytest.approx(2.0)


def test_the_thread_governor_takes_the_faster_thread_count_and_comes_back() -> None:
    """Fake steps: with both threads a step takes 2.0 s while another process holds a core (one thread: 0.17 s);
    once the machine is quiet, 0.11 s with two threads. The governor moves to one thread, and back to two."""
    from slimmable.train.clock import StepClock, ThreadGovernor

    now = [0.0]
    threads = [2]
    gov = ThreadGovernor(2, clock=lambda: now[0], set_threads=lambda n: threads.__setitem__(0, n), retry_seconds=5.0)
    clock = StepClock(clock=lambda: now[0])
    clock.start()
    used = []
    for step in range(1, 1000):
        busy = now[0] < 60.0
        now[0] += (2.0 if busy else 0.11) if threads[0] == 2 else 0.17
        used.append((busy, threads[0]))
        clock.tick()
        gov.update(step, clock)
    assert [(c[1], c[2]) for c in gov.changes] == [(2, 1), (1, 2)]
    busy_steps = [t for b, t in used if b]
    assert busy_steps.count(1) > 0.8 * len(busy_steps)  # most busy steps ran on one thread
    assert used[-1] == (False, 2)  # quiet again: both threads
    # on a quiet machine the trials back off: few steps are spent on the slower setting
    now[0], threads[0] = 0.0, 2
    quiet = ThreadGovernor(2, clock=lambda: now[0], set_threads=lambda n: threads.__setitem__(0, n))
    clock = StepClock(clock=lambda: now[0])
    clock.start()
    on_one = 0
    for step in range(1, 5000):  # 9 minutes of 0.11-s steps
        now[0] += 0.11 if threads[0] == 2 else 0.17
        on_one += threads[0] == 1
        clock.tick()
        quiet.update(step, clock)
    assert not quiet.changes and on_one < 0.02 * 5000
    quiet.restore()
    assert threads[0] == 2


def test_a_run_slowed_at_the_start_regains_its_plan(
    fmnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A fake clock: the probe says 1 s per step; the first 8 steps take 4 s (another process shares the machine),
    then 1 s. The plan shrinks while the machine is busy and grows back once it is quiet, the learning rate follows
    the time (never jumps, stays high once quiet), and the budget holds."""
    from slimmable.train import engine

    fake = [0.0]
    lrs: list[float] = []
    real_step = engine.train_step

    def step(model, optimizer, *a, **kw):
        lrs.append(optimizer.param_groups[0]["lr"])
        fake[0] += 4.0 if len(lrs) <= 8 else 1.0
        return real_step(model, optimizer, *a, **kw)

    monkeypatch.setattr(run_module, "_clock", lambda: fake[0])
    monkeypatch.setattr(engine, "train_step", step)
    monkeypatch.setattr(run_module, "measure_step_seconds", lambda step, **kw: 1.0)
    monkeypatch.setattr(run_module, "MIN_STEPS_TO_REPLAN", 3)
    # 5 steps per epoch, 20 epochs at most; validation ~0.3 s (estimated); 60 s of budget: 56 steps at 1 s/step
    cfg = _cfg(fmnist, train={"epochs": 20, "time_budget_min": 1.0, "log_seconds": 2.0},
               optim={"schedule": "cosine", "warmup_epochs": 0.0})  # fmt: skip
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="slimmable.train.run"):
        result = _train(cfg, out)
    plan = result.plan
    assert plan is not None and plan.first_total_steps == 56
    replans = json.loads((out / "hardware.json").read_text())["replans"]
    shrunk = [r for r in replans if r["to"] < r["from"]]
    grown = [r for r in replans if r["to"] > r["from"]]
    assert shrunk and grown and shrunk[0]["step"] < grown[0]["step"]  # shortened while busy, then extended
    # the window's mean without its slowest step: all busy at first, mostly quiet at the last extension
    assert shrunk[0]["seconds_per_step"] == 4.0 and grown[-1]["seconds_per_step"] < 2.0
    # the 8 busy steps take 32 s; the 28 s left hold about 27 quiet steps. A plan that only shrank would have ended
    # near step 15 (cut to 4 s per step while busy); this one regains what the quiet steps allow
    steps = load_checkpoint(out / "last.pt")["step"]
    assert steps == plan.total_steps == len(lrs) and 8 + 25 <= steps <= 8 + 28
    assert 55 <= fake[0] <= 60 * 1.02  # the budget is used and holds
    assert any("behind the plan, shortened" in r.getMessage() for r in caplog.records)
    assert any("ahead of the plan, extended" in r.getMessage() and "mean of the last" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    # the learning rate: a continuous cosine in the time spent, never rising, no jump at a re-plan
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(lrs))
    assert max(a - b for a, b in itertools.pairwise(lrs)) < 0.2 * lrs[0]
    assert lrs[-1] < 0.02 * lrs[0]
    # the decay followed the time: after 32 of 60 s the rate is still about half its peak (a decay refitted to the
    # shortened plan had nearly reached 0 there and kept the quiet steps at a rate of 2% or less)
    assert lrs[8] > 0.35 * lrs[0]


def test_a_run_behind_its_plan_is_shortened_to_the_budget(
    fmnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a probe far too hopeful (1e-4 s per step): 4 epochs planned, but the budget is spent after the first
    monkeypatch.setattr(run_module, "measure_step_seconds", lambda step, **kw: 1e-4)
    cfg = _cfg(fmnist, train={"epochs": 4, "time_budget_min": 1e-3})  # 0.06 s
    result = _train(cfg, tmp_path / "run")
    assert result.plan is not None and result.plan.first_total_steps == 20
    assert (result.plan.total_steps, result.epochs, result.epochs_done) == (5, 1, 1)
    history = result_history(tmp_path / "run")
    assert len(history) == 1 and history[0]["replanned_total_steps"] == 5
    assert load_checkpoint(tmp_path / "run" / "last.pt")["plan"]["total_steps"] == 5
    assert json.loads((tmp_path / "run" / "hardware.json").read_text())["plan"]["total_steps"] == 5
    assert json.loads((tmp_path / "run" / "final_metrics.json").read_text())["widths"]
