"""Where a slimmable model's eval latency differs from dense: page faults per forward, and Python per layer.

Two measurements behind the "Inference latency" section of ``benchmarks/RESULTS.md``:

1. ``faults``: ResNet-50 at width 1.0 (``--batch``, default 8): torchvision's ``resnet50()``, the slimmable model's
   own forward, and the same slimmable model walked as one flat ``features`` Sequential (the order of frees the
   model used before it ran stage by stage). Interleaved rounds; median ms, the median per-round ratio to
   torchvision, and minor page faults per forward (``getrusage``).
2. ``python``: MobileNet v2 on a 16x16 input with one thread, where compute is negligible: per-forward time of the
   slimmable model minus its own dense export (:func:`slimmable.export.export_width`) at each width, the median
   over interleaved rounds. What remains is the slimmable layers' Python.

Usage:
    python benchmarks/latency_breakdown.py [--parts faults,python] [--batch 8] [--rounds 9]
        [--json benchmarks/results/latency_breakdown.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from collections.abc import Callable

import torch
import torchvision
from _bench import machine_info

import slimmable
from slimmable.export import export_width


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, runs: int) -> dict[str, list[tuple[float, float]]]:
    """Per name, one ``(seconds per call, faults per call)`` per round; the order alternates between rounds."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    out: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for r in range(rounds):
        for k in list(fns) if r % 2 == 0 else list(reversed(fns)):
            f0, t0 = _faults(), time.perf_counter()
            for _ in range(runs):
                fns[k]()
            out[k].append(((time.perf_counter() - t0) / runs, (_faults() - f0) / runs))
    return out


def faults_part(batch: int, rounds: int) -> dict:
    slim = slimmable.create_model("slim_resnet50").eval().set_width(1.0)
    dense = torchvision.models.resnet50().eval()
    x = torch.randn(batch, 3, 224, 224)

    def flat() -> torch.Tensor:  # the flat walk: frees each stage's input after the stage's first block
        return slim.classifier(torch.flatten(slim.features(x), 1))

    with torch.inference_mode():
        per = interleaved({"torchvision": lambda: dense(x), "slim": lambda: slim(x), "slim_flat": flat}, rounds, 3)
    rows = {}
    for k, v in per.items():
        ratios = [a[0] / b[0] for a, b in zip(v, per["torchvision"])]
        rows[k] = {
            "ms": 1e3 * statistics.median(t for t, _ in v),
            "faults_per_forward": statistics.median(f for _, f in v),
            "ratio": statistics.median(ratios),
            "ratio_spread": [min(ratios), max(ratios)],
        }
        print(
            f"resnet50 b{batch} {k:<12} {rows[k]['ms']:8.2f} ms  faults/forward {rows[k]['faults_per_forward']:8.0f}"
            f"  ratio {rows[k]['ratio']:.3f} ({min(ratios):.3f}-{max(ratios):.3f})",
            flush=True,
        )
    return {"batch": batch, "rows": rows}


def python_part(rounds: int) -> dict:
    torch.set_num_threads(1)
    slim = slimmable.create_model("slim_mobilenet_v2").eval()
    x = torch.randn(1, 3, 16, 16)
    rows = {}
    with torch.inference_mode():
        for w in slim.widths:
            slim.set_width(w)
            with torch.inference_mode(False):  # normal tensors, like the slimmable model's
                dense = export_width(slim, w)
            per = interleaved({"slim": lambda: slim(x), "dense": lambda d=dense: d(x)}, rounds, 50)
            diff = statistics.median(a[0] - b[0] for a, b in zip(per["slim"], per["dense"]))
            rows[f"{w:g}"] = {
                "slim_us": 1e6 * statistics.median(t for t, _ in per["slim"]),
                "dense_us": 1e6 * statistics.median(t for t, _ in per["dense"]),
                "diff_us": 1e6 * diff,
            }
            r = rows[f"{w:g}"]
            print(f"mobilenet_v2 16x16 w={w:<5g} slim {r['slim_us']:7.0f} us  dense export {r['dense_us']:7.0f} us"
                  f"  slim - dense {r['diff_us']:+5.0f} us", flush=True)  # fmt: skip
    return {"input": [1, 3, 16, 16], "threads": 1, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="faults,python")
    ap.add_argument("--batch", type=int, default=8, help="batch size of the faults part")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--json", default="benchmarks/results/latency_breakdown.json")
    args = ap.parse_args()
    parts = args.parts.split(",")
    torch.manual_seed(0)
    result: dict = {"meta": {"machine": machine_info(), "rounds": args.rounds}}
    if "faults" in parts:  # first: the python part sets one thread for the rest of the process
        result["faults"] = faults_part(args.batch, args.rounds)
    if "python" in parts:
        result["python"] = python_part(args.rounds)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
