"""Training-step time: one Algorithm-1 step of slim_mobilenet_v2 vs the sum of dense steps at each width.

Algorithm 1 trains every width on every batch, so its natural yardstick is training the same architectures as
separate dense networks: one step of torchvision's ``mobilenet_v2(width_mult=w)`` for each width ``w``, added up.
Both sides see the same batch and do the same arithmetic (forward, cross-entropy, backward, SGD step). The
slimmable step is timed in several numerics variants against the dense reference in its default form (float32,
contiguous), as a user would run it; the dense models are also timed with channels_last + bf16, so the cost of
slimmability itself (like for like) is visible too.

Timings interleave slimmable and dense steps in rounds (the machine is shared and noisy) and report medians.
``slim auto`` is what ``train.amp: auto`` / ``train.channels_last: auto`` pick on this CPU from its flags
(:func:`slimmable.hardware.choose_numerics`). ``--avx2`` then runs the fp32, bf16 and auto variants again under the
AVX2 emulation and prints both paths side by side (the channels-last variants are left out there: oneDNN's NHWC
kernels are over 40x slower on AVX2).

Usage:
    python benchmarks/train_throughput.py [--rounds 5] [--batch-size 16] [--image-size 224] [--compile] [--avx2]
        [--variants fp32,bf16,auto] [--json benchmarks/results/train_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from _bench import describe_machine, emulating_avx2, machine_info, run_avx2_child

import slimmable
from slimmable.hardware import choose_numerics
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
    parser.add_argument("--variants", default="fp32,channels_last,bf16,channels_last+bf16,auto",
                        help="slimmable variants to time (comma-separated)")  # fmt: skip
    parser.add_argument("--no-dense-fast", action="store_true", help="skip the dense channels_last+bf16 reference")
    parser.add_argument("--avx2", action="store_true", help="also run the AVX2 path (emulated) and compare")
    parser.add_argument("--json", default="benchmarks/results/train_throughput.json", help="where to write results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    widths = tuple(float(w) for w in args.widths.split(","))

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, 1000, (args.batch_size,), generator=g)

    auto = choose_numerics("auto", "auto", "cpu")
    settings = {
        "fp32": (False, False),
        "channels_last": (True, False),
        "bf16": (False, True),
        "channels_last+bf16": (True, True),
        "auto": (auto.channels_last, auto.amp == "bf16"),
    }
    unknown = set(args.variants.split(",")) - set(settings)
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(settings)}")
    variants: dict[str, Callable[[], None]] = {
        f"slim {v}": slim_variant(widths, x, y, channels_last=settings[v][0], bf16=settings[v][1], compile=False)
        for v in args.variants.split(",")
    }
    if args.compile:
        variants["slim compile+channels_last+bf16"] = slim_variant(
            widths, x, y, channels_last=True, bf16=True, compile=True
        )
    dense, dense_fast = [], []
    x_cl = x.contiguous(memory_format=torch.channels_last)
    for w in widths:
        groups = [(dense, torch.contiguous_format)]
        if not args.no_dense_fast:
            groups.append((dense_fast, torch.channels_last))
        for group, fmt in groups:
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
    fast_sum = sum(statistics.median(ts) for ts in fast_times.values() if ts) or float("nan")
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
        "auto": auto.to_dict(),
        "machine": machine_info(),
        "avx2_emulated": emulating_avx2(),
        "wall_s": time.perf_counter() - t_start,
    }
    where = describe_machine(result["machine"])
    print(f"\nbatch {args.batch_size}, {args.image_size}px, widths {args.widths}, {where}")
    print(f"auto: {auto.describe()}")
    per_width = ", ".join(f"{w:g}: {t:.3f}s" for w, t in dense_median.items())
    print(f"dense torchvision mobilenet_v2 step (fp32): {per_width}")
    print(f"{'variant':<34}{'median step (s)':>16}{'vs dense sum':>14}")
    print(f"{'dense sum (reference)':<34}{dense_sum:>16.3f}{1.0:>13.2f}x")
    print(f"{'dense sum, channels_last+bf16':<34}{fast_sum:>16.3f}{fast_sum / dense_sum:>13.2f}x")
    for row in rows:
        print(f"{row['variant']:<34}{row['median_s']:>16.3f}{row['ratio_to_dense_sum']:>13.2f}x")
    if args.avx2 and not emulating_avx2():
        argv = ["--batch-size", str(args.batch_size), "--image-size", str(args.image_size), "--widths", args.widths,
                "--rounds", str(args.rounds), "--warmup", str(args.warmup), "--variants", "fp32,bf16,auto",
                "--no-dense-fast"] + (["--threads", str(args.threads)] if args.threads else [])  # fmt: skip
        result["avx2"] = avx2 = run_avx2_child(__file__, argv)
        slow = {r["variant"]: r for r in avx2["variants"]}
        print(f"\nside by side: this CPU ({result['machine']['cpu_capability']}) vs the AVX2 path, seconds per step")
        print(f"{'variant':<24}{'this CPU':>10}{'AVX2':>10}{'AVX2 vs fp32':>14}")
        print(f"{'dense sum (fp32)':<24}{dense_sum:>10.3f}{avx2['dense_sum_s']:>10.3f}")
        fp32_avx2 = slow["slim fp32"]["median_s"]
        for row in rows:
            other = slow.get(row["variant"])
            cell = f"{other['median_s']:>10.3f}{other['median_s'] / fp32_avx2:>13.2f}x" if other else f"{'-':>10}"
            print(f"{row['variant']:<24}{row['median_s']:>10.3f}{cell}")
        print(f"AVX2 auto: {avx2['auto']['amp']}, channels_last {avx2['auto']['channels_last']}")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
