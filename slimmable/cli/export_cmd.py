"""``slimmable export``: a width (or ChannelSpec) of a slimmable model as a dense file in any registered format
(ONNX, TorchScript, torch.export, OpenVINO, pickled module; :mod:`slimmable.export.registry`), or every width as an
NVIDIA Triton model repository (``--format triton``, :mod:`slimmable.export.triton_repo`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..export import default_widths, export_bundle, export_triton, get_exporter, list_exporters
from ..export._io import _is_detection, spec_tag, width_tag
from ..export.triton_repo import TRITON_BACKENDS, TRITON_FORMAT
from ..search.autoslim import load_channel_spec
from ._common import format_table, non_negative_int, parse_widths, positive_int
from ._deploy import _load_model, add_model_args, describe_source

#: ``--format`` values that are not registry entries: they write a folder of every width, not a file per width
REPOSITORY_FORMATS = (TRITON_FORMAT,)
#: the Triton options' defaults (``None`` in argparse, so that giving them with another format is refused)
_TRITON_DEFAULTS = {"triton_backend": "onnxruntime", "max_batch_size": 8}


def add_parser(sub: argparse._SubParsersAction) -> None:
    formats = [*list_exporters(), *REPOSITORY_FORMATS]
    p = sub.add_parser(
        "export",
        help=f"export widths as plain dense models ({', '.join(formats)})",
        description="Export a slimmable model at one or more widths (or a per-layer ChannelSpec) as ordinary dense "
        "models: ONNX (checked against PyTorch with onnxruntime, dynamic batch), TorchScript, torch.export (.pt2), "
        "OpenVINO IR (.xml + .bin) or a pickled nn.Module; every file is run back and compared with PyTorch. "
        "--bundle writes every width plus manifest.json with MACs and measured latency. Files are named "
        "MODEL_wWIDTH.EXT (MODEL_cHASH.EXT for a ChannelSpec). --format triton writes an NVIDIA Triton model "
        "repository into --out: the model with one version per width (width x 100; x 10000 for widths such as "
        "0.0625) and a router model that picks the width per request (parameters width or latency_budget_ms).",
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
    p.add_argument(
        "--latency-runs",
        type=non_negative_int,
        default=20,
        help="--bundle, --format triton: timed runs per width (0 skips; a Triton router then takes no budgets)",
    )
    t = p.add_argument_group("--format triton")
    t.add_argument(
        "--triton-backend",
        choices=TRITON_BACKENDS,
        help="what runs each width: Triton's ONNX Runtime backend (default), or onnxruntime in its Python backend "
        "(Triton builds without the ONNX Runtime backend, e.g. nvidia-pytriton's)",
    )
    t.add_argument("--max-batch-size", type=positive_int, help="the configs' max_batch_size (default 8)")
    t.add_argument("--name", help="the Triton model name (default: the model's name; the router's is NAME_router)")
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
    if args.format == TRITON_FORMAT:
        return _run_triton(args)
    given = [f"--{k.replace('_', '-')}" for k in (*_TRITON_DEFAULTS, "name") if getattr(args, k) is not None]
    if given:
        them = "it" if len(given) == 1 else "them"
        raise ValueError(f"{', '.join(given)}: for --format triton only; drop {them} (or pass --format triton)")
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


def _run_triton(args: argparse.Namespace) -> int:
    """``--format triton``: every width of the model into the Triton model repository ``--out``."""
    if args.channels or args.bundle:
        flag = "--channels" if args.channels else "--bundle"
        raise ValueError(
            f"{flag} does not apply to --format triton, which writes every width (or --width) as versions of one "
            f"model; drop {flag}"
        )
    onnx = get_exporter("onnx")
    try:  # before loading anything
        onnx.require(verify=not args.no_verify or args.latency_runs > 0)
    except ImportError as err:
        raise ValueError(f"{err} (Triton repositories hold ONNX files)") from err
    loaded = _load_model(args)
    model = loaded.model
    print(describe_source(loaded))
    if _is_detection(model):
        raise ValueError(
            "--format triton takes classifiers and segmenters; export a detector's widths with --format onnx "
            "(or --format pt)"
        )
    pre = loaded.preprocess or {}
    size = args.input_size or pre.get("image_size") or (32 if args.small_input else 224)
    options = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in _TRITON_DEFAULTS.items()}
    repo = export_triton(
        model,
        args.out,
        parse_widths(args.width) or default_widths(model),
        name=args.name or loaded.name.replace("/", "_"),
        input_size=size,
        fold_bn=args.fold_bn,
        opset=args.opset,
        exporter=args.exporter,
        verify=not args.no_verify,
        latency_runs=args.latency_runs,
        **options,
    )
    rows = []
    for version, w in repo.versions.items():
        diff, ms = repo.max_abs_diff[version], repo.latency_ms[version]
        rows.append(
            (f"{w:g}", str(version), "-" if diff is None else f"{diff:.2e}", "-" if ms is None else f"{ms:.3f}")
        )
    print(format_table(["width", "version", "max diff vs PyTorch", "onnxruntime ms (b1)"], rows))
    print(
        f"wrote Triton models {repo.model!r} ({len(rows)} versions, {repo.backend} backend) and {repo.router!r} into "
        f"{repo.path}; serve with: tritonserver --model-repository={repo.path.resolve()}"
    )
    return 0
