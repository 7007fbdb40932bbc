"""``slimmable profile MODEL``: MACs, active parameters and latency at each width."""

from __future__ import annotations

import argparse

import torch

from .._utils import write_json
from ..models import create_model
from ..search.cost import profile_widths
from ..tasks import task_of
from ._common import format_table, non_negative_int, parse_widths, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="MACs, active parameters and latency of a model at each width",
        description="Profile a slimmable model at each width: MACs (torch.utils.flop_counter, FLOPs/2), the "
        "parameters a forward pass at that width uses, and median CPU/GPU latency. Detectors (slim_*rcnn_*) are "
        "profiled whole on one image at the side their transform resizes to (128 for the small variants, 800 for "
        "R-50-FPN), with MACs per part (backbone, FPN, RPN, RoI heads).",
    )
    p.add_argument("model", help="registered model name, e.g. slim_mobilenet_v2 (see `slimmable list`)")
    p.add_argument("--widths", help="comma-separated widths to build and profile (default: the model's)")
    p.add_argument(
        "--input-size",
        type=positive_int,
        help="square input side in pixels (default 224; detectors: their resize side, set with --min-size)",
    )
    p.add_argument(
        "--min-size", type=positive_int, help="detectors: the side images are resized to (min_size = max_size)"
    )
    p.add_argument("--in-chans", type=positive_int, help="input channels (default 3; small detectors 1)")
    p.add_argument(
        "--num-classes", type=positive_int, help="classifier outputs (default 1000; detectors: their default)"
    )
    p.add_argument("--small-input", action="store_true", help="build the stride-1 stem for 28-32 px images")
    p.add_argument("--batch-size", type=positive_int, default=1, help="batch size for latency (default 1)")
    p.add_argument(
        "--runs", type=non_negative_int, default=20, help="timed runs per width; 0 skips latency (default 20)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    widths = parse_widths(args.widths)
    kwargs = {"widths": widths, "num_classes": args.num_classes, "in_chans": args.in_chans}
    if args.min_size is not None:  # detectors only (a classification model refuses it, naming the argument)
        kwargs.update(min_size=args.min_size, max_size=args.min_size)
    model = create_model(args.model, **kwargs, small_input=args.small_input or None)
    model.to(torch.device(args.device)).eval()
    task = task_of(model)
    if task.resizes_inputs and args.input_size is not None and args.input_size != task.default_input_size(model):
        raise ValueError(
            f"{args.model} resizes every image to {task.default_input_size(model)} px, so --input-size "
            f"{args.input_size} would not change what it computes; use --min-size {args.input_size} instead"
        )
    if task.profile_parts(model) is not None:
        return _run_by_part(args, model)
    size = args.input_size or 224
    profiles = profile_widths(model, size, batch_size=args.batch_size, latency_runs=args.runs)
    rows = [
        (
            p.width,
            f"{p.macs / 1e6:.1f}",
            f"{p.params / 1e6:.3f}",
            None if p.latency_ms is None else f"{p.latency_ms:.2f}",
        )
        for p in profiles
    ]
    classes = args.num_classes or 1000
    print(f"{args.model} at {size}x{size}, {classes} classes, device {args.device}")
    print(format_table(["width", "MACs (M)", "params (M)", f"latency b{args.batch_size} (ms)"], rows))
    if args.json:
        path = write_json(args.json, {"model": args.model, "profiles": [p.to_dict() for p in profiles]})
        print(f"wrote {path}")
    return 0


def _run_by_part(args: argparse.Namespace, model: torch.nn.Module) -> int:
    """The table of a model whose task splits its cost (a detector): whole-model MACs, params and latency, and
    MACs per part."""
    task = task_of(model)
    parts = task.profile_parts(model) or ()
    profiles = profile_widths(model, batch_size=args.batch_size, latency_runs=args.runs)
    rows = [
        (
            p.width,
            f"{p.macs / 1e6:.1f}",
            *(f"{p.parts[k] / 1e6:.1f}" for k in parts),
            f"{p.params / 1e6:.3f}",
            _ms(p.latency_ms),
        )
        for p in profiles
    ]
    print(f"{args.model} {task.profile_caption(model, profiles[0].input_size)}, device {args.device}")
    lat = f"latency b{args.batch_size} (ms)"
    head = ["width", "MACs (M)", *(task.part_label(k) for k in parts), "params (M)", lat]
    print(format_table(head, rows))
    if args.json:
        path = write_json(args.json, {"model": args.model, "profiles": [p.to_dict() for p in profiles]})
        print(f"wrote {path}")
    return 0


def _ms(value: float | None) -> str | None:
    return None if value is None else f"{value:.2f}"
