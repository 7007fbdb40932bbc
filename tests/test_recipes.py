"""Packaged recipes: found by name or by path (an existing file wins), listed by ``slimmable list``, and an unknown
name is an error with close matches."""

from __future__ import annotations

from pathlib import Path

import pytest

import slimmable
from slimmable.cli.main import main
from slimmable.config import load_recipe
from slimmable.recipes import list_recipes, recipe_description, recipe_path, resolve_recipe

NAMES = list_recipes()


def test_recipes_are_in_the_package() -> None:
    assert "fmnist_slim_resnet18" in NAMES and len(NAMES) >= 9
    folder = Path(slimmable.__file__).parent / "recipes"
    assert sorted(p.stem for p in folder.glob("*.yaml")) == NAMES
    assert not (Path(__file__).resolve().parents[1] / "recipes").exists(), "recipes live in slimmable/recipes/"


@pytest.mark.parametrize("name", NAMES)
def test_load_by_name_and_by_path(name: str) -> None:
    path = recipe_path(name)
    assert path.is_file() and path.parent.name == "recipes" and path.suffix == ".yaml"
    by_name = load_recipe(name)
    assert load_recipe(f"{name}.yaml") == by_name
    assert load_recipe(path) == by_name and load_recipe(str(path)) == by_name
    description = recipe_description(name)
    assert description and "\n" not in description, f"{name}.yaml should start with a one-line '# summary'"


def test_an_existing_file_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("fmnist_slim_resnet18.yaml").write_text("train:\n  epochs: 3\n")
    assert resolve_recipe("fmnist_slim_resnet18.yaml") == Path("fmnist_slim_resnet18.yaml")
    assert load_recipe("fmnist_slim_resnet18.yaml").train.epochs == 3  # the file in the working directory
    assert load_recipe("fmnist_slim_resnet18").model.name == "slim_resnet18"  # no such file: the packaged one
    Path("my_recipe").write_text("model:\n  name: slim_resnet34\n")  # any file, whatever its suffix
    assert load_recipe("my_recipe").model.name == "slim_resnet34"
    Path("folder").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        resolve_recipe("folder")


def test_unknown_names_suggest_close_matches(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_recipe("fmnist_slim_resnet")
    msg = str(err.value)
    assert "no recipe file 'fmnist_slim_resnet' and no packaged recipe of that name" in msg
    assert "did you mean fmnist_slim_resnet18" in msg
    assert all(name in msg for name in NAMES) and "path of a recipe YAML file" in msg
    # a path: no file there; one named like a packaged recipe (the old recipes/ folder) points to its name
    with pytest.raises(FileNotFoundError, match=r"does not exist; a packaged recipe has that name: --recipe fmnist_"):
        load_recipe(tmp_path / "recipes" / "fmnist_slim_resnet18.yaml")
    with pytest.raises(FileNotFoundError, match=r"recipe .*nope\.yaml does not exist \(no such file\); packaged"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(FileNotFoundError, match="no packaged recipe named 'imagenet_slim_resnet5' .did you mean"):
        recipe_path("imagenet_slim_resnet5")


def test_cli_lists_and_resolves_recipes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "slim_mobilenet_v2" in out and "recipes (slimmable train --recipe NAME):" in out
    for name in NAMES:
        assert f"  {name} " in out and recipe_description(name) in out
    assert main(["list", "imagenet_*"]) == 0  # the filter applies to recipes too
    out = capsys.readouterr().out
    assert "imagenet_slim_resnet50" in out and "fmnist_slim_resnet18" not in out
    assert main(["train", "--recipe", "fmnist_slim_resnet", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert "slimmable train: error: no recipe file 'fmnist_slim_resnet'" in err
    assert "did you mean fmnist_slim_resnet18" in err
