"""Recipes: strict loading (unknown/duplicate keys, types), --set overrides, round trip of every shipped recipe."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from slimmable.config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    load_recipe,
    save_config,
)
from slimmable.recipes import list_recipes, recipe_path

RECIPES = [recipe_path(name) for name in list_recipes()]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return p


def test_recipes_exist() -> None:
    names = {p.stem for p in RECIPES}
    for family in ("slim_mobilenet_v1", "slim_mobilenet_v2", "slim_resnet50", "slim_shufflenet_v1"):
        assert f"imagenet_{family}" in names
    assert any(n.startswith("fmnist_") for n in names)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_round_trip(recipe: Path, tmp_path: Path) -> None:
    cfg = load_recipe(recipe)
    saved = save_config(cfg, tmp_path / "config.yaml")
    again = load_recipe(saved)
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_official_hyper_parameters() -> None:
    v2 = load_recipe(next(p for p in RECIPES if p.stem == "imagenet_slim_mobilenet_v2"))
    assert v2.model.widths == (0.35, 0.5, 0.75, 1.0)
    assert (v2.optim.lr, v2.optim.schedule, v2.optim.gamma, v2.train.epochs) == (0.045, "exponential", 0.98, 480)
    assert v2.data.augment == "mobile" and not v2.optim.decay_depthwise
    r50 = load_recipe(next(p for p in RECIPES if p.stem == "imagenet_slim_resnet50"))
    assert r50.optim.milestones == (30, 60, 90) and r50.data.augment == "basic" and r50.data.batch_size == 256
    sh = load_recipe(next(p for p in RECIPES if p.stem == "imagenet_slim_shufflenet_v1"))
    assert (sh.optim.lr, sh.optim.schedule, sh.data.batch_size, sh.train.epochs) == (0.5, "linear", 1024, 250)


def test_no_hardware_fields() -> None:
    fields = {f.name for cls in (ModelConfig, DataConfig, OptimConfig, TrainConfig) for f in dataclasses.fields(cls)}
    assert not fields & {"device", "gpu", "gpus", "num_workers", "workers", "gpu_type", "num_gpus_per_job"}


def test_configs_are_frozen() -> None:
    cfg = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3  # type: ignore[misc]


def test_duplicate_key_names_key_line_and_file(tmp_path: Path) -> None:
    p = _write(tmp_path, "optim:\n  lr: 0.1\n  momentum: 0.9\n  lr: 0.5\n")
    with pytest.raises(ValueError, match=r"duplicate key 'lr' at line 4 \(first at line 2\)") as info:
        load_recipe(p)
    assert str(p) in str(info.value)


def test_duplicate_section(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="duplicate key 'train'"):
        load_recipe(_write(tmp_path, "train:\n  epochs: 1\ntrain:\n  epochs: 2\n"))


def test_unknown_key_lists_valid_keys_and_suggests(tmp_path: Path) -> None:
    p = _write(tmp_path, "optim:\n  lrr: 0.1\n")
    with pytest.raises(ValueError) as info:
        load_recipe(p)
    msg = str(info.value)
    assert "optim.lrr" in msg and str(p) in msg and "did you mean 'lr'" in msg
    assert "momentum" in msg and "weight_decay" in msg  # the valid keys


def test_unknown_section(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown section 'optimizer'.*valid sections: model, data, optim, train"):
        load_recipe(_write(tmp_path, "optimizer:\n  lr: 0.1\n"))


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("train:\n  epochs: ten\n", "train.epochs must be an integer, got 'ten'"),
        ("train:\n  epochs: 2.5\n", "train.epochs must be an integer"),
        ("train:\n  channels_last: 1\n", "train.channels_last must be true or false"),
        ("optim:\n  lr: fast\n", "optim.lr must be a number"),
        ("model:\n  widths: 0.5\n", "model.widths must be a list of float or null"),
        ("train:\n  amp: half\n", "train.amp must be one of 'off', 'bf16', 'fp16', 'auto'"),
        ("optim:\n  betas: [0.9]\n", "optim.betas must be a list of 2 float"),
        ("data:\n  root: 3\n", "data.root must be str or null"),
    ],
)
def test_wrong_type(tmp_path: Path, text: str, pattern: str) -> None:
    p = _write(tmp_path, text)
    with pytest.raises(ValueError, match=pattern) as info:
        load_recipe(p)
    assert str(p) in str(info.value)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("optim:\n  lr: -0.1\n", "optim.lr: must be > 0"),
        ("optim:\n  schedule: multistep\n", "optim.milestones: schedule multistep needs milestones"),
        ("data:\n  batch_size: 0\n", "data.batch_size: must be >= 1"),
        ("train:\n  time_budget_min: 1e308\n", "train.time_budget_min: must be > 0 and at most 10080 minutes"),
        ("train:\n  time_budget_min: 10081\n", "train.time_budget_min: must be > 0 and at most 10080 minutes"),
        ("data:\n  dataset: cifar10\n  augment: mobile\n", "data.augment: 'mobile' is the ImageNet"),
        ("model:\n  widths: [0.5, -1]\n", "model.widths: widths must be positive"),
        ("model:\n  channels: s.json\n  width_range: [0.25, 1.0]\n", "model.channels: a channel spec fixes"),
    ],
)
def test_invalid_value(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        load_recipe(_write(tmp_path, text))


def test_yaml_exponent_without_dot_is_a_float(tmp_path: Path) -> None:
    # YAML 1.1 reads 1e-4 as a string; a float field accepts it
    assert load_recipe(_write(tmp_path, "optim:\n  weight_decay: 1e-4\n")).optim.weight_decay == 1e-4


def test_overrides_apply_before_validation(tmp_path: Path) -> None:
    p = _write(tmp_path, "optim:\n  lr: 0.1\ntrain:\n  epochs: 10\n")
    cfg = load_recipe(
        p, ["train.epochs=3", "optim.lr=1e-3", "model.widths=[0.5, 1.0]", "data.root=/x", "train.amp=bf16"]
    )
    assert cfg.train.epochs == 3 and cfg.optim.lr == 1e-3 and cfg.model.widths == (0.5, 1.0)
    assert cfg.data.root == "/x" and cfg.train.amp == "bf16"
    assert load_recipe(p, ["data.root=null"]).data.root is None
    # YAML reads an unquoted off as false: both mean amp off; true is still refused
    assert (
        load_recipe(p, ["train.amp=off"]).train.amp == "off" and load_recipe(p, ["train.amp=false"]).train.amp == "off"
    )
    assert load_recipe(p, ["train.time_budget_min=10080"]).train.time_budget_min == 10080
    with pytest.raises(ValueError, match="train.amp must be one of 'off'"):
        load_recipe(p, ["train.amp=on"])
    with pytest.raises(ValueError, match="train.epochs must be an integer") as info:
        load_recipe(p, ["train.epochs=many"])
    assert "--set train.epochs=many" in str(info.value)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("train.epoch=3", r"unknown key 'train.epoch' \(did you mean 'epochs'\?\); valid keys in train: epochs"),
        ("trian.epochs=3", r"unknown section 'trian' \(did you mean 'train'\?\)"),
        ("epochs=3", "the key must be section.key"),
        ("train.epochs", "expected section.key=value"),
    ],
)
def test_bad_override(override: str, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        apply_overrides({}, [override])


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="recipe .*nope.yaml does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_empty_recipe_gives_defaults(tmp_path: Path) -> None:
    assert load_recipe(_write(tmp_path, "")) == RunConfig()
