"""CPU inference latency and page faults with glibc's default malloc vs :func:`retain_freed_memory`.

The allocator setting is process-wide and one-way, so each measurement runs in its own child process; children
alternate (default, retained, default, ...) over ``--rounds`` rounds so that a host that slows down moves both
alike. Each child times torchvision's dense model (the effect does not depend on the model being slimmable) and
counts minor page faults per forward.

``--in-thread`` runs the forwards in a worker thread, as the request threads of ``slimmable serve`` do.

Usage:
    python benchmarks/allocator.py [--models mobilenet_v2,resnet50] [--batch-sizes 1,8] [--rounds 3] [--in-thread]
        [--json benchmarks/results/allocator.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from _bench import machine_info

_CHILD = """
import json, resource, statistics, sys, threading, time
import torch, torchvision
from slimmable.runtime import retain_freed_memory
name, bs, mode, runs, in_thread = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
applied = retain_freed_memory() if mode == "retain" else False
torch.manual_seed(0)
model = getattr(torchvision.models, name)().eval()
x = torch.randn(bs, 3, 224, 224)
out = {}
def measure():
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ts = []
        for _ in range(runs):
            t0 = time.perf_counter()
            model(x)
            ts.append(time.perf_counter() - t0)
        out["faults"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / runs
        out["ms"] = 1e3 * statistics.median(ts)
if in_thread:  # as a server's request threads do: glibc gives each thread an arena of its own
    t = threading.Thread(target=measure)
    t.start()
    t.join()
else:
    measure()
print(json.dumps({"ms": out["ms"], "faults": out["faults"], "applied": applied}))
"""


def child(name: str, bs: int, mode: str, runs: int, in_thread: bool) -> dict:
    cmd = [sys.executable, "-c", _CHILD, name, str(bs), mode, str(runs), str(int(in_thread))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mobilenet_v2,resnet50", help="torchvision model names")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--rounds", type=int, default=3, help="alternating (default, retained) child pairs per cell")
    ap.add_argument("--runs", type=int, default=15, help="timed forwards per child")
    ap.add_argument("--in-thread", action="store_true", help="run the forwards in a worker thread (as a server does)")
    ap.add_argument("--json", default="benchmarks/results/allocator.json")
    args = ap.parse_args()

    cols = f"{'default ms':>10} {'faults':>8} {'retained ms':>11} {'faults':>8} {'speed-up':>8}"
    header = f"{'model':<14} {'batch':>5} {cols}"
    print(header)
    print("-" * len(header))
    results = []
    for name in args.models.split(","):
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            per: dict[str, list[dict]] = {"default": [], "retain": []}
            for r in range(args.rounds):
                for mode in ("default", "retain") if r % 2 == 0 else ("retain", "default"):
                    per[mode].append(child(name, bs, mode, args.runs, args.in_thread))
            if not all(c["applied"] for c in per["retain"]):
                raise SystemExit("retain_freed_memory() did not apply: this C library is not glibc")
            row = {"model": name, "batch": bs, "in_thread": args.in_thread}
            for mode, cells in per.items():
                row[f"{mode}_ms"] = statistics.median(c["ms"] for c in cells)
                row[f"{mode}_faults_per_forward"] = statistics.median(c["faults"] for c in cells)
            row["speedup"] = statistics.median(d["ms"] / k["ms"] for d, k in zip(per["default"], per["retain"]))
            results.append(row)
            print(
                f"{name:<14} {bs:5d} {row['default_ms']:10.2f} {row['default_faults_per_forward']:8.0f} "
                f"{row['retain_ms']:11.2f} {row['retain_faults_per_forward']:8.0f} {row['speedup']:7.2f}x",
                flush=True,
            )
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(
            {"meta": {"rounds": args.rounds, "runs": args.runs, "machine": machine_info()}, "results": results},
            f,
            indent=2,
        )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
