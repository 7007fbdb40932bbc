"""The deployment loader: slimmable checkpoints, official checkpoints, random weights."""

from __future__ import annotations

import pytest
import torch

import slimmable
from slimmable.checkpoint import CheckpointError
from slimmable.export import load_model


def _own_checkpoint(path, model, name):
    torch.save(
        {
            "format_version": 1,
            "model": model.state_dict(),
            "model_name": name,
            "model_kwargs": dict(model.model_kwargs),
            "widths": list(model.widths),
            "preprocess": {"image_size": 32, "eval_resize": None, "mean": [0.5] * 3, "std": [0.25] * 3},
        },
        path,
    )


def test_random_weights_are_flagged():
    loaded = load_model(None, "slim_mobilenet_v1", num_classes=10, small_input=True)
    assert loaded.random_weights and loaded.source == "random weights"
    assert loaded.name == "slim_mobilenet_v1" and not loaded.model.training


def test_nothing_to_load_is_a_clear_error():
    with pytest.raises(ValueError, match="--checkpoint PATH"):
        load_model(None, None)


def test_slimmable_checkpoint(build, tmp_path):
    pytest.importorskip("slimmable.train")
    model = build("slim_mobilenet_v2")
    _own_checkpoint(tmp_path / "c.pt", model, "slim_mobilenet_v2")
    loaded = load_model(tmp_path / "c.pt")
    assert not loaded.random_weights and loaded.name == "slim_mobilenet_v2"
    assert loaded.preprocess["image_size"] == 32
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    with pytest.raises(ValueError, match="drop --model"):
        load_model(tmp_path / "c.pt", "slim_mobilenet_v1")


def test_official_checkpoint_needs_model_name(tmp_path):
    model = slimmable.create_model("slim_mobilenet_v1", num_classes=10, small_input=True)
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "o.pt")
    with pytest.raises(ValueError, match="add --model NAME"):
        load_model(tmp_path / "o.pt")
    loaded = load_model(tmp_path / "o.pt", "slim_mobilenet_v1", num_classes=10, small_input=True)
    assert loaded.source.startswith("official checkpoint") and not loaded.random_weights
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "o.pt", "slim_mobilenet_v2", num_classes=10, small_input=True)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope.pt", "slim_mobilenet_v1")
