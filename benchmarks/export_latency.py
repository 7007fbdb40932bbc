"""Exported / runner inference at every width vs torchvision's dense ``mobilenet_v2(width_mult=w)``, on CPU.

All variants are timed side by side in one run, interleaved in a shuffled order every round, in eval mode under
``torch.inference_mode``. The table reports median milliseconds and, per variant, the median over rounds of its
time divided by torchvision's time in the same round (paired ratios cancel the machine's slow drifts; the JSON
also has the ratio of medians). Target: <= 1.02x.

* ``torchvision``: ``torchvision.models.mobilenet_v2(width_mult=w)`` (random weights; the same architecture);
* ``dense``: ``export_width(slim_mobilenet_v2, w)`` (plain layers, BN kept: the same op graph as torchvision);
* ``dense+fold``: ``export_width(..., fold_bn=True)``;
* ``runner``: ``SlimmableRunner(...)(x, width=w)`` (BN folded; includes dispatch, timing and drift bookkeeping);
* ``slim``: the slimmable model itself switched to ``w`` (reference only).

It also measures the cost of a width switch (runner choice + lookup, ``set_width`` on the slimmable model, and
the latency penalty of alternating widths) and the runner's start-up calibration time (fresh and cached).

Usage:
    python benchmarks/export_latency.py [--batch-sizes 1,8] [--rounds 30] [--threads N]
        [--json benchmarks/results/export_latency.json] [--csv benchmarks/results/export_latency.csv]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from _bench import machine_info

import slimmable
from slimmable.export import export_width
from slimmable.runtime import SlimmableRunner

VARIANTS = ("torchvision", "dense", "dense+fold", "runner", "slim")


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def bench_widths(model, runner, widths, batch: int, size: int, rounds: int, seed: int) -> dict:
    """Seconds per (variant, width) and round at ``batch``; all variants interleaved in a shuffled order every
    round."""
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    fns = {}
    for w in widths:
        tv = torchvision.models.mobilenet_v2(width_mult=w).eval()
        dense = export_width(model, w)
        folded = export_width(model, w, fold_bn=True)
        assert _params(tv) == _params(dense), f"architectures differ at width {w}"
        slim = slimmable.create_model("slim_mobilenet_v2").eval()
        slim.load_state_dict(model.state_dict())
        slim.set_width(w)
        fns[("torchvision", w)] = lambda m=tv: m(x)
        fns[("dense", w)] = lambda m=dense: m(x)
        fns[("dense+fold", w)] = lambda m=folded: m(x)
        fns[("runner", w)] = lambda w=w: runner(x, width=w)
        fns[("slim", w)] = lambda m=slim: m(x)
    rng = random.Random(seed)
    samples: dict = {k: [] for k in fns}
    keys = list(fns)
    with torch.inference_mode():
        for _ in range(3):
            for fn in fns.values():
                fn()
        for _ in range(rounds):
            rng.shuffle(keys)
            for k in keys:
                t0 = time.perf_counter()
                fns[k]()
                samples[k].append(time.perf_counter() - t0)
    return samples


def bench_switch(model, runner, size: int, n: int = 20000) -> dict:
    """Width-switch costs in microseconds, and the latency penalty of alternating widths at batch 1."""
    widths = runner.widths
    budgets = [runner.base_latency(w, 1) * 1.01 for w in widths]
    t0 = time.perf_counter()
    for i in range(n):
        w, _ = runner.select_width(budgets[i % len(budgets)], 1)
        runner.module(w)
    select_us = 1e6 * (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for i in range(n):
        runner.module(widths[i % len(widths)])
    lookup_us = 1e6 * (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for i in range(n // 10):
        model.set_width(widths[i % len(widths)])
    set_width_us = 1e6 * (time.perf_counter() - t0) / (n // 10)
    # alternating narrow/wide vs repeating wide: does a switch make the next call slower (cold caches)?
    x = torch.randn(1, 3, size, size)
    lo, hi = widths[0], widths[-1]
    after_switch, after_same = [], []
    for i in range(60):
        runner(x, width=lo if i % 2 == 0 else hi)
        t0 = time.perf_counter()
        runner(x, width=hi)
        (after_switch if i % 2 == 0 else after_same).append(time.perf_counter() - t0)
    penalty_ms = 1e3 * (statistics.median(after_switch) - statistics.median(after_same))
    return {
        "runner_select_and_lookup_us": select_us,
        "runner_width_lookup_us": lookup_us,
        "slim_set_width_us": set_width_us,
        "alternating_width_penalty_ms": penalty_ms,
    }


def bench_startup(model, size: int, batch_sizes: tuple[int, ...], calibration_s: float) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cache = Path(d) / "latency.json"
        t0 = time.perf_counter()
        r = SlimmableRunner(
            model, input_size=size, batch_sizes=batch_sizes, calibration_s=calibration_s, cache_path=cache
        )
        fresh = time.perf_counter() - t0
        t0 = time.perf_counter()
        r2 = SlimmableRunner(model, input_size=size, batch_sizes=batch_sizes, cache_path=cache)
        cached = time.perf_counter() - t0
    mem = r.memory_bytes()
    return {
        "batch_sizes": list(batch_sizes),
        "calibration_budget_s": calibration_s,
        "startup_s": fresh,
        "calibration_s": r.calibration_seconds,
        "startup_cached_s": cached,
        "calibration_cached_s": r2.calibration_seconds,
        "calibrated_ms": {str(b): {f"{w:g}": r.base_latency(w, b) for w in r.widths} for b in batch_sizes},
        "memory_bytes": {"source_weight_set": mem["source_weight_set"], "dense_total": mem["dense_total"]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--rounds", type=int, default=30, help="interleaved rounds at batch 1 (fewer at larger batches)")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", default="benchmarks/results/export_latency.json")
    ap.add_argument("--csv", default="benchmarks/results/export_latency.csv")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    size = args.input_size
    torch.manual_seed(0)
    model = slimmable.create_model("slim_mobilenet_v2").eval()
    widths = model.widths
    t0 = time.perf_counter()
    startup = bench_startup(model, size, batch_sizes, calibration_s=5.0)
    runner = SlimmableRunner(model, input_size=size, batch_sizes=batch_sizes, calibrate=False)
    runner.load_latencies({int(b): {float(w): ms for w, ms in t.items()} for b, t in startup["calibrated_ms"].items()})
    rows, results = [], []
    for i, b in enumerate(batch_sizes):
        rounds = max(20, args.rounds // b) if b > 1 else args.rounds
        samples = bench_widths(model, runner, widths, b, size, rounds, seed=i)
        med = {k: 1e3 * statistics.median(v) for k, v in samples.items()}
        for w in widths:
            tv = med[("torchvision", w)]
            entry = {"batch": b, "width": w, "rounds": rounds}
            for v in VARIANTS:
                # median over rounds of (variant / torchvision in the same round): robust to slow drifts
                paired = [a / t for a, t in zip(samples[(v, w)], samples[("torchvision", w)])]
                entry[f"{v}_ms"] = med[(v, w)]
                entry[f"{v}_ratio"] = statistics.median(paired)
                entry[f"{v}_ratio_of_medians"] = med[(v, w)] / tv
            results.append(entry)
            rows.append(
                [f"{b}", f"{w:g}", f"{tv:.2f}"]
                + [f"{med[(v, w)]:.2f} ({entry[f'{v}_ratio']:.3f}x)" for v in VARIANTS[1:]]
            )
    switch = bench_switch(model, runner, size)
    elapsed = time.perf_counter() - t0
    headers = ["batch", "width", "torchvision ms", *(f"{v} ms (ratio)" for v in VARIANTS[1:])]
    widths_col = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print(f"slim_mobilenet_v2 vs torchvision mobilenet_v2, {size}x{size}, CPU, {torch.get_num_threads()} threads, "
          f"medians of interleaved rounds")  # fmt: skip
    print("  ".join(h.rjust(n) for h, n in zip(headers, widths_col)))
    print("  ".join("-" * n for n in widths_col))
    for r in rows:
        print("  ".join(c.rjust(n) for c, n in zip(r, widths_col)))
    worst = {v: max(e[f"{v}_ratio"] for e in results) for v in VARIANTS[1:]}
    print("worst ratio to torchvision: " + ", ".join(f"{v} {r:.3f}x" for v, r in worst.items()))
    print(
        f"width switch: runner choice+lookup {switch['runner_select_and_lookup_us']:.2f} us, lookup "
        f"{switch['runner_width_lookup_us']:.2f} us, slim set_width {switch['slim_set_width_us']:.1f} us; "
        f"alternating-width penalty at batch 1: {switch['alternating_width_penalty_ms']:+.3f} ms"
    )
    print(
        f"runner start-up (4 widths, batches {startup['batch_sizes']}): {startup['startup_s']:.2f} s "
        f"(calibration {startup['calibration_s']:.2f} s); from cache {startup['startup_cached_s']:.2f} s; "
        f"dense copies {startup['memory_bytes']['dense_total'] / 1e6:.1f} MB vs one slimmable weight set "
        f"{startup['memory_bytes']['source_weight_set'] / 1e6:.1f} MB"
    )
    out = {
        "benchmark": "export_latency",
        "model": "slim_mobilenet_v2",
        "input_size": size,
        "threads": torch.get_num_threads(),
        "machine": {**machine_info(), "platform": platform.platform(), "load_avg": os.getloadavg()},
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
        "results": results,
        "worst_ratio": worst,
        "switch": switch,
        "startup": startup,
        "elapsed_s": elapsed,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.json + ".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, args.json)
    with open(args.csv, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(results[0]))
        wr.writeheader()
        wr.writerows(results)
    print(f"wrote {args.json} and {args.csv} ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
