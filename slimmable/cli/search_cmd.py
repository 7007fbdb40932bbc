"""``slimmable search --checkpoint C --budgets 150M,325M``: AutoSlim channel search, one ChannelSpec per budget."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import torch

from .._utils import write_json
from ._common import format_table, positive_int

_EPILOG = """\
examples:
  slimmable search --checkpoint runs/fmnist_us_mobilenet_v1/best.pt --budgets 10M,20M
  slimmable search --checkpoint runs/imagenet_us_mbv1/best.pt --budgets 150M,325M --heldout 2048
  slimmable search --checkpoint runs/imagenet_us_mbv1/best.pt --budgets 150M,325M --resume   # after Ctrl-C
  slimmable search --checkpoint C --metric params --budgets 2.5M      # parameters
  slimmable search --checkpoint C --metric latency --budgets 12ms     # batch-1 latency on --device

budgets: MACs (flops) or parameters with an optional K/M/G suffix (150M, 1.2G, 5e6), latency in ms (12ms, 12).
Candidates are ranked by top-1 on held-out images carved from the training set (the recipe's data.val_size
images, else a fixed-seed subset of --heldout training images), never the test set. Outputs in --out:
spec_<budget>.json (layer name -> channels, with meta), search_state.json (resumable), search_args.json.
Build a found network for training from scratch with
  slimmable.create_model("slim_mobilenet_v1", channels=slimmable.search.autoslim.load_channel_spec(PATH), ...)
