"""Distillation from a teacher (train.teacher): the loss, once per step, with in-place distillation, whole runs
with the original model and with a checkpoint, resume, and the setting errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fake_data import sigterm_during_epoch, tiny_recipe, write_fashion_mnist

import slimmable
from slimmable.config import RunConfig
from slimmable.convert.zoo import create_original_model
from slimmable.train import (
    build_teacher,
    distillation_kl,
    load_checkpoint,
    soft_cross_entropy,
    train_from_config,
    train_step,
)
from slimmable.train import run as run_module
from slimmable.train.objectives import ClassificationObjective, DetectionObjective

ZOO = "torchvision/resnet18"


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fashion_mnist(tmp_path_factory.mktemp("data") / "fm", n_train=96, n_test=48)


@pytest.fixture(scope="module")
def original_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet18 state dict for 1-channel 16x16 images and 10 classes, unlike its random initialisation."""
    torch.manual_seed(5)
    model = create_original_model(ZOO, num_classes=10, in_chans=1, small_input=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("w") / "resnet18.pt"
    torch.save(model.state_dict(), path)
    return path


def _train(cfg: RunConfig, out: Path, **kw: object) -> run_module.TrainResult:
    return train_from_config(cfg, out, device="cpu", latency_runs=0, tensorboard=False, cache_dir=out.parent / "c",
                             **kw)  # fmt: skip


class _Counting(torch.nn.Module):
    """A teacher that counts its calls."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


def _student_and_teacher() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    student = slimmable.create_model("slim_mobilenet_v2", widths=(0.5, 0.75, 1.0), num_classes=5, small_input=True)
    teacher = slimmable.create_model("slim_resnet18", widths=(1.0,), num_classes=5, small_input=True)
    return student, teacher.eval().requires_grad_(False)


def test_distillation_kl_is_the_tempered_kl_times_t_squared() -> None:
    s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    t = torch.tensor([[1.0, 1.0, 0.0], [-2.0, 0.0, 4.0]])
    p, q = (F.softmax(v / 4.0, dim=1) for v in (s, t))
    expected = 16.0 * (q * (q.log() - p.log())).sum(dim=1).mean()
    torch.testing.assert_close(distillation_kl(s, t, 4.0), expected)
    assert float(distillation_kl(t, t, 2.0)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("inplace", [False, True])
def test_every_width_mixes_the_teacher_with_its_target_and_the_teacher_runs_once(inplace: bool) -> None:
    student, inner = _student_and_teacher()
    teacher = _Counting(inner)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 5, (4,), generator=g)
    ref = copy.deepcopy(student)
    objective = ClassificationObjective(inplace_distill=inplace)
    objective.set_teacher(teacher, temperature=3.0, weight=0.3)
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    widths = [1.0, 0.5, 0.75]
    res = train_step(student, opt, x, y, widths, objective=objective)
    assert teacher.calls == 1  # once per batch, not per width
    with torch.no_grad():
        t_logits = inner(x)
        logits = {w: ref.set_width(w)(x) for w in widths}
    widest = F.softmax(logits[1.0], dim=1)
    for j, w in enumerate(widths):
        kd = distillation_kl(logits[w], t_logits, 3.0)
        target = soft_cross_entropy(logits[w], widest) if inplace and j > 0 else F.cross_entropy(logits[w], y)
        torch.testing.assert_close(res.losses[j], 0.3 * kd + 0.7 * target)
    train_step(student, opt, x, y, widths, objective=objective)
    assert teacher.calls == 2
    # weight 1.0: the teacher alone
    objective.set_teacher(inner, temperature=3.0, weight=1.0)
    res = train_step(copy.deepcopy(ref), torch.optim.SGD(ref.parameters(), lr=0.0), x, y, [0.5], objective=objective)
    torch.testing.assert_close(res.losses[0], distillation_kl(logits[0.5], t_logits, 3.0))


def test_teacher_gets_no_gradient_and_a_class_mismatch_is_named() -> None:
    student, teacher = _student_and_teacher()
    objective = ClassificationObjective()
    objective.set_teacher(teacher, 4.0, 0.5)
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    train_step(student, torch.optim.SGD(student.parameters(), lr=0.1), x, y, [1.0, 0.5], objective=objective)
    assert all(p.grad is None for p in teacher.parameters())
    wrong = slimmable.create_model("slim_resnet18", widths=(1.0,), num_classes=7, small_input=True).eval()
    objective.set_teacher(wrong, 4.0, 0.5)
    with pytest.raises(ValueError, match=r"teacher answers \(2, 7\) logits but the model \(2, 5\)"):
        train_step(student, torch.optim.SGD(student.parameters(), lr=0.1), x, y, [1.0], objective=objective)
    with pytest.raises(ValueError, match="DetectionObjective has no distillation from a teacher"):
        DetectionObjective().set_teacher(teacher, 4.0, 0.5)


def test_original_teacher_is_the_unconverted_model_with_its_weights(original_weights: Path) -> None:
    kwargs = {"num_classes": 10, "in_chans": 1, "small_input": True, "widths": (0.5, 1.0), "weights": original_weights}
    teacher = build_teacher("original", ZOO, kwargs, "cpu")
    student = slimmable.create_model(ZOO, **kwargs).eval()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert not any(isinstance(m, slimmable.nn.SlimModule) for m in teacher.modules())
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(student(x), teacher(x), rtol=0, atol=0)
        assert not torch.allclose(teacher(x), create_original_model(ZOO, num_classes=10, in_chans=1,
                                                                     small_input=True)(x))  # fmt: skip
    with pytest.raises(ValueError, match="set model.weights to its state dict file"):
        build_teacher("original", ZOO, {**kwargs, "weights": None}, "cpu")
    with pytest.raises(ValueError, match="slim_resnet18 was never converted"):
        build_teacher("original", "slim_resnet18", {}, "cpu")
    with pytest.raises(FileNotFoundError, match="train.teacher: no checkpoint at nowhere.pt"):
        build_teacher("nowhere.pt", ZOO, kwargs, "cpu")


def _original_cfg(fmnist: Path, weights: Path, **train: object) -> RunConfig:
    model = {"name": ZOO, "widths": [0.5, 1.0], "small_input": True, "weights": str(weights)}
    train = {"epochs": 3, "teacher": "original", "teacher_temperature": 2.0, "teacher_weight": 0.7, **train}
    return RunConfig.from_dict(tiny_recipe(fmnist, model=model, train=train))


def test_run_with_the_original_as_teacher_resumes_exactly(
    fmnist: Path, original_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _original_cfg(fmnist, original_weights)
    full = _train(cfg, tmp_path / "full")
    with sigterm_during_epoch(monkeypatch, 1):
        stopped = _train(cfg, tmp_path / "resumed")
    assert stopped.interrupted
    ck = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert ck["config"]["train"]["teacher"] == "original"
    assert "weights" not in ck["model_kwargs"] and not any(k.startswith("teacher") for k in ck["model"])
    resumed = _train(cfg, tmp_path / "resumed", resume=tmp_path / "resumed" / "last.pt")
    assert resumed.report == full.report
    a, b = (load_checkpoint(d / "last.pt")["model"] for d in (tmp_path / "full", tmp_path / "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    h_full, h_res = (json.loads((d / "history.json").read_text()) for d in (tmp_path / "full", tmp_path / "resumed"))
    assert [h["train"] for h in h_full[2:]] == [h["train"] for h in h_res[2:]]  # the resumed epoch's losses
    # the teacher changes what is learned: the same run without it ends elsewhere
    plain = _train(_original_cfg(fmnist, original_weights, teacher=None), tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "history.json").read_text())[0]["train"] != h_full[0]["train"]
    assert plain.report != full.report


def test_us_training_with_a_checkpoint_teacher_and_inplace_distillation(fmnist: Path, tmp_path: Path) -> None:
    teacher_run = tmp_path / "teacher"
    _train(RunConfig.from_dict(tiny_recipe(fmnist, train={"epochs": 1})), teacher_run)
    model = {"name": "us_mobilenet_v1", "widths": None, "width_range": [0.25, 0.5], "stat_widths": [0.25, 0.5]}
    train = {"width_sampler": "sandwich", "num_sampled_widths": 3, "inplace_distill": True, "calib_batches": 1,
             "epochs": 1, "teacher": str(teacher_run / "last.pt")}  # fmt: skip
    cfg = RunConfig.from_dict(tiny_recipe(fmnist, model=model, train=train))
    result = _train(cfg, tmp_path / "us")
    history = json.loads((tmp_path / "us" / "history.json").read_text())
    assert [t["width"] for t in history[0]["train"]] == [0.5, "random", 0.25]
    assert all(torch.isfinite(torch.tensor(t["loss"])) for t in history[0]["train"])
    assert [r["width"] for r in result.report] == [0.25, 0.5]


def test_teacher_setting_errors(fmnist: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="train.teacher_weight: must be in \\(0, 1\\]"):
        RunConfig.from_dict(tiny_recipe(fmnist, train={"teacher": "original", "teacher_weight": 0.0}))
    with pytest.raises(ValueError, match="train.teacher_temperature: must be > 0"):
        RunConfig.from_dict(tiny_recipe(fmnist, train={"teacher_temperature": -1.0}))
    with pytest.raises(ValueError, match="model.weights: is the state dict of an original torchvision"):
        RunConfig.from_dict(tiny_recipe(fmnist, model={"weights": "w.pt"}))
    cfg = RunConfig.from_dict(tiny_recipe(fmnist, train={"teacher": "original"}))
    with pytest.raises(ValueError, match="slim_resnet18 was never converted"):
        _train(cfg, tmp_path / "a")


def test_universally_slimmable_conversion_trains_with_the_original_as_teacher(
    fmnist: Path, original_weights: Path, tmp_path: Path
) -> None:
    """convert(width_range=...) through a whole run: sandwich rule, in-place distillation, the original as
    teacher, BN calibration of every statistics width before the final report."""
    model = {"name": ZOO, "widths": None, "width_range": [0.25, 1.0], "stat_widths": [0.25, 0.5, 1.0],
             "small_input": True, "weights": str(original_weights)}  # fmt: skip
    train = {"epochs": 1, "width_sampler": "sandwich", "num_sampled_widths": 3, "inplace_distill": True,
             "calib_batches": 1, "teacher": "original"}  # fmt: skip
    result = _train(RunConfig.from_dict(tiny_recipe(fmnist, model=model, train=train)), tmp_path / "us")
    history = json.loads((tmp_path / "us" / "history.json").read_text())
    assert [t["width"] for t in history[0]["train"]] == [1.0, "random", 0.25]
    assert all(torch.isfinite(torch.tensor(t["loss"])) for t in history[0]["train"])
    assert [r["width"] for r in result.report] == [0.25, 0.5, 1.0]
    assert result.report[0]["macs"] < result.report[1]["macs"] < result.report[2]["macs"]
    ck = load_checkpoint(tmp_path / "us" / "last.pt")
    assert ck["model_kwargs"]["width_range"] == [0.25, 1.0] and ck["widths"] == [0.25, 0.5, 1.0]
