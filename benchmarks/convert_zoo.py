"""Convert the torchvision zoo (or, with ``--timm``, one model per timm CNN family) with ``slimmable.convert``:
groups slimmed, parameters frozen, MACs per width, and the largest difference to the original at width 1.0.

Each model is built with random weights (``weights=None``; nothing is downloaded), its BatchNorm statistics and
affine randomised so that they matter, converted at widths 0.25/0.5/0.75/1.0 with a 224 px example input, and
compared with the original on that input at width 1.0. MACs are ``torch.utils.flop_counter``'s (FLOPs/2) at
224 px, as ``slimmable profile`` counts them. Not a timing benchmark.

With ``--timm``: each family of :data:`TIMM_FAMILIES` (a ``timm.models`` module) is represented by its smallest
architecture (fewest parameters among the module's registered names, counted once on the meta device with timm
1.0.31), built with ``pretrained=False``, BatchNorm randomised as above, converted with a 64 px example input
(larger where the architecture needs it) and checked: it converts, equals the original at width 1.0,
``export_width`` at 0.5 equals the converted model at 0.5, and MACs at 0.5 are at most 0.6x those at 1.0 (the
issue's target). A failure in one family is recorded and the run goes on.

With ``--transformers``: the vision transformers of :data:`TRANSFORMERS` (torchvision's ViT and Swin, timm's
DeiT, ViT and Swin) at 64 px (ViTs built for 64 px: ``image_size`` / ``img_size``), LayerNorm affines, relative
position biases and zero-initialised layers randomised, converted and checked: equal to the original at 1.0,
``export_width`` at 0.5 equal to the converted model (its attention class and heads recorded), the ONNX file of
width 0.5 run by onnxruntime against PyTorch, MACs at 0.5 and 0.25 relative to 1.0 (target: at most 0.6 at 0.5).

Usage:
    python benchmarks/convert_zoo.py [--models resnet18,mobilenet_v2] [--json benchmarks/results/convert_zoo.json]
    python benchmarks/convert_zoo.py --timm [--models cspnet,vgg] [--json benchmarks/results/convert_zoo_timm.json]
    python benchmarks/convert_zoo.py --transformers [--json benchmarks/results/convert_zoo_transformers.json]
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision
from _bench import describe_machine, machine_info, write_json
from torch import nn

import slimmable
from slimmable.export import export_width
from slimmable.search.cost import count_macs

MODELS = (
    "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_small",
    "mobilenet_v3_large", "mnasnet1_0", "efficientnet_b0", "regnet_y_400mf", "shufflenet_v2_x1_0", "densenet121",
    "convnext_tiny", "vgg11_bn", "squeezenet1_1", "googlenet", "vit_b_16", "swin_t",
)  # fmt: skip
WIDTHS = (0.25, 0.5, 0.75, 1.0)

#: timm CNN family (its ``timm.models`` module) -> (smallest architecture, input side in px)
TIMM_FAMILIES = {
    "byobnet": ("mobileone_s1", 64), "convmixer": ("convmixer_768_32", 64), "convnext": ("convnext_zepto_rms", 64),
    "cspnet": ("cs3darknet_focus_s", 64), "cspnext": ("cspnext_tiny", 64), "densenet": ("densenet121", 64),
    "dla": ("dla46x_c", 64), "dpn": ("dpn48b", 64), "efficientnet": ("mobilenetv2_035", 64),
    "fasternet": ("fasternet_t0", 64), "ghostnet": ("ghostnet_050", 64), "hardcorenas": ("hardcorenas_b", 64),
    "hgnet": ("hgnetv2_b0", 64), "hrnet": ("hrnet_w18_small", 64), "inception_next": ("inception_next_atto", 64),
    "inception_resnet_v2": ("inception_resnet_v2", 96), "inception_v3": ("inception_v3", 96),
    "inception_v4": ("inception_v4", 96), "lcnetv2": ("lcnetv2_small", 64), "mambaout": ("mambaout_femto", 64),
    "mobilenetv3": ("mobilenetv3_small_050", 64), "nasnet": ("nasnetalarge", 96), "pnasnet": ("pnasnet5large", 96),
    "nfnet": ("nf_regnet_b0", 64), "rdnet": ("rdnet_tiny", 64), "regnet": ("regnetx_002", 64),
    "repghost": ("repghostnet_050", 64), "repvit": ("repvit_m1", 64), "res2net": ("res2next50", 64),
    "resnest": ("resnest14d", 64), "resnet": ("resnet10t", 64), "resnetv2": ("resnetv2_18", 64),
    "rexnet": ("rexnet_100", 64), "selecsls": ("selecsls42", 64), "senet": ("legacy_seresnet18", 64),
    "sknet": ("skresnet18", 64), "starnet": ("starnet_s050", 64), "tresnet": ("tresnet_m", 64),
    "vgg": ("vgg11", 64), "vovnet": ("ese_vovnet19b_slim_dw", 64), "xception": ("legacy_xception", 96),
    "xception_aligned": ("xception41p", 64),
}  # fmt: skip
#: timm families left out, and why: attention or other token mixers (transformers and hybrids are issue 25)
TIMM_EXCLUDED = {
    "transformer or hybrid (attention)": (
        "beit byoanet cait coat convit cpubone crossvit davit deepseek_vit deit edgenext efficientformer "
        "efficientformer_v2 efficientvit_mit efficientvit_msra eva fastvit focalnet gcvit gemma4_vit hiera "
        "hieradet_sam2 iformer levit lowformer maxxvit metaformer mobilenetv5 mobilevit mvitv2 naflexvit nest "
        "nextvit pit pvt_v2 qwen3_vit shvit swiftformer swin_transformer swin_transformer_v2 "
        "swin_transformer_v2_cr tiny_vit tnt twins visformer vision_transformer vision_transformer_hybrid "
        "vision_transformer_relpos vision_transformer_sam vitamin volo xcit"
    ),
    "token-mixing MLP, recurrent or state-space mixer": "mlp_mixer sequencer efficientvim",
    "frequency-domain transform with spatial attention": "csatv2",
}
#: what each check asks (the issue's target for MACs)
MACS_TARGET = 0.6
#: vision transformers (library/architecture -> input side in px; ViTs are built for that side)
TRANSFORMERS = {
    "torchvision/vit_b_16": 64, "torchvision/swin_t": 64, "timm/deit_tiny_patch16_224": 64,
    "timm/vit_small_patch16_224": 64, "timm/swin_tiny_patch4_window7_224": 64,
}  # fmt: skip


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


def measure_timm(family: str, arch: str, size: int) -> dict:
    """Convert ``arch`` and run the four checks; an exception anywhere is recorded as the family's failure."""
    import timm

    row: dict = {"family": family, "model": arch, "input_size": size, "converts": False}
    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        original = timm.create_model(arch, pretrained=False).eval()
        randomise_bn(original)
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            ref = original(x)
        t1 = time.perf_counter()
        model = slimmable.convert(original, widths=WIDTHS, example_input=x).eval()
        row["convert_seconds"] = round(time.perf_counter() - t1, 2)
        report = model.conversion_report
        row.update(params=report.params, params_frozen=report.frozen_params, groups_slimmed=len(report.groups))
        row["frozen_ops"] = sorted({f"{where}: {why}" for where, why in report.frozen_ops})[:12]
        row["untraced"] = report.untraced
        with torch.no_grad():
            row["max_abs_diff_at_1"] = float((model(x) - ref).abs().max())
            row["equal_at_1"] = bool(torch.allclose(model(x), ref, atol=1e-4, rtol=1e-4))
        row["converts"] = True
        macs = {}
        for w in WIDTHS:
            with model.use_width(w):
                macs[w] = count_macs(model, x)
        row["macs"] = {str(w): m for w, m in macs.items()}
        row["macs_ratio"] = {str(w): macs[w] / macs[1.0] for w in WIDTHS}
        with torch.no_grad(), model.use_width(0.5):
            y = model(x)
            dense = export_width(model, 0.5, example=x)
            row["export_max_abs_diff_at_0.5"] = float((dense(x) - y).abs().max())
            row["export_equal_at_0.5"] = bool(torch.allclose(dense(x), y, atol=1e-4, rtol=1e-4))
    except Exception as err:  # recorded: the table says which family fails and how
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row["passes"] = bool(
        row["converts"]
        and row.get("equal_at_1")
        and row.get("export_equal_at_0.5")
        and row.get("macs_ratio", {}).get("0.5", 1.0) <= MACS_TARGET
    )
    return row


