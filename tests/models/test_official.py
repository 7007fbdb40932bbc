"""Official checkpoints load into our models with identical keys and reproduce the official logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import slimmable
from slimmable.checkpoint import OFFICIAL_MODELS, CheckpointError, load_official_checkpoint


@pytest.mark.parametrize("official_name", list(OFFICIAL_MODELS))
def test_key_layout_matches_official(official: Path, official_name: str) -> None:
    ref = json.loads((official / f"{official_name}.keys.json").read_text())
    name, kwargs = OFFICIAL_MODELS[official_name]
    model = slimmable.create_model(name, **kwargs)
    assert list(model.widths) == ref["widths"]
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    theirs = {k.removeprefix("module."): v for k, v in ref["keys"].items()}
    assert ours == theirs


@pytest.mark.parametrize("official_name", ["s_mobilenet_v1", "s_mobilenet_v2", "s_shufflenet", "us_mobilenet_v2"])
def test_fixture_logits_reproduced_at_every_width(official: Path, official_name: str) -> None:
    fx = torch.load(official / f"{official_name}.fixture.pt", weights_only=True)
    name, kwargs = OFFICIAL_MODELS[official_name]
    model = load_official_checkpoint(fx["checkpoint"], slimmable.create_model(name, **kwargs)).eval()
    assert len(fx["widths"]) == len(fx["logits"]) >= 3
    with torch.no_grad():
        for w in fx["widths"]:
            with model.use_width(w):
                diff = (model(fx["input"]) - fx["logits"][w]).abs().max().item()
            assert diff <= 1e-3, (w, diff)


def test_load_from_path_and_errors_leave_model_unchanged(official: Path, tmp_path: Path) -> None:
    src = official / "s_mobilenet_v2.fixture.pt"
    fx = torch.load(src, weights_only=True)
    path = tmp_path / "s_mobilenet_v2.pt"
    torch.save(fx["checkpoint"], path)
    model = slimmable.create_model("slim_mobilenet_v2")
    load_official_checkpoint(path, model)
    ref = {k: v.clone() for k, v in model.state_dict().items()}

    def unchanged() -> bool:
        return all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())

    # wrong widths: the message names the widths and the channel counts on both sides
    with pytest.raises(CheckpointError, match=r"widths differ: .* \(4 switches\).*\(0.5, 1.0\)"):
        load_official_checkpoint(path, slimmable.create_model("slim_mobilenet_v2", widths=(0.5, 1.0)))
    # wrong model family
    v1 = torch.load(official / "s_mobilenet_v1.fixture.pt", weights_only=True)["checkpoint"]
    with pytest.raises(CheckpointError, match="keys with other shapes|missing"):
        load_official_checkpoint(v1, model)
    assert unchanged()
    # truncated and corrupt files
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, damaged"):
        load_official_checkpoint(tmp_path / "trunc.pt", model)
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 10)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_official_checkpoint(tmp_path / "noise.pt", model)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_official_checkpoint(tmp_path / "empty.pt", model)
    # a file from another program: arbitrary pickled objects are refused, not executed
    torch.save({"model": {"w": torch.zeros(1)}, "opt": object.__new__(_Foreign)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_official_checkpoint(tmp_path / "foreign.pt", model)
    with pytest.raises(CheckpointError, match="not an official slimmable_networks checkpoint"):
        load_official_checkpoint({"epoch": 3, "args": "x"}, model)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_official_checkpoint(tmp_path / "missing.pt", model)
    with pytest.raises(CheckpointError, match="is a folder"):
        load_official_checkpoint(tmp_path, model)
    assert unchanged()


class _Foreign:
    pass


def test_official_checkpoints_are_declared_by_the_families() -> None:
    from slimmable.models import OFFICIAL_CHECKPOINTS, register_model

    assert OFFICIAL_MODELS is OFFICIAL_CHECKPOINTS  # checkpoint.py reads the registry
    assert dict(OFFICIAL_MODELS) == {
        "s_mobilenet_v1": ("slim_mobilenet_v1", {}),
        "s_mobilenet_v2": ("slim_mobilenet_v2", {}),
        "s_shufflenet": ("slim_shufflenet_v1", {}),
        "s_resnet": ("slim_resnet50", {}),
        "us_mobilenet_v1": ("us_mobilenet_v1", {}),
        "us_mobilenet_v2": ("us_mobilenet_v2", {}),
    }
    with pytest.raises(TypeError):
        OFFICIAL_MODELS["s_other"] = ("slim_resnet18", {})  # type: ignore[index]

    def another_resnet(**kwargs):
        raise AssertionError("never built")

    with pytest.raises(ValueError, match="official checkpoint 's_resnet' is already registered for slim_resnet50"):
        register_model(official="s_resnet")(another_resnet)
    assert "another_resnet" not in slimmable.list_models()