"""

_SUFFIX = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"


def parse_budget(text: str, metric: str = "flops") -> float:
    """A budget as a number: MACs or parameters for ``flops``/``params``, milliseconds for ``latency``.

    ``150M`` → 1.5e8, ``1.2G`` → 1.2e9, ``5e6`` → 5e6, ``2.5k`` → 2500; latency ``12ms`` / ``12`` → 12.0,
    ``0.012s`` → 12.0.

    Raises:
        ValueError: malformed text, a unit that does not fit the metric, or a budget that is not positive.
    """
    t = text.strip()
    if metric == "latency":
        m = re.fullmatch(rf"({_NUMBER})\s*(ms|s)?", t)
        if not m:
            raise ValueError(f"latency budget {text!r}: give milliseconds such as 12ms, 12 or 0.012s")
        value = float(m.group(1)) * (1000.0 if m.group(3) == "s" else 1.0)
    elif metric in ("flops", "params"):
        m = re.fullmatch(rf"({_NUMBER})\s*([kKMGT]?)", t)
        if not m:
            what = "MACs" if metric == "flops" else "parameters"
            raise ValueError(f"{metric} budget {text!r}: give {what} such as 150M, 1.2G, 5e6 or 2.5M (suffix K/M/G)")
        value = float(m.group(1)) * _SUFFIX[m.group(3).upper()]
    else:
        raise ValueError(f"metric {metric!r} is not one of flops, params, latency")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"budget {text!r} must be a positive number")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search",
        help="AutoSlim: greedy per-layer channel search of a trained slimmable / US model, one spec per budget",
        description="AutoSlim channel search. Starting from the widest network, each step shrinks the channel "
        "group (layers tied by residual additions move together) whose reduction costs the least top-1 on held-out "
        "training images, until every budget is met; the first network within each budget is written as a "
        "ChannelSpec (JSON, keyed by module name). The state is saved after every step: continue an interrupted "
        "search with --resume.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint written by `slimmable train`")
    p.add_argument("--budgets", required=True, help="comma-separated budgets, e.g. 150M,325M (see below)")
    p.add_argument("--metric", choices=("flops", "params", "latency"), default="flops", help="cost (default flops)")
    p.add_argument(
        "--heldout", type=positive_int, default=1000, metavar="N", help="held-out images to rank on (default 1000)"
    )
    p.add_argument(
        "--split",
        choices=("val", "train", "test"),
        default="val",
        help="val: the recipe's held-out images (data.val_size), else a fixed-seed subset of the training images "
        "(default); train: always a fixed-seed subset of the training images; test: refused (it would select on "
        "the test set)",
    )
    p.add_argument(
        "--steps", type=positive_int, default=12, help="notches per layer of a universally slimmable model (12)"
    )
    p.add_argument("--batch-size", type=positive_int, default=256, help="held-out batch size (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out subset (default 0)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: search_<checkpoint name> beside it)")
    p.add_argument("--resume", action="store_true", help="continue the search whose state is in --out")
    p.add_argument("--data", metavar="DIR", help="dataset folder (default: the one the checkpoint was trained on)")
    p.add_argument("--data-cache", metavar="DIR", help="where datasets are downloaded (~/.cache/slimmable)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.set_defaults(func=run)


def _heldout_batches(
    splits: Any, split: str, n: int, batch_size: int, seed: int
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], str]:
    """Held-out ``(images, labels)`` batches from the training data, and a description of where they came from."""
    from ..data import create_loader

    _refuse_test(split)
    if split == "val" and splits.val is not None:
        source, what = splits.val, f"the held-out split of {splits.root} (data.val_size)"
    else:
        source, what = splits.train, f"a fixed-seed subset of the training images of {splits.root}"
    assert source is not None
    count = min(n, len(source))
    idx = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    subset = source.view(idx) if hasattr(source, "view") else torch.utils.data.Subset(source, idx.tolist())
    loader = create_loader(subset, min(batch_size, count), train=False)
    batches = [(x, y) for x, y in loader]
    return batches, f"{count} images from {what}"


def _refuse_test(split: str) -> None:
    if split == "test":
        raise ValueError(
            "--split test: the search would pick channels by their accuracy on the test images, and the found "
            "networks' test accuracy would then be optimistic; use --split val (the images the recipe held out "
            "from training) or --split train"
        )


def _budget_tag(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]", "_", text.strip())


def _fmt_cost(value: float, metric: str) -> str:
    if metric == "latency":
        return f"{value:.3f} ms"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if value >= div:
            return f"{value / div:.3f}{suffix}"
    return f"{value:g}"


def run(args: argparse.Namespace) -> int:
    from ..search.autoslim import autoslim_search, save_channel_spec
    from ..train import fixed_channels_name, resolve_device
    from ._trained import load_trained, require_classifier, training_splits

    texts = [t for t in args.budgets.split(",") if t.strip()]
    if not texts:
        raise ValueError("--budgets: give at least one budget, e.g. --budgets 150M,325M")
    budgets: dict[float, str] = {}
    for t in texts:
        budgets.setdefault(parse_budget(t, args.metric), t.strip())
    if args.heldout < 1:
        raise ValueError(f"--heldout {args.heldout}: give at least 1 image")
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps}: must be >= 1")
    _refuse_test(args.split)  # before anything is loaded
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / f"search_{Path(args.checkpoint).stem}"
    state_path, args_path = out / "search_state.json", out / "search_args.json"
    settings = {"checkpoint": str(Path(args.checkpoint).resolve()), "metric": args.metric, "split": args.split,
                "heldout": args.heldout, "seed": args.seed, "steps": args.steps}  # fmt: skip
    if args.resume:
        if not state_path.exists():
            raise ValueError(f"--resume: {out} holds no search state ({state_path.name}); run without --resume")
        saved = json.loads(args_path.read_text()) if args_path.exists() else {}
        changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in settings.items() if saved.get(k) != v]
        if changed:
            raise ValueError(
                f"--resume: the search in {out} ran with other settings ({'; '.join(changed)}); resume with the "
                "same ones, or pick another --out"
            )
    elif state_path.exists():
        raise ValueError(
            f"{out} already holds a search ({state_path.name}); continue it with --resume, or pick another --out"
        )

    device = resolve_device(args.device)
    ckpt, model, cfg = load_trained(args.checkpoint, device)
    require_classifier(model, "search")
    if not hasattr(model, "channel_groups"):
        raise ValueError(f"{ckpt['model_name']} defines no channel groups; search MobileNet v1/v2 models")
    splits = training_splits(cfg, args.data, args.data_cache)
    batches, where = _heldout_batches(splits, args.split, args.heldout, args.batch_size, args.seed)
    input_size = (splits.in_chans, splits.image_size, splits.image_size)
    write_json(args_path, settings)
    pending = ", ".join(budgets[b] for b in sorted(budgets, reverse=True))
    print(f"searching {ckpt['model_name']} for {args.metric} budgets {pending}; held-out: {where}; device {device}")
    if args.resume:
        print(f"resuming from {state_path}")

    cost_name = {"flops": "MACs", "params": "params", "latency": "latency"}[args.metric]

    def progress(step: dict[str, Any]) -> None:
        print(
            f"step {step['step']:4d}: {step['group']} -> {step['channels']} channels, {cost_name} "
            f"{_fmt_cost(step['cost'], args.metric)}, held-out top-1 {100 * step['accuracy']:.2f}%",
            flush=True,
        )

    result = autoslim_search(
        model, batches, list(budgets), metric=args.metric, input_size=input_size, steps=args.steps,
        state_path=state_path, progress=progress,
    )  # fmt: skip
    rows = []
    for value in sorted(budgets, reverse=True):
        text = budgets[value]
        found = result.found.get(f"{value:g}")
        if found is None:
            rows.append((text, "not reached", "-", "-", "-"))
            continue
        path = out / f"spec_{_budget_tag(text)}.json"
        meta = {
            "model": fixed_channels_name(ckpt["model_name"]),
            "searched_model": ckpt["model_name"],
            "checkpoint": str(args.checkpoint),
            "num_classes": ckpt["model_kwargs"].get("num_classes"),
            "in_chans": ckpt["model_kwargs"].get("in_chans"),
            "small_input": ckpt["model_kwargs"].get("small_input"),
            "input_size": list(input_size),
            "metric": args.metric,
            "budget": value,
            "budget_text": text,
            "cost": found["cost"],
            "heldout_top1": 100.0 * found["accuracy"],
            "heldout": where,
            "step": found["step"],
        }
        save_channel_spec(path, found["spec"], meta)
        rows.append((text, _fmt_cost(found["cost"], args.metric), f"{100 * found['accuracy']:.2f}", found["step"],
                     str(path)))  # fmt: skip
    label = {"flops": "MACs", "params": "params", "latency": "latency b1"}[args.metric]
    print(format_table(["budget", label, "held-out top-1 %", "step", "spec"], rows))
    if any(r[1] == "not reached" for r in rows):
        print("some budgets were not reached: every layer is at its narrowest", file=sys.stderr)
        return 1
    return 0
