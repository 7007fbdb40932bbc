"""``slimmable train --recipe R``: train a slimmable network with Algorithm 1 (one process or under torchrun)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..config import RunConfig, apply_overrides, load_recipe
from ..tasks import task_for_rows
from ._common import format_report_table, non_negative_int, print_outputs

_EPILOG = """\
examples:
  slimmable train --recipe fmnist_slim_mobilenet_v2                       # a packaged recipe (slimmable list)
  slimmable train --recipe fmnist_slim_mobilenet_v2 --set train.epochs=1 --set optim.lr=0.1
  slimmable train --recipe my_recipe.yaml                                 # a recipe file (a file wins over a name)
  slimmable train --resume runs/fmnist_slim_mobilenet_v2/last.pt          # continue a stopped run
  torchrun --nproc_per_node 4 -m slimmable.cli.main train --recipe imagenet_slim_mobilenet_v2 \\
      --set data.root=/data/imagenet                                      # 4 GPUs, same global batch

outputs (in --out): config.yaml (resolved recipe), last.pt (every epoch and on Ctrl-C / SIGTERM), best.pt (best
mean validation top-1 over widths), history.json, final_metrics.json/.csv (test split), tb/ (TensorBoard).
A run never resumes by itself: pass --resume PATH.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a slimmable network from a recipe (Algorithm 1, or the sandwich rule for US-Nets)",
        description="Train a slimmable network: for each batch, a forward and backward pass at each width the "
        "sampler picks (train.width_sampler: 'all' switches, Algorithm 1; 'sandwich' for universally slimmable "
        "models: widest, narrowest and random widths), the gradients adding up, then one optimizer step. The recipe "
        "(YAML) holds model, data, optimizer and training settings; the device and data workers come from the "
        "flags below.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--recipe",
        metavar="NAME|YAML",
        help="a packaged recipe's name (`slimmable list` shows them), e.g. fmnist_slim_mobilenet_v2, or a recipe "
        "file; an existing file wins over a packaged name",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a recipe value, e.g. --set train.epochs=5 --set model.widths=[0.5,1.0] (repeatable)",
    )
    p.add_argument(
        "--resume",
        metavar="CHECKPOINT",
        help="continue the run saved in this checkpoint (e.g. runs/NAME/last.pt); without --recipe its saved "
        "recipe is used",
    )
    p.add_argument("--out", metavar="DIR", help="output folder (default runs/<recipe name>, or the checkpoint's)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument(
        "--workers",
        type=non_negative_int,
        metavar="N",
        help="data-loading processes (default: 0 for in-memory datasets, else min(8, CPU count))",
    )
    p.add_argument("--data-cache", metavar="DIR", help="where datasets are downloaded (~/.cache/slimmable)")
    p.add_argument(
        "--latency-runs", type=non_negative_int, default=10, help="timed runs per width in the final report (0: skip)"
    )
    p.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard scalars")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of progress bars")
    p.set_defaults(func=run)


def _show_progress(disabled: bool) -> bool:
    if disabled or os.environ.get("CI", "").lower() in ("true", "1"):
        return False
    return sys.stderr.isatty()


def _resolve_config(args: argparse.Namespace) -> RunConfig:
    if args.recipe:
        return load_recipe(args.recipe, args.overrides)
    if not args.resume:
        raise ValueError(
            "give --recipe YAML (a recipe file, or a packaged recipe's name such as fmnist_slim_resnet18: see "
            "`slimmable list`), or --resume CHECKPOINT to continue a run"
        )
    from ..checkpoint import load_checkpoint

    saved = load_checkpoint(args.resume).get("config")
    if not saved:
        raise ValueError(f"{args.resume} holds no recipe; pass the one the run used with --recipe")
    source = f"recipe saved in {args.resume}"
    return RunConfig.from_dict(apply_overrides(saved, args.overrides), source=source)


def _train(args: argparse.Namespace, cfg: RunConfig, out: Path) -> Any:
    workers = args.workers
    if workers is None:
        workers = 0 if cfg.data.dataset != "image_folder" else min(8, os.cpu_count() or 1)
    from ..train import train_from_config

    return train_from_config(
        cfg,
        out,
        device=args.device,
        num_workers=workers,
        resume=args.resume,
        progress=_show_progress(args.no_progress),
        tensorboard=not args.no_tensorboard,
        cache_dir=args.data_cache,
        latency_runs=args.latency_runs,
    )


def run(args: argparse.Namespace) -> int:
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    cfg = _resolve_config(args)
    if args.out:
        out = Path(args.out)
    elif args.resume:
        out = Path(args.resume).parent
    else:
        out = Path("runs") / Path(args.recipe).stem
    from ..train.outputs import (
        check_output_dir,
        ensure_writable,
        lock_output_dir,
        refuse_if_locked,
        remove_stale_temporaries,
    )

    if rank == 0:
        refuse_if_locked(out)  # another run is writing there now: name it (creates nothing)
    check_output_dir(out, args.resume)  # before anything is written: never overwrite another run's files
    lock = None
    if rank == 0:
        ensure_writable(out)  # fail now, not after loading data
        lock = lock_output_dir(out)  # one run at a time in a folder, for the whole run
    try:
        if rank == 0:
            check_output_dir(out, args.resume)  # again under the lock: a run that started meanwhile is refused
            remove_stale_temporaries(out)
        result = _train(args, cfg, out)
    finally:
        if lock is not None:
            lock.release()
    if rank != 0:
        return 0
    if result.interrupted:
        print(f"stopped after {result.epochs_done} epochs; continue with:")
        print(f"  slimmable train --resume {result.last_checkpoint}")
        return 130
    best = "-" if result.best_score is None else f"{result.best_score:.2f}"
    metric = task_for_rows(result.report).metric_label
    print(
        f"\n{cfg.model.name}: test split, best checkpoint (epoch {result.best_epoch}, mean {result.selection_split} "
        f"{metric} {best})"
    )
    print(format_report_table(result.report))
    print_outputs(result.out_dir, tensorboard=not args.no_tensorboard)
    return 0