def main_timm(args: argparse.Namespace, info: dict) -> None:
    import timm

    families = args.models.split(",") if args.models else list(TIMM_FAMILIES)
    unknown = [f for f in families if f not in TIMM_FAMILIES]
    if unknown:
        raise SystemExit(f"unknown timm families {unknown}; choose from {', '.join(TIMM_FAMILIES)}")
    header = (
        "| family | model | converts | equal at 1.0 (max abs diff) | export at 0.5 | MACs at 0.5 / 0.25 "
        "| params frozen | seconds |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    rows = []
    for fam in families:
        arch, size = TIMM_FAMILIES[fam]
        r = measure_timm(fam, arch, size)
        rows.append(r)
        if r["converts"]:
            ratio = r.get("macs_ratio", {})
            macs = f"{ratio['0.5']:.2f}x / {ratio['0.25']:.2f}x" if ratio else "-"
            eq = f"{'yes' if r['equal_at_1'] else 'NO'} ({r['max_abs_diff_at_1']:.1e})"
            exp = "yes" if r.get("export_equal_at_0.5") else ("NO" if "export_equal_at_0.5" in r else "-")
            frozen = f"{r['params_frozen'] / r['params']:.0%} of {r['params'] / 1e6:.1f}M"
        else:
            macs = eq = exp = frozen = "-"
        conv = "yes" if r["converts"] else "NO"
        lines.append(f"| {fam} | {arch} ({r['input_size']} px) | {conv} | {eq} | {exp} | {macs} | {frozen} "
                     f"| {r['seconds']:.1f} |")  # fmt: skip
        print(lines[-1] + (f"  {r['error']}" if "error" in r else ""), flush=True)
    passed = sum(r["passes"] for r in rows)
    print("\n".join(lines))
    print(f"{passed} of {len(rows)} families pass all checks ({passed / len(rows):.0%}; target 90%)")
    for r in rows:
        if not r["passes"]:
            why = r.get("error") or "; ".join(r.get("frozen_ops", [])[:3]) or "-"
            print(f"  misses: {r['family']} ({r['model']}): {why}")
    write_json(
        args.json or "benchmarks/results/convert_zoo_timm.json",
        {"machine": info, "timm": timm.__version__, "widths": WIDTHS, "macs_target": MACS_TARGET,
         "excluded": TIMM_EXCLUDED, "passed": passed, "families": len(rows), "rows": rows},
    )  # fmt: skip


def build_transformer(name: str, size: int) -> nn.Module:
    """The original with random weights, the tensors a conversion slices randomised so that they matter."""
    torch.manual_seed(0)
    lib, arch = name.split("/", 1)
    if lib == "torchvision":
        kwargs = {"image_size": size} if arch.startswith("vit") else {}
        model = torchvision.models.get_model(arch, weights=None, **kwargs)
    else:
        import timm

        model = timm.create_model(arch, pretrained=False, img_size=size)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "relative_position_bias_table" in pname:
                p.normal_(0, 0.5, generator=gen)
        for m in model.modules():
            if isinstance(m, nn.Linear) and not m.weight.any():  # torchvision's ViT head starts at zero
                m.weight.normal_(0, 0.02, generator=gen)
            if isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.2, generator=gen)
    return model.eval()


