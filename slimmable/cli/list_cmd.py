"""``slimmable list``: registered models with their widths."""

from __future__ import annotations

import argparse

from ..models import create_model, list_models
from ._common import format_table


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list the registered models and their widths")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'slim_resnet*'")
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
    return 0
