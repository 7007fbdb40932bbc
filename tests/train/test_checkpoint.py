"""Checkpoints: round trip of model and training state, atomic writes, clear errors, random states."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import pytest
import torch

import slimmable
from slimmable.checkpoint import CheckpointError
from slimmable.train import (
    CHECKPOINT_FORMAT_VERSION,
    build_model_from_checkpoint,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
    train_step,
    unwrap_model,
)


def _trained() -> torch.nn.Module:
    torch.manual_seed(0)
    model = slimmable.create_model("slim_mobilenet_v2", widths=(0.5, 1.0), num_classes=4, small_input=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    for _ in range(2):
        train_step(model, opt, x, y, [1.0, 0.5])
    return model


def _checkpoint(model: torch.nn.Module, **extra) -> dict:
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "model": model.state_dict(),
        "model_name": model.model_name,
        "model_kwargs": model.model_kwargs,
        "widths": list(model.widths),
        **extra,
    }


def test_round_trip_rebuilds_the_same_model_at_every_width(tmp_path: Path) -> None:
    model = _trained().eval()
    path = save_checkpoint(tmp_path / "ck.pt", _checkpoint(model, epoch=3, rng=[get_rng_state()]))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 3 and ckpt["model_name"] == "slim_mobilenet_v2"
    again = build_model_from_checkpoint(path)
    assert not again.training and again.widths == (0.5, 1.0)
    x = torch.randn(3, 3, 16, 16)
    for w in (0.5, 1.0):
        with torch.no_grad(), model.use_width(w), again.use_width(w):
            torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_failed_save_keeps_the_previous_file(tmp_path: Path) -> None:
    model = _trained()
    path = save_checkpoint(tmp_path / "ck.pt", _checkpoint(model, epoch=1))
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.save raises for an unpicklable object
        save_checkpoint(path, _checkpoint(model, epoch=2, bad=lambda: None))
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]
    with pytest.raises(ValueError, match="lacks"):
        save_checkpoint(path, {"model": {}})


def test_errors_name_the_problem(tmp_path: Path) -> None:
    model = _trained()
    official = tmp_path / "official.pt"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, official)
    with pytest.raises(CheckpointError, match="not a slimmable training checkpoint.*--model NAME --widths"):
        load_checkpoint(official)
    newer = tmp_path / "newer.pt"
    torch.save(_checkpoint(model) | {"format_version": CHECKPOINT_FORMAT_VERSION + 1}, newer)
    with pytest.raises(CheckpointError, match="Upgrade slimmable"):
        load_checkpoint(newer)
    partial = tmp_path / "partial.pt"
    torch.save({"format_version": 1, "model": {}}, partial)
    with pytest.raises(CheckpointError, match=r"lacks \['model_name'"):
        load_checkpoint(partial)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((tmp_path / "newer.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated, damaged") as info:
        load_checkpoint(truncated)
    assert "weights_only=False" not in str(info.value) and "\n" not in str(info.value)
    text = tmp_path / "notes.pt"
    text.write_text("hello\nworld\n")
    with pytest.raises(CheckpointError, match=r"not a PyTorch checkpoint \(a text file starting with 'hello'\)"):
        load_checkpoint(text)
    pickled = tmp_path / "plain.pkl"
    pickled.write_bytes(pickle.dumps({"a": 1}, protocol=4))  # a pickle torch's weights-only reader cannot parse
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(pickled)
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    wrong = _checkpoint(model) | {"model_kwargs": {**model.model_kwargs, "num_classes": 7}}
    with pytest.raises(CheckpointError, match="do not fit slim_mobilenet_v2"):
        build_model_from_checkpoint(wrong)


def test_rng_state_round_trip(tmp_path: Path) -> None:
    model = _trained()
    random.seed(1)
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "ck.pt", _checkpoint(model, rng=[get_rng_state()]))
    expected = (random.random(), torch.rand(3))
    random.seed(99)
    torch.manual_seed(99)
    set_rng_state(load_checkpoint(tmp_path / "ck.pt")["rng"][0])
    assert random.random() == expected[0] and torch.equal(torch.rand(3), expected[1])


def test_unwrap_model() -> None:
    model = _trained()
    assert unwrap_model(torch.nn.DataParallel(model)) is model
    assert unwrap_model(model) is model


def test_model_kwargs_from_others_are_bounded_before_anything_is_allocated(monkeypatch) -> None:
    model = _trained()
    kwargs = model.model_kwargs
    bad = {
        "num_classes": (10**12, r"model_kwargs\['num_classes'\] = 1000000000000 is not an int in \[1, 100000\]"),
        "widths": ([0.5, 1e6], r"model_kwargs\['widths'\] = \[0.5, 1000000.0\] is not a list of at most 64 widths"),
        "in_chans": (4096, r"model_kwargs\['in_chans'\] = 4096 is not an int in \[1, 16\]"),
        "small_input": ([1] * 2000, r"model_kwargs\['small_input'\] .* is not a plain value"),
    }
    for key, (value, message) in bad.items():
        with pytest.raises(CheckpointError, match=message):
            build_model_from_checkpoint(_checkpoint(model) | {"model_kwargs": {**kwargs, key: value}})
    with pytest.raises(CheckpointError, match="at most 64 widths"):
        build_model_from_checkpoint(_checkpoint(model) | {"model_kwargs": {**kwargs, "widths": [0.5] * 65}})

    # weights that do not fit are found on the meta device: the real model is never built
    built = []
    real = slimmable.checkpoint.create_model
    monkeypatch.setattr(
        slimmable.checkpoint, "create_model", lambda *a, **k: built.append(torch.empty(0).device) or real(*a, **k)
    )
    wrong = _checkpoint(model) | {"model_kwargs": {**kwargs, "num_classes": 70_000}}
    with pytest.raises(CheckpointError, match=r"do not fit slim_mobilenet_v2.*'classifier.*' has shape \(4") as info:
        build_model_from_checkpoint(wrong)
    assert built == [torch.device("meta")] and "\n" not in str(info.value)
    built.clear()
    assert build_model_from_checkpoint(_checkpoint(model)).widths == model.widths
    assert built == [torch.device("meta"), torch.device("cpu")]