def measure_transformer(name: str, size: int, tmp: str) -> dict:
    """Convert ``name`` and run the checks; an exception anywhere is recorded as the model's failure."""
    from slimmable.export import export_onnx
    from slimmable.nn import SlimMultiheadAttention

    row: dict = {"model": name, "input_size": size, "converts": False}
    t0 = time.perf_counter()
    try:
        original = build_transformer(name, size)
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            ref = original(x)
        t1 = time.perf_counter()
        model = slimmable.convert(original, widths=WIDTHS, example_input=x).eval()
        row["convert_seconds"] = round(time.perf_counter() - t1, 2)
        report = model.conversion_report
        row.update(params=report.params, params_frozen=report.frozen_params, groups_slimmed=len(report.groups))
        row["attention_converted"] = sum(isinstance(m, SlimMultiheadAttention) for m in model.modules())
        row["heads"] = sorted({"/".join(map(str, a.channels)) for a in report.attention})
        row["frozen"] = sorted({why.split(" (")[0] for _, why in report.frozen_groups})
        row["frozen_ops"] = sorted({f"{where}: {why}" for where, why in report.frozen_ops})[:12]
        row["untraced"] = report.untraced
        with torch.no_grad():
            y = model(x)
        row["max_abs_diff_at_1"] = float((y - ref).abs().max())
        row["equal_at_1"] = bool(torch.allclose(y, ref, atol=1e-4, rtol=1e-4))
        row["converts"] = True
        macs = {}
        for w in WIDTHS:
            with model.use_width(w):
                macs[w] = count_macs(model, x)
        row["macs"] = {str(w): m for w, m in macs.items()}
        row["macs_ratio"] = {str(w): macs[w] / macs[1.0] for w in WIDTHS}
        with torch.no_grad(), model.use_width(0.5):
            y = model(x)
            dense = export_width(model, 0.5, example=x)
            row["export_max_abs_diff_at_0.5"] = float((dense(x) - y).abs().max())
            row["export_equal_at_0.5"] = bool(torch.allclose(dense(x), y, atol=1e-4, rtol=1e-4))
        kinds = {
            f"{type(m).__module__.split('.')[0]}.{type(m).__name__}"
            for m in dense.modules()
            if hasattr(m, "num_heads") and isinstance(getattr(m, "qkv", None), nn.Linear)
        }
        row["dense_attention"] = sorted(kinds)
        try:
            res = export_onnx(model, f"{tmp}/{name.replace('/', '_')}.onnx", width=0.5, input_size=size)
            row["onnx_ok"], row["onnx_max_abs_diff"], row["onnx_exporter"] = True, res.max_abs_diff, res.exporter
        except Exception as err:  # recorded: the table says which export fails
            row["onnx_ok"] = False
            row["onnx_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
    except Exception as err:  # recorded: the table says which model fails and how
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row["passes"] = bool(
        row["converts"]
        and row.get("equal_at_1")
        and row.get("export_equal_at_0.5")
        and row.get("onnx_ok")
        and row.get("macs_ratio", {}).get("0.5", 1.0) <= MACS_TARGET
    )
    return row


def main_transformers(args: argparse.Namespace, info: dict) -> None:
    import tempfile

    import timm

    names = args.models.split(",") if args.models else list(TRANSFORMERS)
    header = (
        "| model | converts | attention (heads at 0.25/0.5/0.75/1) | equal at 1.0 (max abs diff) | export at 0.5 "
        "| ONNX at 0.5 | MACs at 0.5 / 0.25 | params frozen | seconds |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            size = TRANSFORMERS.get(name, args.input_size)
            r = measure_transformer(name, size, tmp)
            rows.append(r)
            if r["converts"]:
                ratio = r["macs_ratio"]
                macs = f"{ratio['0.5']:.2f}x / {ratio['0.25']:.2f}x"
                eq = f"{'yes' if r['equal_at_1'] else 'NO'} ({r['max_abs_diff_at_1']:.1e})"
                exp = "yes" if r.get("export_equal_at_0.5") else "NO"
                exp += f" ({', '.join(r.get('dense_attention', []))})"
                onnx = f"yes ({r['onnx_max_abs_diff']:.1e})" if r.get("onnx_ok") else "NO"
                frozen = f"{r['params_frozen'] / r['params']:.0%} of {r['params'] / 1e6:.1f}M"
                attn = f"{r['attention_converted']} layers, {'; '.join(r['heads'])}"
            else:
                macs = eq = exp = onnx = frozen = attn = "-"
            conv = "yes" if r["converts"] else "NO"
            lines.append(f"| {name} ({size} px) | {conv} | {attn} | {eq} | {exp} | {onnx} | {macs} | {frozen} "
                         f"| {r['seconds']:.1f} |")  # fmt: skip
            print(lines[-1] + (f"  {r.get('error') or r.get('onnx_error') or ''}"), flush=True)
    passed = sum(r["passes"] for r in rows)
    print("\n".join(lines))
    print(f"{passed} of {len(rows)} transformers pass all checks")
    write_json(
        args.json or "benchmarks/results/convert_zoo_transformers.json",
        {"machine": info, "timm": timm.__version__, "torchvision": torchvision.__version__, "torch": torch.__version__,
         "widths": WIDTHS, "macs_target": MACS_TARGET, "passed": passed, "rows": rows},
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated torchvision model names (with --timm: timm families)")
    parser.add_argument("--input-size", type=int, default=224, help="square input side (default 224)")
    parser.add_argument(
        "--json", help="where to write the results (default benchmarks/results/convert_zoo[_timm].json)"
    )
    parser.add_argument("--timm", action="store_true", help="one model per timm CNN family instead of torchvision's")
    parser.add_argument("--transformers", action="store_true", help="torchvision's and timm's vision transformers")
    args = parser.parse_args()
    info = machine_info()
    if args.transformers:
        print(describe_machine(info))
        main_transformers(args, info)
        return
    if args.timm:
        print(describe_machine(info))
        main_timm(args, info)
        return
    args.models = args.models or ",".join(MODELS)
    args.json = args.json or "benchmarks/results/convert_zoo.json"
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
