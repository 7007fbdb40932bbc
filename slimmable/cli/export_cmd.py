"""``slimmable export``: a width (or ChannelSpec) of a slimmable model as a dense file in any registered format
(ONNX, TorchScript, torch.export, OpenVINO, pickled module; :mod:`slimmable.export.registry`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..export import default_widths, export_bundle, get_exporter, list_exporters
from ..export._io import _is_detection, spec_tag, width_tag
from ..search.autoslim import load_channel_spec
from ._common import format_table, non_negative_int, parse_widths, positive_int
from ._deploy import _load_model, add_model_args, describe_source


def add_parser(sub: argparse._SubParsersAction) -> None:
    formats = list_exporters()
    p = sub.add_parser(
        "export",
        help=f"export widths as plain dense models ({', '.join(formats)})",
        description="Export a slimmable model at one or more widths (or a per-layer ChannelSpec) as ordinary dense "
        "models: ONNX (checked against PyTorch with onnxruntime, dynamic batch), TorchScript, torch.export (.pt2), "
        "OpenVINO IR (.xml + .bin) or a pickled nn.Module; every file is run back and compared with PyTorch. "
        "--bundle writes every width plus manifest.json with MACs and measured latency. Files are named "
        "MODEL_wWIDTH.EXT (MODEL_cHASH.EXT for a ChannelSpec).",
    )
    add_model_args(p)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--width", help="comma-separated widths to export (default: all the model's widths)")
    what.add_argument("--channels", metavar="SPEC", help="a ChannelSpec file (JSON/YAML) from the channel search")
    p.add_argument("--format", choices=formats, default="onnx", help="output format (default onnx)")
    p.add_argument("--bundle", action="store_true", help="every width in --format + manifest.json (MACs, latency)")
    p.add_argument("--out", default="exported", help="output folder (default ./exported)")
    p.add_argument(
        "--input-size", type=positive_int, help="input side in pixels (default: checkpoint's, else 224; 32 small)"
    )
    p.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into the convolutions (inference only)")
    p.add_argument(
        "--opset", type=positive_int, help="ONNX opset (default: 18 dynamo exporter, 17 TorchScript exporter)"
    )
    p.add_argument(
        "--exporter",
        choices=("auto", "dynamo", "torchscript"),
        default="auto",
        help="ONNX exporter: dynamo (PyTorch's default, needs onnxscript) or the deprecated TorchScript one",
    )
    p.add_argument("--no-verify", action="store_true", help="skip checking the file against PyTorch")
    p.add_argument("--latency-runs", type=non_negative_int, default=20, help="--bundle: timed runs per width (0 skips)")
    p.set_defaults(func=run)


def _check_detector_args(args: argparse.Namespace) -> None:
    """Refuse what a detector export does not offer, naming the alternative."""
    if args.bundle or args.channels or args.fold_bn:
        flag = "--bundle" if args.bundle else "--channels" if args.channels else "--fold-bn"
        raise ValueError(f"{flag} is not offered for detectors; export widths with --width (ONNX or --format pt)")
    if not get_exporter(args.format).detection:
        ok = " or ".join(f"--format {n}" for n in list_exporters(detection=True))
        raise ValueError(f"detectors export with {ok}, not --format {args.format}")


def run(args: argparse.Namespace) -> int:
    target = get_exporter(args.format)
    try:  # before loading anything: name the pip command for what this install lacks
        target.require(verify=args.bundle or not args.no_verify)
    except ImportError as err:
        here = ", ".join(list_exporters(available=True))
        raise ValueError(f"{err} (formats installed here: {here})") from err
    onnx_opts = {"opset": args.opset, "exporter": args.exporter} if target.name == "onnx" else {}
    loaded = _load_model(args)
    model = loaded.model
    print(describe_source(loaded))
    pre = loaded.preprocess or {}
    size = args.input_size or pre.get("image_size") or (32 if args.small_input else 224)
    out = Path(args.out)
    if _is_detection(model):
        _check_detector_args(args)
        size = args.input_size  # None: the side the detector resizes images to
    if args.bundle:
        if args.channels:
            raise ValueError("--bundle exports widths; drop --channels (or export the spec without --bundle)")
        widths = parse_widths(args.width) or default_widths(model)
        manifest = export_bundle(
            model,
            out,
            widths,
            name=loaded.name,
            input_size=size,
            fold_bn=args.fold_bn,
            format=target.name,
            latency_runs=args.latency_runs,
            **onnx_opts,
        )
        print(f"wrote {len(widths)} {target.title} files and {manifest}")
        return 0
    stem = loaded.name.replace("/", "_")  # torchvision/<arch> names a file, not a folder
    jobs: list[tuple[str, dict]] = []
    if args.channels:
        spec = load_channel_spec(args.channels)
        jobs.append((f"{stem}_{spec_tag(spec)}{target.suffix}", {"channels": spec}))
    else:
        for w in parse_widths(args.width) or default_widths(model):
            jobs.append((f"{stem}_{width_tag(w)}{target.suffix}", {"width": w}))
    rows = []
    for filename, what in jobs:
        path = out / filename
        res = target.export(
            model, path, input_size=size, fold_bn=args.fold_bn, verify=not args.no_verify, **what, **onnx_opts
        )
        label = f"{what['width']:g}" if "width" in what else args.channels
        diff = "-" if res.max_abs_diff is None else f"{res.max_abs_diff:.2e}"
        size_mb = sum(f.stat().st_size for f in target.files(path)) / 1e6
        rows.append((label, str(path), f"{size_mb:.2f}", diff))
    print(format_table(["width", "file", "MB", "max diff vs PyTorch"], rows))
    return 0
