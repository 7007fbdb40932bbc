"""``slimmable list``: registered models with their widths, and the packaged training recipes."""

from __future__ import annotations

import argparse
import fnmatch

from ..models import create_model, list_models
from ..recipes import list_recipes, recipe_description
from ._common import format_table


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list the registered models and their widths, and the packaged recipes")
    p.add_argument(
        "pattern", nargs="?", default="*", help="shell-style filter of model and recipe names, e.g. 'slim_resnet*'"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows = []
    for name in list_models(args.pattern):
        model = create_model(name)
        if model.width_range is not None:
            lo, hi = model.width_range
            widths = f"any in [{lo:g}, {hi:g}] ({len(model.widths)} with BN statistics)"
        else:
            widths = ", ".join(f"{w:g}" for w in model.widths)
        rows.append((name, type(model).__name__, widths))
    print(format_table(["model", "class", "widths"], rows))
    recipes = fnmatch.filter(list_recipes(), args.pattern)
    if recipes:
        print("\nrecipes (slimmable train --recipe NAME):")
        width = max(len(name) for name in recipes)
        for name in recipes:
            print(f"  {name.ljust(width)}  {recipe_description(name)}".rstrip())
    return 0
