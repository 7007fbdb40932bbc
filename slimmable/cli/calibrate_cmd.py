"""``slimmable calibrate --checkpoint C --widths W``: re-estimate BatchNorm statistics and write a new checkpoint."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._common import format_table, non_negative_int, parse_widths, positive_int

_EPILOG = """\
examples:
  # a universally slimmable model: add statistics for widths it was not calibrated at
  slimmable calibrate --checkpoint runs/fmnist_us_mobilenet_v1/best.pt --widths 0.4,0.6
  slimmable eval --checkpoint runs/fmnist_us_mobilenet_v1/best_calibrated.pt --widths 0.4,0.6
  # a slimmable (S-Net) model: re-estimate its switches' statistics on more batches, in place
  slimmable calibrate --checkpoint runs/r/best.pt --batches 100 --out runs/r/best.pt
  # a per-layer channel spec (e.g. found by `slimmable search`): the network it picks out, ready to evaluate
  slimmable calibrate --checkpoint runs/fmnist_us_mobilenet_v1/best.pt --channels search_best/spec_10M.json
  slimmable eval --checkpoint runs/fmnist_us_mobilenet_v1/best_spec_10M_calibrated.pt

The training images come from the recipe saved in the checkpoint, without augmentation, in a fixed shuffled
order; the images it held out (data.val_size) are not used. The output is a new checkpoint (default: beside the
input, <name>_calibrated.pt) whose recorded model arguments include the new widths, so it reloads with their
statistics; the input is only overwritten when --out names it. With --channels the output is a checkpoint of the
fixed-channel network the spec picks out (the family `slimmable search` names, e.g. slim_mobilenet_v1 for
us_mobilenet_v1, one width 1.0), all of its BatchNorm statistics re-estimated for those channels.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="re-estimate BatchNorm statistics of a checkpoint at given widths (US-Nets: any width in the range)",
        description="BN calibration: for each width, reset the BatchNorm running statistics used at that width and "
        "re-estimate them as a cumulative average over training batches (no augmentation, no gradients; weights "
        "and other widths' statistics stay as they are). A universally slimmable model gains statistics for widths "
        "it had none for; a slimmable (S-Net) model re-estimates its switches.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint written by `slimmable train`")
    p.add_argument("--widths", help="comma-separated widths, e.g. 0.4,0.6 (default: every width the model has)")
    p.add_argument(
        "--channels", metavar="SPEC.json",
        help="a per-layer channel spec (from `slimmable search`) instead of --widths: write the network it picks out",
    )  # fmt: skip
    p.add_argument(
        "--batches", type=positive_int, metavar="N", help="training batches per width (default: train.calib_batches)"
    )
    p.add_argument("--batch-size", type=positive_int, help="images per batch (default: the recipe's data.batch_size)")
    p.add_argument("--out", metavar="PATH", help="output checkpoint (default: <checkpoint>_calibrated.pt beside it)")
    p.add_argument("--data", metavar="DIR", help="dataset folder (default: the one the checkpoint was trained on)")
    p.add_argument("--data-cache", metavar="DIR", help="where datasets are downloaded (~/.cache/slimmable)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument(
        "--workers", type=non_negative_int, help="data-loading processes (default: 0 in memory, else min(4, CPU count))"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the order of the calibration images (default 0)")
    p.set_defaults(func=run)


def default_output(checkpoint: str | os.PathLike[str], spec: str | os.PathLike[str] | None = None) -> Path:
    """``runs/x/best.pt`` → ``runs/x/best_calibrated.pt`` (with a spec ``s.json``: ``best_s_calibrated.pt``)."""
    p = Path(checkpoint)
    tag = f"_{Path(spec).stem}" if spec is not None else ""
    return p.with_name(f"{p.stem}{tag}_calibrated{p.suffix or '.pt'}")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import model_checkpoint, save_checkpoint
    from ..data import create_loader
    from ..train import calibrate_bn, evaluate, resolve_device
    from ._trained import load_trained, require_classifier, training_splits

    if args.batches is not None and args.batches < 1:
        raise ValueError(f"--batches {args.batches}: give at least 1 batch per width")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.channels and args.widths:
        raise ValueError("give --widths or --channels, not both: a channel spec fixes every layer's channels")
    spec = None
    if args.channels:
        from ..search.autoslim import load_channel_spec

        spec = load_channel_spec(args.channels)  # before the data: a bad spec path fails fast
    device = resolve_device(args.device)
    ckpt, model, cfg = load_trained(args.checkpoint, device)
    require_classifier(model, "calibrate")
    widths = parse_widths(args.widths) or tuple(model.widths)
    out = Path(args.out) if args.out else default_output(args.checkpoint, args.channels)
    splits = training_splits(cfg, args.data, args.data_cache)
    assert splits.train is not None
    batch_size = args.batch_size or cfg.data.batch_size
    num_batches = args.batches or cfg.train.calib_batches
    workers = args.workers
    if workers is None:
        workers = min(4, os.cpu_count() or 1) if cfg.data.dataset == "image_folder" else 0
    loader = create_loader(
        splits.train, min(batch_size, len(splits.train)), train=True, num_workers=workers, seed=args.seed,
        pin_memory=device.type == "cuda",
    )  # fmt: skip

    def heldout_top1(m: Any, ws: list[float]) -> dict[float, float]:
        """Top-1 on the images the recipe held out from training (none: empty)."""
        if splits.val is None:
            return {}
        val_loader = create_loader(splits.val, batch_size, train=False, num_workers=workers)
        return {r.width: r.top1 for r in evaluate(m, val_loader, ws, device=device)}

    if spec is not None:
        return _calibrate_spec(args, ckpt, model, cfg, spec, loader, num_batches, splits, out, device, heldout_top1)
    used = calibrate_bn(model, loader, widths, num_batches=num_batches, device=device)

    new = {**ckpt, **model_checkpoint(model)}
    history = list(ckpt.get("calibration") or [])
    history.append({"widths": list(used), "images_per_width": used, "batch_size": loader.batch_sampler.batch_size,
                    "seed": args.seed, "source": str(args.checkpoint)})  # fmt: skip
    new["calibration"] = history
    save_checkpoint(out, new)

    top1 = heldout_top1(model, list(used))
    rows = [(f"{w:g}", n, "-" if w not in top1 else f"{top1[w]:.2f}") for w, n in used.items()]
    print(f"{ckpt['model_name']}: calibrated BN statistics on training images of {splits.root} (no augmentation)")
    print(format_table(["width", "images", f"held-out top-1 % ({len(splits.val) if splits.val else 0} images)"], rows))
    print(f"model widths now: {', '.join(f'{w:g}' for w in model.widths)}")
    print(f"wrote {out}")
    if splits.val is None:
        print("(the recipe held out no images, data.val_size 0: evaluate with `slimmable eval --checkpoint OUT`)")
    return 0


def _calibrate_spec(
    args: argparse.Namespace, ckpt: dict, model: Any, cfg: Any, spec: dict[str, int], loader: Any,
    num_batches: int, splits: Any, out: Path, device: Any, heldout_top1: Callable[[Any, list[float]], dict],
) -> int:  # fmt: skip
    """``--channels``: write a checkpoint of the fixed-channel network the spec picks out, statistics re-estimated."""
    import dataclasses

    import torch

    from ..checkpoint import model_checkpoint, save_checkpoint
    from ..search import count_active_params, count_macs
    from ..train import calibrate_channels

    fixed = calibrate_channels(model, spec, loader, num_batches=num_batches, device=device)
    recipe = dataclasses.replace(
        cfg.model, name=fixed.model_name, widths=(1.0,), width_range=None, stat_widths=None, channels=args.channels
    )
    new = model_checkpoint(
        fixed,
        preprocess=ckpt.get("preprocess"),
        config=dataclasses.replace(cfg, model=recipe).to_dict(),
        calibration=[{"channels": str(args.channels), "images": fixed.calibration["images"], "seed": args.seed,
                      "batch_size": loader.batch_sampler.batch_size, "source": str(args.checkpoint)}],
    )  # fmt: skip
    save_checkpoint(out, new)
    probe = torch.zeros(1, splits.in_chans, splits.image_size, splits.image_size, device=device)
    macs, params = count_macs(fixed, probe), count_active_params(fixed, probe)
    held = heldout_top1(fixed, [1.0])
    top1 = f"{held[1.0]:.2f}" if held else "-"
    print(f"{ckpt['model_name']} at the channels of {args.channels}: {fixed.model_name}, BN statistics re-estimated "
          f"on {fixed.calibration['images']} training images of {splits.root} (no augmentation)")  # fmt: skip
    n_val = len(splits.val) if splits.val is not None else 0
    print(format_table(["MACs", "params", f"held-out top-1 % ({n_val} images)"],
                       [(f"{macs / 1e6:.2f}M", f"{params / 1e6:.3f}M", top1)]))  # fmt: skip
    print(f"wrote {out}")
    return 0
