"""CPU latency of the slimmable ViT at each width against its own dense export (``export_width``), side by side.

For every model, width and batch size the slimmable model (set to the width) and ``slimmable.export_width(model, w)``
(a plain ViT of that width: :class:`~slimmable.nn.SelfAttention` with the active heads, ``nn.Linear`` MLPs) are
timed in interleaved rounds, in eval mode under ``torch.inference_mode``; the ratio is the median over rounds of
each round's back-to-back slim/dense pair (``benchmarks/latency.py``'s :func:`bench_pair`), so a load that comes
and goes moves both sides alike. Target (issue 25): slim / dense <= 1.05 at every width, batch 1 and 8.

Models (``--models``, each ``name:options``):

* ``small28``: ``slim_vit_tiny(small_input=True, in_chans=1, num_classes=10)``, 28-px images, patch 4 (50 tokens),
  12 blocks of 4 heads of 48, widths 0.25/0.5/0.75/1.0;
* ``in224``: ``slim_vit_tiny()``, 224-px images, patch 16 (197 tokens), DeiT-Ti's 3 heads of 64, widths
  1/3, 2/3, 1.0;
* ``recipe``: the model of the recipe ``fmnist_slim_vit_tiny`` (its ``model.options``), 28-px images.

Usage:
    OMP_NUM_THREADS=2 python benchmarks/vit_latency.py [--models small28,in224,recipe] [--batch-sizes 1,8]
        [--rounds 9] [--target-seconds 0.3] [--threads N] [--json benchmarks/results/vit_latency.json]
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from _bench import describe_machine, machine_info, write_json
from latency import bench_pair
from torch import nn

import slimmable
from slimmable.config import load_recipe
from slimmable.export import export_width

RECIPE = "fmnist_slim_vit_tiny"


def build(name: str) -> tuple[nn.Module, tuple[int, int, int]]:
    """The model called ``name`` (see the module's docstring) and its input ``(C, H, W)``."""
    if name == "small28":
        return slimmable.create_model("slim_vit_tiny", small_input=True, in_chans=1, num_classes=10), (1, 28, 28)
    if name == "in224":
        return slimmable.create_model("slim_vit_tiny"), (3, 224, 224)
    if name == "recipe":
        mc = load_recipe(RECIPE).model
        kwargs: dict[str, Any] = {"small_input": mc.small_input, "in_chans": 1, "num_classes": 10, **(mc.options or {})}
        if mc.widths is not None:
            kwargs["widths"] = tuple(mc.widths)
        return slimmable.create_model(mc.name, **kwargs), (1, 28, 28)
    raise SystemExit(f"--models: unknown model {name!r}; choose from small28, in224, recipe")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="small28,in224,recipe")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--target-seconds", type=float, default=0.3, help="time per measurement (sets runs)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default="benchmarks/results/vit_latency.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    machine = machine_info()
    print(describe_machine(machine))
    header = f"{'model':<8} {'width':>8} {'batch':>5} {'slim ms':>9} {'dense ms':>9} {'ratio':>6}  (range)"
    print(header)
    print("-" * len(header))
    results = []
    for name in args.models.split(","):
        model, shape = build(name)
        model.eval()  # built outside inference mode: normal tensors, as a loaded checkpoint's
        for w in model.widths:
            model.set_width(w)
            dense = export_width(model, w).eval()
            for bs in (int(b) for b in args.batch_sizes.split(",")):
                x = torch.randn(bs, *shape)
                with torch.inference_mode():
                    torch.testing.assert_close(model(x), dense(x), atol=1e-4, rtol=1e-4)  # the same network
                    r = bench_pair(model, dense, x, args.rounds, args.target_seconds)
                r.update(model=name, width=w, batch=bs, input=list(shape))
                results.append(r)
                lo, hi = r["ratio_spread"]
                print(f"{name:<8} {w:8.4g} {bs:5d} {r['slim_ms']:9.3f} {r['dense_ms']:9.3f} {r['ratio']:6.3f}  "
                      f"({lo:.3f}-{hi:.3f})", flush=True)  # fmt: skip
    worst = max(results, key=lambda r: r["ratio"])
    print(f"worst ratio {worst['ratio']:.3f} ({worst['model']} width {worst['width']:g} batch {worst['batch']}); "
          f"target <= 1.05 {'met' if worst['ratio'] <= 1.05 else 'NOT met'} in every cell")  # fmt: skip
    meta = {"machine": machine, "rounds": args.rounds, "target_seconds": args.target_seconds, "models": args.models}
    write_json(args.json, {"meta": meta, "results": results})


if __name__ == "__main__":
    main()
