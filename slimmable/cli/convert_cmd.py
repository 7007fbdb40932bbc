"""``slimmable convert torchvision/<arch>`` / ``timm/<arch>``: convert a zoo model, print the report and MACs per
width."""

from __future__ import annotations

import argparse

import torch

from ..checkpoint import model_checkpoint, save_checkpoint
from ..models import create_model, list_models
from ..search.cost import count_macs
from ._common import format_table, parse_widths, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="make a torchvision or timm model slimmable; print the conversion report and MACs per width",
        description="Build a torchvision or timm model (random weights, or your own with --weights; no download; "
        "timm needs slimmable[timm]) and convert it with slimmable.convert: "
        "coupled channels are found by tracing, layers become slimmable, what cannot be analysed stays at full "
        "width. Prints the report (groups slimmed, layers frozen and why) and the MACs at each width; --out "
        "saves a checkpoint that `slimmable eval/export --checkpoint` rebuild.",
    )
    p.add_argument("model", help="torchvision/<arch> or timm/<arch>, e.g. torchvision/resnet50, timm/efficientnet_b0")
    p.add_argument("--widths", help="comma-separated widths, the largest 1.0 (default 0.25,0.5,0.75,1.0)")
    p.add_argument(
        "--width-range",
        metavar="LO,1.0",
        help="universally slimmable instead of --widths: any width in [LO, 1.0] (US-Nets' BN, calibrated per width)",
    )
    p.add_argument("--stat-widths", metavar="W,...", help="with --width-range: widths keeping BN statistics")
    p.add_argument("--num-classes", type=positive_int, help="classifier outputs (default: the zoo's 1000)")
    p.add_argument("--in-chans", type=positive_int, help="input channels (default 3; others rebuild the first conv)")
    p.add_argument("--small-input", action="store_true", help="first convolution with stride 1 (28-32 px images)")
    p.add_argument("--input-size", type=positive_int, default=224, help="square input side for the MACs (default 224)")
    p.add_argument(
        "--weights",
        metavar="FILE",
        help="a state dict of the original model (torch.save(model.state_dict(), FILE)), read with weights_only=True "
        "and loaded strictly before conversion; it must fit --num-classes, --in-chans and --small-input",
    )
    p.add_argument("--out", metavar="PATH", help="save the converted model as a slimmable checkpoint")
    p.add_argument("--verbose-report", action="store_true", help="list every slimmed group")
    p.set_defaults(func=run)


def _check_model(name: str) -> None:
    """Refuse what convert does not take, in one line: registered models are slimmable already."""
    if name.startswith(("torchvision/", "timm/")):
        return
    takes = "convert takes a torchvision model, torchvision/<arch> (e.g. torchvision/resnet50), or a timm model, "
    takes += "timm/<arch> (e.g. timm/efficientnet_b0)"
    if name in list_models():
        raise ValueError(
            f"{name} is already slimmable (a registered model): use it directly (`slimmable train/profile/export`); "
            + takes
        )
    raise ValueError(f"{takes}, not {name!r}")


def run(args: argparse.Namespace) -> int:
    _check_model(args.model)
    span = parse_widths(args.width_range)
    if span is not None and (args.widths or len(span) != 2):
        raise ValueError(f"--width-range {args.width_range!r}: give two numbers LO,1.0 and no --widths")
    if args.stat_widths and span is None:
        raise ValueError("--stat-widths are the BN statistics widths of --width-range; give --width-range LO,1.0 too")
    widths = parse_widths(args.widths) or (None if span else (0.25, 0.5, 0.75, 1.0))
    model = create_model(
        args.model,
        widths=widths,
        width_range=span,
        stat_widths=parse_widths(args.stat_widths),
        num_classes=args.num_classes,
        in_chans=args.in_chans,
        small_input=args.small_input or None,
        weights=args.weights,
    )
    report = model.conversion_report
    print(report.format(max_lines=10_000 if args.verbose_report else 12))
    model.eval()
    x = torch.randn(1, args.in_chans or 3, args.input_size, args.input_size)
    rows = []
    for w in model.widths:
        with model.use_width(w):
            rows.append((f"{w:g}", f"{count_macs(model, x) / 1e6:.1f}"))
    print(f"MACs at {args.input_size}x{args.input_size}:")
    print(format_table(["width", "MACs (M)"], rows))
    if args.out:
        path = save_checkpoint(args.out, model_checkpoint(model))
        print(f"wrote {path}")
    return 0
