"""CPU latency of slimmable detectors per width, side by side in one run: the slimmable detector, its own dense
export at that width, and the paper's zero-padding design.

For every width three detectors are timed in interleaved rounds (batch 1, eval mode, ``torch.inference_mode``;
the ratio is the median over rounds of each round's back-to-back pair, as in ``benchmarks/latency.py``):

* ``slim``: the slimmable detector at width w (the FPN's lateral 1x1 convolutions read only the active channels
  of each backbone stage);
* ``dense``: ``slimmable.export_width(model, w)``, a plain torchvision detector with that width's channels (target:
  slim/dense <= 1.02);
* ``zero-pad``: the official code's design, built here from the same weights: each stage output is zero-padded
  back to full width and fed to full-width lateral convolutions (plain ``nn.Conv2d`` holding every input channel).
  It computes the same detections (checked before timing: boxes, scores to 1e-4), and the table shows what reading
  only the active channels saves, in time and in MACs.

Detections: ``box_score_thresh=0`` so that the RoI heads process their full number of detections at every width
(random weights would otherwise make the heads' work vary with the width). Images: random, square, at the side
the detector resizes to (``--small-size`` for the small variant, ``--r50-size`` for R-50-FPN, set through
``min_size = max_size``).

Usage:
    OMP_NUM_THREADS=2 python benchmarks/detection_latency.py [--models slim_fasterrcnn_resnet18_fpn,...]
        [--small-size 128] [--r50-size 320] [--rounds 7] [--target-seconds 0.3] [--threads N]
        [--json benchmarks/results/detection_latency.json]
"""

from __future__ import annotations

import argparse
import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from _bench import describe_machine, machine_info, write_json
from latency import bench_pair
from torch import nn

import slimmable
from slimmable.export import export_width
from slimmable.models.detection import SlimBackboneWithFPN
from slimmable.nn import SlimConv2d
from slimmable.search import count_macs, detector_images


class ZeroPadBackboneWithFPN(nn.Module):
    """The official code's backbone: stage outputs zero-padded back to full width, full-width FPN laterals.

    Built from a :class:`SlimBackboneWithFPN` (sharing its slimmable body, at whatever width the body is set to);
    the laterals become plain ``nn.Conv2d`` layers with every input channel of the source's ``SlimConv2d``.
    """

    def __init__(self, src: SlimBackboneWithFPN) -> None:
        super().__init__()
        self.body = src.body
        self.out_indices = src.out_indices
        self.out_channels = src.out_channels
        self.full = [src.body.feature_info[i].num_channels for i in src.out_indices]
        self.fpn = copy.deepcopy(src.fpn)
        for block in self.fpn.inner_blocks:
            slim = block[0]
            assert isinstance(slim, SlimConv2d)
            conv = nn.Conv2d(slim.in_channels, slim.out_channels, 1)
            with torch.no_grad():
                conv.weight.copy_(slim.weight)
                conv.bias.copy_(slim.bias)
            block[0] = conv

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        stages = self.body.forward_stages(x, self.out_indices)
        padded = OrderedDict(
            (str(i), F.pad(t, (0, 0, 0, 0, 0, c - t.shape[1])))
            for i, (t, c) in enumerate(zip(stages.values(), self.full))
        )
        return self.fpn(padded)


def zero_pad_detector(model: nn.Module, width: float) -> nn.Module:
    """A copy of the slimmable detector at ``width`` with the zero-padding backbone."""
    out = copy.deepcopy(model)
    slimmable.set_width(out, width)
    out.backbone = ZeroPadBackboneWithFPN(out.backbone)
    return out.eval()


def check_equal(a: list[dict], b: list[dict], what: str) -> float:
    """Largest difference of boxes (relative to 1 px) and scores; raises when labels or counts differ."""
    worst = 0.0
    for x, y in zip(a, b):
        if x["labels"].tolist() != y["labels"].tolist():
            raise RuntimeError(f"{what}: labels differ")
        worst = max(worst, float((x["boxes"] - y["boxes"]).abs().max()), float((x["scores"] - y["scores"]).abs().max()))
    if worst > 1e-3:
        raise RuntimeError(f"{what}: detections differ by {worst:.3g}")
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="slim_fasterrcnn_resnet18_fpn,slim_fasterrcnn_resnet50_fpn")
    ap.add_argument("--small-size", type=int, default=128, help="image side of the small variants")
    ap.add_argument("--r50-size", type=int, default=320, help="image side of the R-50-FPN detectors")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--target-seconds", type=float, default=0.3, help="time per measurement (sets runs)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default="benchmarks/results/detection_latency.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    machine = machine_info()
    print(describe_machine(machine))
    head = (
        f"{'model':<32} {'px':>4} {'width':>5} {'slim ms':>8} {'dense ms':>8} {'slim/dense':>10} "
        f"{'0-pad ms':>8} {'0-pad/slim':>10} {'MACs M':>8} {'0-pad M':>8}"
    )
    print(head)
    print("-" * len(head))
    results = []
    for name in args.models.split(","):
        size = args.r50_size if "resnet50" in name else args.small_size
        model = slimmable.create_model(name, min_size=size, max_size=size, box_score_thresh=0.0).eval()
        x = detector_images(model, size, 1, seed=0)
        for w in model.widths:
            slimmable.set_width(model, w)
            dense = export_width(model, w).eval()
            pad = zero_pad_detector(model, w)
            with torch.inference_mode():
                ref = model(x)
                diff = max(check_equal(ref, dense(x), "dense export"), check_equal(ref, pad(x), "zero-padding"))
            macs, macs_pad = count_macs(model, x), count_macs(pad, x)
            with torch.inference_mode():
                r = bench_pair(model, dense, x, args.rounds, args.target_seconds)
                p = bench_pair(model, pad, x, args.rounds, args.target_seconds)
            row = {
                "model": name,
                "image_size": size,
                "width": w,
                "slim_ms": r["slim_ms"],
                "dense_ms": r["dense_ms"],
                "slim_over_dense": r["ratio"],
                "slim_over_dense_spread": r["ratio_spread"],
                "zero_pad_ms": p["dense_ms"],
                "zero_pad_over_slim": 1.0 / p["ratio"],
                "zero_pad_over_slim_spread": [1.0 / p["ratio_spread"][1], 1.0 / p["ratio_spread"][0]],
                "macs": macs,
                "zero_pad_macs": macs_pad,
                "detections": len(ref[0]["boxes"]),
                "max_diff": diff,
                "runs": r["runs"],
            }
            results.append(row)
            print(
                f"{name:<32} {size:4d} {w:5g} {row['slim_ms']:8.2f} {row['dense_ms']:8.2f} "
                f"{row['slim_over_dense']:10.3f} {row['zero_pad_ms']:8.2f} {row['zero_pad_over_slim']:10.3f} "
                f"{macs / 1e6:8.1f} {macs_pad / 1e6:8.1f}",
                flush=True,
            )
        slimmable.set_width(model, model.widths[-1])
    meta = {"machine": machine, "rounds": args.rounds, "batch_size": 1, "box_score_thresh": 0.0}
    write_json(args.json, {"meta": meta, "results": results})


if __name__ == "__main__":
    main()
