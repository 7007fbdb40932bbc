"""Convert the torchvision zoo with ``slimmable.convert``: groups slimmed, parameters frozen, MACs per width, and
the largest difference to the original at width 1.0.

Each model is built with random weights (``weights=None``; nothing is downloaded), its BatchNorm statistics and
affine randomised so that they matter, converted at widths 0.25/0.5/0.75/1.0 with a 224 px example input, and
compared with the original on that input at width 1.0. MACs are ``torch.utils.flop_counter``'s (FLOPs/2) at
224 px, as ``slimmable profile`` counts them. Not a timing benchmark.

Usage:
    python benchmarks/convert_zoo.py [--models resnet18,mobilenet_v2] [--json benchmarks/results/convert_zoo.json]
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision
from _bench import describe_machine, machine_info, write_json
from torch import nn

import slimmable
from slimmable.search.cost import count_macs

MODELS = (
    "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_small",
    "mobilenet_v3_large", "mnasnet1_0", "efficientnet_b0", "regnet_y_400mf", "shufflenet_v2_x1_0", "densenet121",
    "convnext_tiny", "vgg11_bn", "squeezenet1_1", "googlenet", "vit_b_16", "swin_t",
)  # fmt: skip
WIDTHS = (0.25, 0.5, 0.75, 1.0)


def randomise_bn(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.normal_(0, 0.2, generator=gen)


@torch.no_grad()
def measure(name: str, size: int) -> dict:
    torch.manual_seed(0)
    kwargs = {"init_weights": True} if name == "googlenet" else {}
    original = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    randomise_bn(original)
    x = torch.randn(1, 3, size, size)
    t0 = time.perf_counter()
    model = slimmable.convert(original, widths=WIDTHS, example_input=x).eval()
    seconds = time.perf_counter() - t0
    report = model.conversion_report
    macs = {}
    for w in WIDTHS:
        with model.use_width(w):
            macs[w] = count_macs(model, x)
    return {
        "model": name,
        "groups_slimmed": len(report.groups),
        "groups_frozen": len(report.frozen_groups),
        "params": report.params,
        "params_frozen": report.frozen_params,
        "macs": {str(w): m for w, m in macs.items()},
        "original_macs": count_macs(original, x),
        "max_abs_diff_at_1": report.max_abs_diff,
        "frozen_reasons": sorted({why.split(" (")[0] for _, why in report.frozen_groups}),
        "untraced": report.untraced,
        "convert_seconds": round(seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision model names")
    parser.add_argument("--input-size", type=int, default=224, help="square input side (default 224)")
    parser.add_argument("--json", default="benchmarks/results/convert_zoo.json", help="where to write the results")
    args = parser.parse_args()
    info = machine_info()
    print(describe_machine(info))
    rows = []
    header = "| model | groups slimmed | params frozen | MACs (M) at 0.25 / 0.5 / 0.75 / 1.0 | max abs diff at 1.0 |"
    lines = [header, "|---|---|---|---|---|"]
    for name in args.models.split(","):
        r = measure(name, args.input_size)
        rows.append(r)
        macs = " / ".join(f"{r['macs'][str(w)] / 1e6:.1f}" for w in WIDTHS)
        frozen = f"{r['params_frozen'] / 1e6:.2f}M of {r['params'] / 1e6:.2f}M"
        lines.append(f"| {name} | {r['groups_slimmed']} | {frozen} | {macs} | {r['max_abs_diff_at_1']:.1e} |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    write_json(args.json, {"machine": info, "input_size": args.input_size, "widths": WIDTHS, "rows": rows})


if __name__ == "__main__":
    main()
