"""The main job (`fmnist_slim_resnet18`, a 9-minute budget) as a newcomer runs it: quiet, with the machine busy at
the start, on the emulated AVX2 path, or with a budget scaled to a slower machine; each with its plan, re-plans,
epochs and test top-1.

A busy start is made by ``--busy-procs`` CPU-bound processes (a Python loop each) that share the machine for the
first ``--busy-seconds`` of the run, start-up probe included; they stop by themselves. ``--avx2`` limits PyTorch
and oneDNN to AVX2 (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``). Extra ``--set`` values go to
``slimmable train`` (e.g. ``--set train.time_budget_min=4`` with ``--set train.amp=off``: the steps a 9-minute
budget buys on a CPU about 2.3x slower than this one, in float32).

Each run's folder keeps what ``slimmable train`` writes (``hardware.json`` holds the machine, the numerics, the
plan and every re-plan); the summary row is added to ``--json`` under ``--label``.

Usage:
    python benchmarks/main_job_runs.py --label quiet
    python benchmarks/main_job_runs.py --label busy_start --busy-seconds 90 --busy-procs 1
    python benchmarks/main_job_runs.py --label avx2 --avx2
    python benchmarks/main_job_runs.py --label slow_machine --set train.time_budget_min=4 --set train.amp=off
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _bench import AVX2_ENV, write_json

RECIPE = "fmnist_slim_resnet18"
_HOG = "import time\nend = time.time() + {s}\nwhile time.time() < end:\n    pass\n"


def _summary(out: Path, wall: float, args: argparse.Namespace) -> dict[str, Any]:
    hw = json.loads((out / "hardware.json").read_text())
    rows = json.loads((out / "final_metrics.json").read_text())["widths"]
    history = json.loads((out / "history.json").read_text())
    plan = hw["plan"] or {}
    spe = plan.get("steps_per_epoch") or 1
    return {
        "label": args.label,
        "busy_seconds": args.busy_seconds if args.busy_procs else 0,
        "busy_procs": args.busy_procs,
        "avx2": args.avx2,
        "overrides": args.set,
        "machine": hw["machine"],
        "numerics": hw["numerics"],
        "first_plan_epochs": round((plan.get("first_total_steps") or plan.get("total_steps", 0)) / spe, 2),
        "final_plan_epochs": round(plan.get("total_steps", 0) / spe, 2),
        "replans": hw.get("replans", []),
        "epochs_trained": len(history),
        "training_seconds": round(sum(h["seconds"] for h in history), 1),
        "wall_seconds": round(wall, 1),
        "test_top1": {f"{r['width']:g}": round(r["top1"], 2) for r in rows},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", required=True, help="the row's name in --json (e.g. quiet, busy_start, avx2)")
    ap.add_argument("--busy-seconds", type=float, default=90.0, help="how long the CPU-bound processes run")
    ap.add_argument("--busy-procs", type=int, default=0, help="CPU-bound processes at the start (0: a quiet run)")
    ap.add_argument("--avx2", action="store_true", help="run on the emulated AVX2 path")
    ap.add_argument("--set", action="append", default=[], help="a recipe override for slimmable train (repeatable)")
    ap.add_argument("--out", help="run folder (default benchmarks/results/main_job/<label>)")
    ap.add_argument("--json", default="benchmarks/results/main_job_runs.json")
    args = ap.parse_args(argv)
    if args.busy_procs < 0 or args.busy_seconds <= 0:
        ap.error("--busy-procs must be >= 0 and --busy-seconds > 0")
    out = Path(args.out or f"benchmarks/results/main_job/{args.label}")
    if out.exists() and any(out.iterdir()):
        ap.error(f"{out} is not empty: choose another --label or --out, or delete it")
    env = {**os.environ, **(AVX2_ENV if args.avx2 else {})}
    hogs = [subprocess.Popen([sys.executable, "-c", _HOG.format(s=args.busy_seconds)]) for _ in range(args.busy_procs)]
    cmd = [sys.executable, "-m", "slimmable.cli.main", "train", "--recipe", RECIPE, "--out", str(out), "--no-progress"]
    for s in args.set:
        cmd += ["--set", s]
    print("running:", " ".join(cmd[2:]), f"({args.busy_procs} busy processes for {args.busy_seconds:g} s)", flush=True)
    t0 = time.perf_counter()
    try:
        subprocess.run(cmd, env=env, check=True)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    row = _summary(out, time.perf_counter() - t0, args)
    path = Path(args.json)
    table = json.loads(path.read_text()) if path.exists() else {}
    table[args.label] = row
    write_json(path, table)
    top1 = " / ".join(f"{v:.2f}" for v in row["test_top1"].values())
    print(
        f"| {args.label} | {row['numerics']['amp']}{'+cl' if row['numerics']['channels_last'] else ''} | "
        f"{row['first_plan_epochs']} -> {row['final_plan_epochs']} epochs ({len(row['replans'])} re-plans) | "
        f"{row['training_seconds'] / 60:.1f} min | {top1} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
