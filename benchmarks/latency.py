"""CPU latency of each slimmable model per width, side by side with torchvision's dense models.

For every width the slimmable model and its dense reference are timed in interleaved rounds (the machine is
noisy; ratios are only meaningful when measured together: the ratio is the median over rounds of each round's
back-to-back slim/dense pair), in eval mode under ``torch.inference_mode``:

* ``slim_mobilenet_v2`` at width w  vs  ``torchvision.models.mobilenet_v2(width_mult=w)`` (same architecture),
* ``slim_resnet50`` at 1.0  vs  ``torchvision.models.resnet50()``,
* the other families are timed alone (torchvision has no matching dense model).

``--retain-freed-memory`` first calls :func:`slimmable.runtime.retain_freed_memory` (glibc keeps freed memory
instead of faulting fresh pages in on every forward): both sides get faster, and the ratio no longer depends on
the order in which each model frees its activations.

``--avx2`` then times the same models again in a child process under the AVX2 emulation
(``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``) and prints both paths side by side: oneDNN's convolutions
differ between the two, so the slimmable/dense ratio is checked on both.

Usage:
    python benchmarks/latency.py [--models slim_mobilenet_v2,slim_resnet50] [--batch-sizes 1,8] [--rounds 9]
        [--retain-freed-memory] [--avx2] [--json benchmarks/results/latency.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
import torchvision
from _bench import describe_machine, emulating_avx2, machine_info, run_avx2_child
from torch import nn

import slimmable
from slimmable.runtime import freed_memory_retained, retain_freed_memory


def dense_reference(name: str, width: float) -> nn.Module | None:
    """torchvision's dense model with the same architecture, where one exists."""
    if name == "slim_mobilenet_v2":
        return torchvision.models.mobilenet_v2(width_mult=width)
    if name == "slim_resnet50" and width == 1.0:
        return torchvision.models.resnet50()
    return None


def time_once(fn: Callable[[], object], runs: int) -> float:
    """Median seconds of ``runs`` calls."""
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_pair(slim: nn.Module, dense: nn.Module | None, x: torch.Tensor, rounds: int, target_s: float) -> dict:
    """Interleaved rounds of (slim, dense); returns median-of-round-medians in ms."""
    fns = {"slim": lambda: slim(x)}
    if dense is not None:
        fns["dense"] = lambda: dense(x)
    for fn in fns.values():  # warm-up, and an estimate for the number of runs
        for _ in range(3):
            fn()
    est = time_once(fns["slim"], 3)
    runs = max(3, min(50, int(target_s / max(est, 1e-6))))
    per: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        for k in order:
            per[k].append(time_once(fns[k], runs))
    out = {f"{k}_ms": 1e3 * statistics.median(v) for k, v in per.items()}
    out["runs"] = runs
    if dense is not None:
        # The ratio of each round's back-to-back pair, then the median over rounds: a machine that slows down or
        # speeds up between rounds (other tenants, frequency) moves both sides of a pair alike.
        pairs = [a / b for a, b in zip(per["slim"], per["dense"])]
        out["ratio"] = statistics.median(pairs)
        out["ratio_spread"] = [min(pairs), max(pairs)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="slim_mobilenet_v2,slim_resnet50,slim_mobilenet_v1,slim_shufflenet_v1")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--target-seconds", type=float, default=0.4, help="time per measurement (sets runs)")
    ap.add_argument("--retain-freed-memory", action="store_true", help="glibc keeps freed memory (see above)")
    ap.add_argument("--avx2", action="store_true", help="also time the AVX2 path (emulated) and compare")
    ap.add_argument("--json", default="benchmarks/results/latency.json")
    args = ap.parse_args()
    if args.retain_freed_memory and not retain_freed_memory():
        print("--retain-freed-memory: not glibc, the allocator is unchanged")
    retained = freed_memory_retained()  # also true when the environment variables set it

    torch.manual_seed(0)
    results = []
    header = f"{'model':<20} {'width':>5} {'batch':>5} {'slim ms':>9} {'dense ms':>9} {'ratio':>6}"
    machine = machine_info()
    print(f"{describe_machine(machine)}, allocator {'retains freed memory' if retained else 'default'}")
    print(header)
    print("-" * len(header))
    for name in args.models.split(","):
        model = slimmable.create_model(name).eval()  # built outside inference mode: normal tensors
        with torch.inference_mode():
            for bs in (int(b) for b in args.batch_sizes.split(",")):
                x = torch.randn(bs, 3, 224, 224)
                for w in model.widths:
                    model.set_width(w)
                    with torch.inference_mode(False):  # normal tensors, like the slimmable model's
                        dense = dense_reference(name, w)
                    if dense is not None:
                        dense.eval()
                    r = bench_pair(model, dense, x, args.rounds, args.target_seconds)
                    r.update(model=name, width=w, batch=bs)
                    results.append(r)
                    dense_ms = f"{r['dense_ms']:9.2f}" if "dense_ms" in r else f"{'-':>9}"
                    ratio = f"{r['ratio']:6.3f}" if "ratio" in r else f"{'-':>6}"
                    if "ratio_spread" in r:
                        ratio += f"  ({r['ratio_spread'][0]:.3f}-{r['ratio_spread'][1]:.3f})"
                    print(f"{name:<20} {w:5g} {bs:5d} {r['slim_ms']:9.2f} {dense_ms} {ratio}", flush=True)
    meta = {
        "machine": machine,
        "avx2_emulated": emulating_avx2(),
        "rounds": args.rounds,
        "retain_freed_memory": retained,
    }
    out: dict = {"meta": meta, "results": results}
    if args.avx2 and not emulating_avx2():
        argv = ["--models", args.models, "--batch-sizes", args.batch_sizes, "--rounds", str(args.rounds),
                "--target-seconds", str(args.target_seconds)]  # fmt: skip
        if args.retain_freed_memory:
            argv.append("--retain-freed-memory")
        out["avx2"] = avx2 = run_avx2_child(__file__, argv)
        slow = {(r["model"], r["width"], r["batch"]): r for r in avx2["results"]}
        print(f"\nside by side: this CPU ({machine['cpu_capability']}) vs the AVX2 path (ms, slim/dense ratio)")
        head = f"{'model':<20} {'width':>5} {'batch':>5} {'slim ms':>9} {'ratio':>6} {'AVX2 ms':>9} {'ratio':>6}"
        print(head)
        print("-" * len(head))
        for r in results:
            o = slow.get((r["model"], r["width"], r["batch"]), {})
            fast_ratio = f"{r['ratio']:6.3f}" if "ratio" in r else f"{'-':>6}"
            slow_ratio = f"{o['ratio']:6.3f}" if "ratio" in o else f"{'-':>6}"
            slow_ms = f"{o['slim_ms']:9.2f}" if o else f"{'-':>9}"
            key = f"{r['model']:<20} {r['width']:5g} {r['batch']:5d}"
            print(f"{key} {r['slim_ms']:9.2f} {fast_ratio} {slow_ms} {slow_ratio}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
