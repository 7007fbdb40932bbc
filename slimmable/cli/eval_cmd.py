"""``slimmable eval --checkpoint C``: the task's metrics (top-1/top-5/loss, box AP, mIoU), MACs, active parameters
and latency at each width."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..config import DataConfig, RunConfig, apply_overrides
from ._common import format_report_table, non_negative_int, parse_widths, positive_int

_EPILOG = """\
examples:
  slimmable eval --checkpoint runs/fmnist_slim_mobilenet_v2/best.pt
  slimmable eval --checkpoint runs/imagenet_s_mbv2/best.pt --data /data/imagenet
  # a checkpoint of the official slimmable_networks code (no recipe inside: name the model and widths)
  slimmable eval --checkpoint s_mobilenet_v2_0.35_0.5_0.75_1.0.pt --model slim_mobilenet_v2 \\
      --widths 0.35,0.5,0.75,1.0 --dataset image_folder --data /data/imagenet
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint at each width: accuracy, loss, MACs, parameters, latency",
        description="Evaluate a checkpoint at every width on a dataset split, each width with its own BatchNorm "
        "statistics. Prints a table and writes it as JSON and CSV. Takes checkpoints written by `slimmable train` "
        "(which record their model and data) and official slimmable_networks checkpoints (give --model, --widths "
        "and the data).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint file (.pt)")
    p.add_argument("--data", metavar="DIR", help="dataset folder (default: the one the checkpoint was trained on)")
    p.add_argument(
        "--dataset",
        help="dataset kind, one the model's task trains on (default: the checkpoint's; image_folder for official "
        "checkpoints)",
    )
    p.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="test: the test set (ImageNet val/); val: the images held out from training (default test)",
    )
    p.add_argument("--widths", help="comma-separated widths to evaluate (official checkpoints: the trained widths)")
    p.add_argument("--model", help="official checkpoints: our model name, e.g. slim_mobilenet_v2")
    p.add_argument(
        "--num-classes", type=positive_int, default=1000, help="official checkpoints: classes (default 1000)"
    )
    p.add_argument("--small-input", action="store_true", help="official checkpoints: stride-1 stem (28-32 px)")
    p.add_argument("--image-size", type=positive_int, help="input side in pixels (default: the dataset's / 224)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="evaluation batch size (default 256)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="data.KEY=VALUE",
        help="override a data setting of the saved recipe, e.g. --set data.val_size=5000",
    )
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument(
        "--workers", type=non_negative_int, help="data-loading processes (default: 0 in memory, else min(4, CPU count))"
    )
    p.add_argument(
        "--latency-runs", type=non_negative_int, default=20, help="timed batch-1 forward passes per width (0: skip)"
    )
    p.add_argument("--data-cache", metavar="DIR", help="where datasets are downloaded (~/.cache/slimmable)")
    p.add_argument("--out", metavar="STEM", help="write STEM.json and STEM.csv (default: beside the checkpoint)")
    p.set_defaults(func=run)


def _load(args: argparse.Namespace, device: torch.device) -> tuple[Any, DataConfig, str]:
    """The model, the data settings and a description of the checkpoint."""
    from ..checkpoint import load_model

    loaded = load_model(
        args.checkpoint,
        args.model,
        widths=parse_widths(args.widths),
        num_classes=args.num_classes,
        small_input=args.small_input or None,
        device=device,
    )
    ckpt = loaded.checkpoint
    if ckpt is not None:
        if not ckpt.get("config") and args.dataset is None:  # e.g. `slimmable convert --out`: say what is evaluated
            logging.getLogger(__name__).warning(
                "%s holds no saved recipe, so it is evaluated on %s, the default dataset; give --dataset and --data to "
                "choose another",
                args.checkpoint,
                DataConfig().dataset,
            )
        cfg = RunConfig.from_dict(ckpt.get("config") or {}, source=f"recipe saved in {args.checkpoint}")
        return loaded.model, cfg.data, f"{loaded.name} (epoch {ckpt.get('epoch')})"
    return loaded.model, DataConfig(dataset="image_folder", augment="none"), f"{loaded.name} (official checkpoint)"


def run(args: argparse.Namespace) -> int:
    from ..data import create_loader
    from ..tasks import task_of
    from ..train import resolve_device, write_report

    device = resolve_device(args.device)
    model, data_cfg, desc = _load(args, device)
    section = apply_overrides({"data": _data_dict(data_cfg)}, args.overrides)
    if set(section) - {"data"}:
        raise ValueError("eval --set only takes data.* keys")
    data_cfg = RunConfig.from_dict(section, source="--set").data
    task = task_of(model)
    name = args.dataset or data_cfg.dataset
    if name not in task.datasets:
        raise ValueError(f"{desc} is a {task.name} model; evaluate it on {' or '.join(task.datasets)} data "
                         f"(--dataset), not {name}")  # fmt: skip
    # evaluation data: no augmentation; the training split only when --split val holds images out of it
    dc = dataclasses.replace(
        data_cfg, dataset=name, root=args.data or data_cfg.root, image_size=args.image_size or data_cfg.image_size,
        augment="none", hflip=False,
    )  # fmt: skip
    splits = task.load_data(RunConfig(data=dc), args.data_cache, load_train=args.split == "val")
    dataset = splits.val if args.split == "val" else splits.test
    if dataset is None:
        raise ValueError("--split val needs images held out from training: --set data.val_size=N (N > 0)")
    task.check_model(model, splits)
    widths = parse_widths(args.widths) or tuple(model.widths)
    workers = args.workers
    if workers is None:
        workers = min(4, os.cpu_count() or 1) if name == "image_folder" else 0
    loader = create_loader(dataset, args.batch_size, train=False, num_workers=workers,
                           pin_memory=device.type == "cuda", collate_fn=task.collate_fn())  # fmt: skip
    rows = task.report(model, task.validate(model, dataset, loader, widths, device=device), splits, args.latency_runs)
    stem = Path(args.out) if args.out else _default_stem(args.checkpoint, args.split)
    meta = {"checkpoint": str(args.checkpoint), "model": desc, "dataset": name, "root": splits.root,
            "split": args.split, "device": str(device), "task": task.name}  # fmt: skip
    json_path, csv_path = write_report(stem, rows, meta, columns=task.columns(rows))
    print(f"{desc} on {name} {args.split} ({len(dataset)} images, {splits.root}), device {device}")
    print(format_report_table(rows))
    print(f"wrote {json_path} and {csv_path}")
    return 0


def _data_dict(cfg: DataConfig) -> dict[str, Any]:
    return RunConfig(data=cfg).to_dict()["data"]


def _default_stem(checkpoint: str, split: str) -> Path:
    ckpt = Path(checkpoint)
    folder = ckpt.parent if os.access(ckpt.parent, os.W_OK) else Path.cwd()
    return folder / f"eval_{ckpt.stem}_{split}"
