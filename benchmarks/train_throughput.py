"""Training-step time: one Algorithm-1 step of slim_mobilenet_v2 vs the sum of dense steps at each width.

Algorithm 1 trains every width on every batch, so its natural yardstick is training the same architectures as
separate dense networks: one step of torchvision's ``mobilenet_v2(width_mult=w)`` for each width ``w``, added up.
Both sides see the same batch and do the same arithmetic (forward, cross-entropy, backward, SGD step). The
slimmable step is timed in several numerics variants against the dense reference in its default form (float32,
contiguous), as a user would run it; the dense models are also timed with channels_last + bf16, so the cost of
slimmability itself (like for like) is visible too.

Timings interleave slimmable and dense steps in rounds (the machine is shared and noisy) and report medians.

Usage:
    python benchmarks/train_throughput.py [--rounds 5] [--batch-size 16] [--image-size 224] [--compile]
        [--json benchmarks/train_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

import slimmable
from slimmable.train import train_step

WIDTHS = (1.0, 0.75, 0.5, 0.35)


def dense_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, bf16: bool = False
) -> None:
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(x)
    F.cross_entropy(logits.float(), y).backward()
    opt.step()


def slim_variant(
    widths: tuple[float, ...], x: torch.Tensor, y: torch.Tensor, channels_last: bool, bf16: bool, compile: bool
) -> Callable[[], None]:
    """A closure running one Algorithm-1 step of a fresh slim_mobilenet_v2 with the given numerics."""
    torch.manual_seed(0)
    model = slimmable.create_model("slim_mobilenet_v2", widths=widths)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    xs = x.contiguous(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    forward = torch.compile(model) if compile else model
    dtype = torch.bfloat16 if bf16 else None
    order = sorted(widths, reverse=True)

    def step() -> None:
        train_step(model, opt, xs, y, order, forward=forward, autocast_dtype=dtype)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--widths", default=",".join(f"{w:g}" for w in WIDTHS))
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (each: every variant, then dense)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", default="benchmarks/train_throughput.json", help="where to write the results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    widths = tuple(float(w) for w in args.widths.split(","))

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, 1000, (args.batch_size,), generator=g)

    variants: dict[str, Callable[[], None]] = {
        "slim fp32": slim_variant(widths, x, y, channels_last=False, bf16=False, compile=False),
        "slim channels_last": slim_variant(widths, x, y, channels_last=True, bf16=False, compile=False),
        "slim bf16": slim_variant(widths, x, y, channels_last=False, bf16=True, compile=False),
        "slim channels_last+bf16": slim_variant(widths, x, y, channels_last=True, bf16=True, compile=False),
    }
    if args.compile:
        variants["slim compile+channels_last+bf16"] = slim_variant(
            widths, x, y, channels_last=True, bf16=True, compile=True
        )
    dense, dense_fast = [], []
    x_cl = x.contiguous(memory_format=torch.channels_last)
    for w in widths:
        for group, fmt in ((dense, torch.contiguous_format), (dense_fast, torch.channels_last)):
            torch.manual_seed(0)
            m = torchvision.models.mobilenet_v2(width_mult=w).to(memory_format=fmt)
            group.append((w, m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)))

    times: dict[str, list[float]] = {name: [] for name in variants}
    dense_times: dict[float, list[float]] = {w: [] for w in widths}
    fast_times: dict[float, list[float]] = {w: [] for w in widths}
    t_start = time.perf_counter()
    for r in range(args.warmup + args.rounds):
        timed = r >= args.warmup
        for name, step in variants.items():
            t0 = time.perf_counter()
            step()
            if timed:
                times[name].append(time.perf_counter() - t0)
        for w, m, opt in dense:
            t0 = time.perf_counter()
            dense_step(m, opt, x, y)
            if timed:
                dense_times[w].append(time.perf_counter() - t0)
        for w, m, opt in dense_fast:
            t0 = time.perf_counter()
            dense_step(m, opt, x_cl, y, bf16=True)
            if timed:
                fast_times[w].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.warmup + args.rounds}{'' if timed else ' (warm-up)'} done", flush=True)

    dense_median = {w: statistics.median(ts) for w, ts in dense_times.items()}
    dense_sum = sum(dense_median.values())
    fast_sum = sum(statistics.median(ts) for ts in fast_times.values())
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"variant": name, "median_s": med, "ratio_to_dense_sum": med / dense_sum, "runs": ts})
    result = {
        "benchmark": "one Algorithm-1 step of slim_mobilenet_v2 vs sum of dense torchvision mobilenet_v2 steps",
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "widths": list(widths),
        "rounds": args.rounds,
        "dense_median_s": {f"{w:g}": t for w, t in dense_median.items()},
        "dense_sum_s": dense_sum,
        "dense_channels_last_bf16_sum_s": fast_sum,
        "variants": rows,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "wall_s": time.perf_counter() - t_start,
    }
    print(f"\nbatch {args.batch_size}, {args.image_size}px, widths {args.widths}, {torch.get_num_threads()} threads")
    per_width = ", ".join(f"{w:g}: {t:.3f}s" for w, t in dense_median.items())
    print(f"dense torchvision mobilenet_v2 step (fp32): {per_width}")
    print(f"{'variant':<34}{'median step (s)':>16}{'vs dense sum':>14}")
    print(f"{'dense sum (reference)':<34}{dense_sum:>16.3f}{1.0:>13.2f}x")
    print(f"{'dense sum, channels_last+bf16':<34}{fast_sum:>16.3f}{fast_sum / dense_sum:>13.2f}x")
    for row in rows:
        print(f"{row['variant']:<34}{row['median_s']:>16.3f}{row['ratio_to_dense_sum']:>13.2f}x")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
