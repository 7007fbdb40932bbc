"""A converted torchvision model trained as a slimmable network vs individually trained networks of each width.

torchvision's ``mobilenet_v3_small`` converted by :func:`slimmable.convert` (``torchvision/mobilenet_v3_small``) is
trained with Algorithm 1 at widths 0.25 / 0.5 / 0.75 / 1.0 on Fashion-MNIST; each individual network is torchvision's
own ``mobilenet_v3_small(width_mult=w)`` (the width-multiplier network, its own rounding), trained alone. Every run
has the same epochs, batches, schedule and numerics (the recipe ``fmnist_tv_mobilenet_v3_small``, no choice made on
the test images: the best epoch is selected on the 5,000 held-out training images). Each run writes its result
under ``--out`` and is skipped when found, so an interrupted study resumes.

    python benchmarks/convert_fmnist.py --epochs 2
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from _bench import machine_info, write_json

from slimmable.config import load_recipe
from slimmable.train import train_from_config

WIDTHS = (0.25, 0.5, 0.75, 1.0)
RESULTS = Path(__file__).parent / "results"


def _run(name: str, overrides: list[str], out: Path, latency_runs: int) -> dict[str, Any]:
    done = out / f"{name}.json"
    if done.is_file():
        print(f"[{name}] already done: {done}")
        return json.loads(done.read_text())
    cfg = load_recipe("fmnist_tv_mobilenet_v3_small", overrides)
    t0 = time.perf_counter()
    result = train_from_config(cfg, out / name, latency_runs=latency_runs, tensorboard=False)
    history = json.loads((out / name / "history.json").read_text())
    best = next(h for h in history if h["epoch"] == result.best_epoch)
    row = {
        "name": name,
        "minutes": (time.perf_counter() - t0) / 60,
        "best_epoch": result.best_epoch,
        "heldout_top1": {f"{r['width']:g}": r["top1"] for r in best["val"]},
        "test": result.report,
        "numerics": result.numerics.to_dict() if result.numerics else None,
    }
    write_json(done, row)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", default="off", help="the same numerics for every run (default: float32)")
    p.add_argument("--channels-last", default="false", choices=["true", "false"])
    p.add_argument("--latency-runs", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "convert_fmnist")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    common = [
        f"train.epochs={args.epochs}",
        "train.time_budget_min=null",
        f"train.seed={args.seed}",
        f'train.amp="{args.amp}"',
        f"train.channels_last={args.channels_last}",
    ]
    slim = _run("slimmable", common, args.out, args.latency_runs)
    single = {
        w: _run(
            f"individual_{w:g}",
            [*common, "model.widths=[1.0]", f"model.options={{width_mult: {w}}}"],
            args.out,
            args.latency_runs,
        )
        for w in WIDTHS
    }
    rows = []
    for w in WIDTHS:
        s_test = next(r for r in slim["test"] if r["width"] == w)
        i_test = single[w]["test"][0]
        rows.append({
            "width": w,
            "slimmable_heldout": slim["heldout_top1"][f"{w:g}"],
            "individual_heldout": single[w]["heldout_top1"]["1"],
            "slimmable_test": s_test["top1"],
            "individual_test": i_test["top1"],
            "slimmable_macs": s_test["macs"],
            "individual_macs": i_test["macs"],
        })  # fmt: skip
    print(f"\nmobilenet_v3_small on Fashion-MNIST, {args.epochs} epochs, seed {args.seed}: top-1 %")
    print("width  held-out slim / indiv  test slim / indiv  MACs (M) slim / indiv")
    for r in rows:
        print(
            f"{r['width']:5g}  {r['slimmable_heldout']:8.2f} / {r['individual_heldout']:5.2f}  "
            f"{r['slimmable_test']:9.2f} / {r['individual_test']:5.2f}  "
            f"{r['slimmable_macs'] / 1e6:8.2f} / {r['individual_macs'] / 1e6:5.2f}"
        )
    minutes = slim["minutes"] + sum(s["minutes"] for s in single.values())
    print(f"training time: slimmable {slim['minutes']:.1f} min, individual {minutes - slim['minutes']:.1f} min in all")
    write_json(RESULTS / "convert_fmnist.json", {"machine": machine_info(), "epochs": args.epochs, "seed": args.seed,
                                                 "amp": args.amp, "channels_last": args.channels_last, "rows": rows,
                                                 "minutes": minutes})  # fmt: skip


if __name__ == "__main__":
    main()
