"""``slimmable profile MODEL``: MACs, active parameters and latency at each width."""

from __future__ import annotations

import argparse

import torch

from .._utils import write_json
from ..models import create_model
from ..search.cost import profile_widths
from ._common import format_table, parse_widths


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="MACs, active parameters and latency of a model at each width",
        description="Profile a slimmable model at each width: MACs (torch.utils.flop_counter, FLOPs/2), the "
        "parameters a forward pass at that width uses, and median CPU/GPU latency.",
    )
    p.add_argument("model", help="registered model name, e.g. slim_mobilenet_v2 (see `slimmable list`)")
    p.add_argument("--widths", help="comma-separated widths to build and profile (default: the model's)")
    p.add_argument("--input-size", type=int, default=224, help="square input side in pixels (default 224)")
    p.add_argument("--in-chans", type=int, default=3, help="input channels (default 3)")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default 1000)")
    p.add_argument("--small-input", action="store_true", help="build the stride-1 stem for 28-32 px images")
    p.add_argument("--batch-size", type=int, default=1, help="batch size for latency (default 1)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per width; 0 skips latency (default 20)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    widths = parse_widths(args.widths)
    model = create_model(
        args.model,
        widths=widths,
        num_classes=args.num_classes,
        in_chans=args.in_chans,
        small_input=args.small_input or None,
    )
    model.to(torch.device(args.device)).eval()
    profiles = profile_widths(model, args.input_size, batch_size=args.batch_size, latency_runs=args.runs)
    rows = [
        (
            p.width,
            f"{p.macs / 1e6:.1f}",
            f"{p.params / 1e6:.3f}",
            None if p.latency_ms is None else f"{p.latency_ms:.2f}",
        )
        for p in profiles
    ]
    print(f"{args.model} at {args.input_size}x{args.input_size}, {args.num_classes} classes, device {args.device}")
    print(format_table(["width", "MACs (M)", "params (M)", f"latency b{args.batch_size} (ms)"], rows))
    if args.json:
        path = write_json(args.json, {"model": args.model, "profiles": [p.to_dict() for p in profiles]})
        print(f"wrote {path}")
    return 0


def _ms(value: float | None) -> str | None:
    return None if value is None else f"{value:.2f}"
