"""``slimmable report RUN_DIR``: show a finished training run's per-width results without recomputing them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import format_report_table, print_outputs


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="show a finished run's per-width test results (from RUN_DIR/final_metrics.json)",
        description="Print the per-width table a finished `slimmable train` run saved, and where its outputs are.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run's output folder, e.g. runs/fmnist_slim_resnet18")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.run_dir)
    path = out / "final_metrics.json"
    if not path.exists():
        hint = (
            f" It has {out / 'last.pt'}: finish it with slimmable train --resume {out / 'last.pt'}"
            if (out / "last.pt").exists()
            else ""
        )
        raise FileNotFoundError(f"{path} does not exist: {out} holds no finished run.{hint}")
    try:
        data = json.loads(path.read_text())
        rows, meta = data["widths"], data.get("meta", {})
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a slimmable report ({err}); re-create it with slimmable eval") from err
    print(f"{meta.get('model', '?')} on {meta.get('dataset', '?')}: {meta.get('split', '?')} split, checkpoint "
          f"{meta.get('checkpoint', '?')} (epoch {meta.get('epoch', '?')})")  # fmt: skip
    print(format_report_table(rows))
    print_outputs(out)
    return 0
