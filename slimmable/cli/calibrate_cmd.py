"""``slimmable calibrate --checkpoint C --widths W``: re-estimate BatchNorm statistics and write a new checkpoint."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ._common import format_table, parse_widths

_EPILOG = """\
examples:
  # a universally slimmable model: add statistics for widths it was not calibrated at
  slimmable calibrate --checkpoint runs/fmnist_us_mobilenet_v1/best.pt --widths 0.4,0.6
  slimmable eval --checkpoint runs/fmnist_us_mobilenet_v1/best_calibrated.pt --widths 0.4,0.6
  # a slimmable (S-Net) model: re-estimate its switches' statistics on more batches, in place
  slimmable calibrate --checkpoint runs/r/best.pt --batches 100 --out runs/r/best.pt

The training images come from the recipe saved in the checkpoint, without augmentation, in a fixed shuffled
order; the images it held out (data.val_size) are not used. The output is a new checkpoint (default: beside the
input, <name>_calibrated.pt) whose recorded model arguments include the new widths, so it reloads with their
statistics; the input is only overwritten when --out names it.
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
    p.add_argument("--batches", type=int, metavar="N", help="training batches per width (default: train.calib_batches)")
    p.add_argument("--batch-size", type=int, help="images per batch (default: the recipe's data.batch_size)")
    p.add_argument("--out", metavar="PATH", help="output checkpoint (default: <checkpoint>_calibrated.pt beside it)")
    p.add_argument("--data", metavar="DIR", help="dataset folder (default: the one the checkpoint was trained on)")
    p.add_argument("--data-cache", metavar="DIR", help="where datasets are downloaded (~/.cache/slimmable)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--workers", type=int, help="data-loading processes (default: 0 in memory, else min(4, CPU count))")
    p.add_argument("--seed", type=int, default=0, help="seed of the order of the calibration images (default 0)")
    p.set_defaults(func=run)


def default_output(checkpoint: str | os.PathLike[str]) -> Path:
    """``runs/x/best.pt`` → ``runs/x/best_calibrated.pt``."""
    p = Path(checkpoint)
    return p.with_name(f"{p.stem}_calibrated{p.suffix or '.pt'}")


def run(args: argparse.Namespace) -> int:
    from ..data import create_loader
    from ..train import calibrate_bn, evaluate, resolve_device, save_checkpoint
    from ._trained import load_trained, training_splits

    if args.batches is not None and args.batches < 1:
        raise ValueError(f"--batches {args.batches}: give at least 1 batch per width")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be >= 1")
    device = resolve_device(args.device)
    ckpt, model, cfg = load_trained(args.checkpoint, device)
    widths = parse_widths(args.widths) or tuple(model.widths)
    out = Path(args.out) if args.out else default_output(args.checkpoint)
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
    used = calibrate_bn(model, loader, widths, num_batches=num_batches, device=device)

    new = dict(ckpt)
    new["model"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    new["model_kwargs"] = dict(getattr(model, "model_kwargs", None) or ckpt["model_kwargs"])
    new["widths"] = list(model.widths)
    history = list(ckpt.get("calibration") or [])
    history.append({"widths": list(used), "images_per_width": used, "batch_size": loader.batch_sampler.batch_size,
                    "seed": args.seed, "source": str(args.checkpoint)})  # fmt: skip
    new["calibration"] = history
    save_checkpoint(out, new)

    top1: dict[float, float] = {}
    if splits.val is not None:
        val_loader = create_loader(splits.val, batch_size, train=False, num_workers=workers)
        top1 = {m.width: m.top1 for m in evaluate(model, val_loader, list(used), device=device)}
    rows = [(f"{w:g}", n, "-" if w not in top1 else f"{top1[w]:.2f}") for w, n in used.items()]
    print(f"{ckpt['model_name']}: calibrated BN statistics on training images of {splits.root} (no augmentation)")
    print(format_table(["width", "images", f"held-out top-1 % ({len(splits.val) if splits.val else 0} images)"], rows))
    print(f"model widths now: {', '.join(f'{w:g}' for w in model.widths)}")
    print(f"wrote {out}")
    if splits.val is None:
        print("(the recipe held out no images, data.val_size 0: evaluate with `slimmable eval --checkpoint OUT`)")
    return 0
