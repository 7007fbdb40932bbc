"""File size, load time and latency of every available export target, per width of ``slim_mobilenet_v2`` on CPU.

Each width is exported once with every registered target whose dependencies are installed
(:func:`slimmable.export.list_exporters`), each file verified against PyTorch as every export is. Then, per target
and width:

* ``MB``: bytes of all the target's files (OpenVINO: ``.xml`` + ``.bin``);
* ``load ms``: median over ``--loads`` loads of the file into something that runs (onnxruntime session,
  ``torch.jit.load``, ``torch.export.load(...).module()``, OpenVINO read + compile, ``torch.load``), the first
  call not included;
* ``latency ms``: batch 1, the median over ``--rounds`` rounds in which every (target, width) variant and the
  PyTorch dense module (``eager``) run once each, interleaved in a shuffled order (a slow drift of the machine hits
  all variants alike); ``vs eager`` is the median over rounds of the variant's time divided by eager's at the same
  width in the same round.

The JSON records the machine (CPU capability, threads, torch version), the runtimes' versions and every sample.

Usage:
    python benchmarks/exporters.py [--input-size 224] [--rounds 30] [--loads 3] [--threads N]
        [--formats onnx,openvino] [--json benchmarks/results/exporters.json]
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _bench import describe_machine, machine_info, write_json

import slimmable
from slimmable.export import export_width, get_exporter, list_exporters

MODEL = "slim_mobilenet_v2"


def _with_random_statistics(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BN statistics and affine parameters and a larger classifier: freshly initialised, the network's logits
    are ~1e-15 and every format's difference to PyTorch would be meaninglessly small."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1.0 + torch.rand(m.running_var.shape, generator=g))
                m.weight.copy_(0.5 + 0.5 * torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, torch.nn.Linear):
                m.weight.copy_(0.1 * torch.randn(m.weight.shape, generator=g))
    return model


def _median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


def export_all(model, widths, formats, size: int, folder: Path) -> dict:
    """Export every (format, width); returns per key the exporter, path, dense module, export seconds and diff."""
    out = {}
    for w in widths:
        dense = export_width(model, w)
        for name in formats:
            target = get_exporter(name)
            path = folder / f"{MODEL}_w{w:g}{target.suffix}"
            t0 = time.perf_counter()
            res = target.export(dense, path, input_size=size)
            seconds = time.perf_counter() - t0
            out[(name, w)] = {
                "target": target,
                "path": path,
                "dense": dense,
                "export_s": seconds,
                "diff": res.max_abs_diff,
            }
            print(f"  exported {path.name}: {seconds:.1f} s, max diff {res.max_abs_diff:.2e}", flush=True)
    return out


def time_loads(files: dict, loads: int) -> dict:
    """Seconds per load of each file, and a loaded runner of each (the last load)."""
    times, runners = {}, {}
    for key, f in files.items():
        samples = []
        for _ in range(loads):
            t0 = time.perf_counter()
            run = f["target"].load(f["path"])
            samples.append(time.perf_counter() - t0)
        times[key], runners[key] = samples, run
    return {"times": times, "runners": runners}


def time_latency(runners: dict, eager: dict, x: torch.Tensor, rounds: int, seed: int = 0) -> dict:
    """Seconds per call of each variant (every format's runner and ``("eager", w)``), interleaved and shuffled."""
    fns = {**runners, **{("eager", w): dense for w, dense in eager.items()}}
    keys = list(fns)
    samples: dict = {k: [] for k in keys}
    rng = random.Random(seed)
    with torch.no_grad():
        for _ in range(3):  # warm-up: first-call allocations, OpenVINO's and onnxruntime's lazy setup
            for fn in fns.values():
                fn(x)
        for _ in range(rounds):
            rng.shuffle(keys)
            for k in keys:
                fn = fns[k]
                t0 = time.perf_counter()
                fn(x)
                samples[k].append(time.perf_counter() - t0)
    return samples


def _version(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except (ImportError, AttributeError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=30, help="interleaved latency rounds")
    ap.add_argument("--loads", type=int, default=3, help="loads timed per file")
    ap.add_argument("--threads", type=int, help="intra-op threads of torch and of every runtime (default: torch's)")
    ap.add_argument("--formats", help="comma-separated formats (default: every registered one that is installed)")
    ap.add_argument("--json", default="benchmarks/results/exporters.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    formats = args.formats.split(",") if args.formats else list_exporters(available=True)
    skipped = [n for n in list_exporters() if n not in formats]
    size = args.input_size
    torch.manual_seed(0)
    model = _with_random_statistics(slimmable.create_model(MODEL)).eval()
    widths = tuple(model.widths)
    machine = machine_info()
    print(f"{MODEL} at {size}x{size}, batch 1, CPU: {describe_machine(machine)}; formats {', '.join(formats)}")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        files = export_all(model, widths, formats, size, Path(tmp))
        sizes = {k: sum(p.stat().st_size for p in f["target"].files(f["path"])) for k, f in files.items()}
        loaded = time_loads(files, args.loads)
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
        eager = {w: files[(formats[0], w)]["dense"] for w in widths}
        lat = time_latency(loaded["runners"], eager, x, args.rounds)
    elapsed = time.perf_counter() - t_start

    results, rows = [], []
    for name in [*formats, "eager"]:
        for w in widths:
            key = (name, w)
            paired = [a / b for a, b in zip(lat[key], lat[("eager", w)])]
            entry = {
                "format": name,
                "width": w,
                "latency_ms": _median_ms(lat[key]),
                "latency_vs_eager": statistics.median(paired),
                "latency_samples_ms": [1e3 * s for s in lat[key]],
            }
            if name != "eager":
                f = files[key]
                entry |= {
                    "file": f["path"].name,
                    "bytes": sizes[key],
                    "load_ms": _median_ms(loaded["times"][key]),
                    "load_samples_ms": [1e3 * s for s in loaded["times"][key]],
                    "export_s": f["export_s"],
                    "max_abs_diff_vs_torch": f["diff"],
                }
            results.append(entry)
            rows.append(
                [
                    name,
                    f"{w:g}",
                    f"{entry['bytes'] / 1e6:.2f}" if "bytes" in entry else "-",
                    f"{entry['load_ms']:.1f}" if "load_ms" in entry else "-",
                    f"{entry['latency_ms']:.2f}",
                    f"{entry['latency_vs_eager']:.2f}x",
                    f"{entry['export_s']:.1f}" if "export_s" in entry else "-",
                    f"{entry['max_abs_diff_vs_torch']:.1e}" if "max_abs_diff_vs_torch" in entry else "-",
                ]
            )
    headers = ["format", "width", "MB", "load ms", "latency ms", "vs eager", "export s", "max diff"]
    cols = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print(f"\n{MODEL}, {size}x{size}, batch 1, {torch.get_num_threads()} threads, medians ({args.rounds} interleaved "
          f"rounds, {args.loads} loads); {machine['cpu_capability']} CPU, torch {torch.__version__}")  # fmt: skip
    print("  ".join(h.rjust(n) for h, n in zip(headers, cols)))
    print("  ".join("-" * n for n in cols))
    for r in rows:
        print("  ".join(c.rjust(n) for c, n in zip(r, cols)))
    if skipped:
        print(f"not installed, skipped: {', '.join(skipped)}")
    versions = {"torch": torch.__version__}
    for name in formats:
        t = get_exporter(name)
        versions |= {m: _version(m) for m in (*t.requires, *t.runtime_requires)}
    write_json(
        args.json,
        {
            "benchmark": "exporters",
            "model": MODEL,
            "input_size": size,
            "batch_size": 1,
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": {**machine, "platform": platform.platform(), "load_avg": os.getloadavg()},
            "versions": versions,
            "formats": formats,
            "skipped_formats": skipped,
            "rounds": args.rounds,
            "loads": args.loads,
            "notes": "OpenVINO runs with INFERENCE_PRECISION_HINT=f32 (equal to PyTorch's float32); onnxruntime and "
            "OpenVINO use the same thread count as torch",
            "results": results,
            "elapsed_s": elapsed,
        },
    )
    print(f"({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
