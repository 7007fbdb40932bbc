"""Training recipes shipped with the package, found by name.

Each ``*.yaml`` file in this folder is a recipe for ``slimmable train --recipe NAME`` (NAME is the file name without
``.yaml``). Its first line is a comment summarising it in one line, which ``slimmable list`` shows.

Resolution rule of ``--recipe`` (and of :func:`slimmable.config.load_recipe`), in :func:`resolve_recipe`:

1. an existing file at the given path wins (``--recipe my_recipe.yaml``, ``--recipe runs/x/config.yaml``);
2. otherwise a bare name, with or without ``.yaml``, is looked up among the packaged recipes
   (``--recipe fmnist_slim_resnet18``);
3. otherwise it is an error naming the packaged recipes, with the closest names.

Example:
    >>> from slimmable.recipes import list_recipes, resolve_recipe
    >>> "fmnist_slim_resnet18" in list_recipes()
    True
    >>> resolve_recipe("fmnist_slim_resnet18").name
    'fmnist_slim_resnet18.yaml'
"""

from __future__ import annotations

import difflib
import os
from importlib import resources
from pathlib import Path

__all__ = ["list_recipes", "recipe_description", "recipe_path", "resolve_recipe"]

_SUFFIXES = (".yaml", ".yml")


def _folder() -> Path:
    # The package is installed as files (setuptools wheels are never zipped), so the folder is a real directory.
    folder = resources.files(__name__)
    if not isinstance(folder, Path):  # internal: a zip import would need importlib.resources.as_file
        raise RuntimeError(f"slimmable's packaged recipes are not on the file system ({folder}); install the wheel")
    return folder


def list_recipes() -> list[str]:
    """Names of the packaged recipes, sorted (``slimmable train --recipe NAME`` takes them)."""
    return sorted(p.stem for p in _folder().iterdir() if p.suffix == ".yaml" and p.is_file())


def recipe_path(name: str) -> Path:
    """The file of the packaged recipe ``name`` (with or without ``.yaml``).

    Raises:
        FileNotFoundError: no packaged recipe of that name; the message lists them, closest first.
    """
    stem = _strip_suffix(name)
    path = _folder() / f"{stem}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no packaged recipe named {name!r}{_did_you_mean(stem)}; {_available()}")
    return path


def recipe_description(name: str) -> str:
    """The one-line summary of a packaged recipe: its first line, a comment (empty when it has none)."""
    with recipe_path(name).open() as f:
        first = f.readline().strip()
    return first.lstrip("#").strip() if first.startswith("#") else ""


def resolve_recipe(name_or_path: str | os.PathLike[str]) -> Path:
    """The recipe file that ``--recipe name_or_path`` means.

    Args:
        name_or_path: a path to a YAML file, or the name of a packaged recipe (``fmnist_slim_resnet18`` or
            ``fmnist_slim_resnet18.yaml``).

    Returns:
        The existing file at ``name_or_path`` if there is one, else the packaged recipe of that name.

    Raises:
        FileNotFoundError: neither a file nor a packaged recipe; the message lists the packaged recipes, suggests
            the closest names and says that no file exists at the path either.
        IsADirectoryError: the path is a folder.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        raise IsADirectoryError(f"recipe {path} is a folder; give a recipe YAML file or a packaged recipe name")
    text = os.fspath(name_or_path)
    stem = _strip_suffix(path.name)
    bare = path.name == text  # no folder part: may be a packaged name
    if bare and (_folder() / f"{stem}.yaml").is_file():
        return _folder() / f"{stem}.yaml"
    if bare:
        what = f"no recipe file {text!r} and no packaged recipe of that name{_did_you_mean(stem)}"
    elif stem in list_recipes():  # e.g. the old recipes/<name>.yaml of a source checkout
        raise FileNotFoundError(f"recipe {text} does not exist; a packaged recipe has that name: --recipe {stem}")
    else:
        what = f"recipe {text} does not exist (no such file){_did_you_mean(stem)}"
    raise FileNotFoundError(f"{what}; {_available()}")


def _strip_suffix(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _did_you_mean(stem: str) -> str:
    near = difflib.get_close_matches(stem, list_recipes(), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(near)}?)" if near else ""


def _available() -> str:
    names = list_recipes()
    listed = ", ".join(names) if names else "none"
    return f"packaged recipes (slimmable list): {listed}; or give the path of a recipe YAML file"
