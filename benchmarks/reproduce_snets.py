"""Reproduce the S-Nets paper's core claims on Fashion-MNIST: switchable BN against its baselines.

Four ways to get networks of several widths, on the same architecture, data, optimizer and budget:

* ``individual``  one network per width, trained alone (the reference);
* ``snet``        one slimmable network with switchable BN, Algorithm 1 (all widths every step);
* ``naive``       Algorithm 1 with one BN shared by all widths, evaluated with the shared running statistics
                  (``naive``) and with statistics re-estimated for each width right before evaluating it
                  (``naive_recal``): the paper's failure mode, and where it comes from;
* ``incremental`` train the narrowest width, freeze it, add the next width's channels and train only those, etc.

Budget: every width sees ``epochs`` epochs of training (``individual``: each network; ``snet``/``naive``: all
widths on every step; ``incremental``: each stage). Hyper-parameters are fixed in advance; model selection uses
no test data (the last epoch is reported), so the test split is only read for the final numbers.

Usage:
    python benchmarks/reproduce_snets.py           # 2 seeds, 3 epochs; resumes benchmarks/results/snets_study
    python benchmarks/reproduce_snets.py --quick   # small subset, for CI (asserted by the tests)
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

import slimmable
from slimmable.data import create_datasets, create_loader
from slimmable.hardware import Numerics, choose_numerics, describe_machine, machine_info
from slimmable.train import calibrate_bn, create_optimizer, create_scheduler, evaluate, train_step
from slimmable.train.incremental import FrozenSubnet

METHODS = ("individual", "snet", "naive", "incremental")
logger = logging.getLogger("reproduce_snets")


@dataclass(frozen=True)
class StudyConfig:
    """Everything that defines the study (saved with the results)."""

    # The main job's model (recipe fmnist_slim_resnet18): ResNet-18, stride-1 stem, 4 narrow widths.
    model: str = "slim_resnet18"
    widths: tuple[float, ...] = (0.0625, 0.125, 0.1875, 0.25)
    small_input: bool = True
    stem_stride: int = 1  # 2: a quarter of the MACs (the quick mode, so that CI fits on an AVX2-only CPU)
    epochs: int = 3
    batch_size: int = 256
    lr: float = 0.2  # for one width per step; divided by the number of widths trained per step
    weight_decay: float = 5e-4
    # as train.amp / train.channels_last: "auto" asks slimmable.hardware (bf16 only where the CPU runs it natively,
    # contiguous), or name the settings for a comparison
    amp: str = "auto"
    channels_last: bool | str = "auto"
    seeds: tuple[int, ...] = (0, 1)
    train_subset: int = 0  # 0: all 60,000 training images
    test_subset: int = 0  # 0: all 10,000 test images
    calib_batches: int = 20
    methods: tuple[str, ...] = METHODS
    threads: int = 0  # 0: torch's default


def _data(cfg: StudyConfig) -> tuple[Any, Any, Any]:
    splits = create_datasets("fashion_mnist", augment="crop_flip", crop_padding=2, hflip=True)
    train, test = splits.train, splits.test
    if cfg.train_subset:
        g = torch.Generator().manual_seed(1234)
        train = train.view(torch.randperm(len(train), generator=g)[: cfg.train_subset])
    if cfg.test_subset:
        test = test.view(torch.arange(cfg.test_subset))
    calib = train.view(augment="none")  # training images without augmentation, for BN re-estimation
    return train, calib, test


def _model(cfg: StudyConfig, widths: Sequence[float], norm: str = "switchable") -> torch.nn.Module:
    extra = {"stem_stride": cfg.stem_stride} if cfg.stem_stride != 1 else {}
    return slimmable.create_model(
        cfg.model, widths=tuple(widths), num_classes=10, in_chans=1, small_input=cfg.small_input, norm=norm, **extra
    )


def _train(
    cfg: StudyConfig,
    model: torch.nn.Module,
    train: Any,
    widths_per_step: Sequence[float],
    seed: int,
    setup: Callable[[torch.optim.Optimizer], object] | None = None,
) -> float:
    """``cfg.epochs`` epochs of Algorithm 1 over ``widths_per_step``; returns seconds."""
    torch.manual_seed(seed)
    loader = create_loader(train, cfg.batch_size, train=True, seed=seed)
    # Algorithm 1 sums the gradients of every width trained in a step; dividing the learning rate by their number
    # (i.e. averaging the losses) gives every method the same step size for the same base rate, fixed in advance.
    # Weight decay is scaled back up so that its per-step effect (lr * wd) is the same for every method too.
    n = len(widths_per_step)
    opt = create_optimizer(model, "sgd", cfg.lr / n, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay * n)
    sched = create_scheduler(opt, "cosine", epochs=cfg.epochs, steps_per_epoch=len(loader), warmup_epochs=0.3)
    hook = setup(opt) if setup is not None else None
    model.train()
    numerics = _numerics(cfg.amp, cfg.channels_last)
    fmt = torch.channels_last if numerics.channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    t0 = time.perf_counter()
    widths = sorted(widths_per_step, reverse=True)
    for epoch in range(cfg.epochs):
        loader.batch_sampler.sampler.set_epoch(epoch)
        for x, y in loader:
            x = x.contiguous(memory_format=fmt)
            train_step(model, opt, x, y, widths, autocast_dtype=numerics.autocast_dtype)
            sched.step()
    if hook is not None:
        hook.remove()  # type: ignore[attr-defined]
    return time.perf_counter() - t0


@functools.cache
def _numerics(amp: str, channels_last: bool | str) -> Numerics:
    return choose_numerics(amp, channels_last, "cpu")


def _test(model: torch.nn.Module, test: Any, widths: Sequence[float]) -> dict[float, float]:
    loader = create_loader(test, 1000, train=False)
    return {m.width: m.top1 for m in evaluate(model, loader, list(widths))}  # top1 is in %


def run_method(cfg: StudyConfig, method: str, seed: int, data: tuple[Any, Any, Any]) -> dict[str, Any]:
    """Train and test one method with one seed. Returns ``{"top1": {variant: {width: %}}, "seconds": s}``."""
    train, calib, test = data
    ws = tuple(sorted(cfg.widths))
    top1: dict[str, dict[float, float]] = {}
    seconds = 0.0
    if method == "individual":
        top1[method] = {}
        for w in ws:
            model = _model(cfg, (w,))
            seconds += _train(cfg, model, train, (w,), seed)
            top1[method].update(_test(model, test, (w,)))
    elif method == "snet":
        model = _model(cfg, ws)
        seconds += _train(cfg, model, train, ws, seed)
        top1[method] = _test(model, test, ws)
    elif method == "naive":
        model = _model(cfg, ws, norm="shared")
        seconds += _train(cfg, model, train, ws, seed)
        top1["naive"] = _test(model, test, ws)
        top1["naive_recal"] = {}
        calib_loader = create_loader(calib, cfg.batch_size, train=False)
        for w in ws:  # one set of statistics: re-estimate for w, then test w
            calibrate_bn(model, calib_loader, widths=[w], num_batches=cfg.calib_batches)
            top1["naive_recal"].update(_test(model, test, (w,)))
    elif method == "incremental":
        model = _model(cfg, ws)
        example = next(iter(create_loader(calib, 2, train=False)))[0]
        for k, w in enumerate(ws):
            prev = ws[k - 1] if k else None

            def freeze(opt: torch.optim.Optimizer, prev: float | None = prev) -> object:
                return FrozenSubnet(model, prev, example, opt) if prev is not None else _NoHook()

            seconds += _train(cfg, model, train, (w,), seed + 1000 * k, setup=freeze)
        top1[method] = _test(model, test, ws)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return {"top1": {k: {f"{w:g}": v for w, v in d.items()} for k, d in top1.items()}, "seconds": seconds}


class _NoHook:
    def remove(self) -> None:
        pass


@dataclass
class StudyResult:
    config: dict[str, Any]
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # f"{method}/{seed}" -> run_method output
    wall_seconds: float = 0.0
    machine: dict[str, Any] = field(default_factory=dict)  # slimmable.hardware.machine_info() of the last run
    numerics: dict[str, Any] = field(default_factory=dict)  # the precision / memory format used, and why

    def table(self) -> dict[str, dict[str, tuple[float, float, int]]]:
        """variant -> width -> (mean, spread (max - min) / 2, n seeds)."""
        acc: dict[str, dict[str, list[float]]] = {}
        for run in self.runs.values():
            for variant, per_w in run["top1"].items():
                for w, v in per_w.items():
                    acc.setdefault(variant, {}).setdefault(w, []).append(v)
        return {
            variant: {w: (statistics.mean(v), (max(v) - min(v)) / 2, len(v)) for w, v in per_w.items()}
            for variant, per_w in acc.items()
        }

    def markdown(self) -> str:
        tab = self.table()
        widths = sorted({w for per_w in tab.values() for w in per_w}, key=float)
        order = [v for v in ("individual", "snet", "naive", "naive_recal", "incremental") if v in tab]
        lines = ["| method | " + " | ".join(f"{w}x" for w in widths) + " |", "|---" * (len(widths) + 1) + "|"]
        names = {
            "individual": "individually trained",
            "snet": "S-Net (switchable BN)",
            "naive": "naive, shared BN statistics",
            "naive_recal": "naive, BN re-estimated per width",
            "incremental": "incremental",
        }
        for v in order:
            cells = []
            for w in widths:
                if w in tab[v]:
                    m, s, n = tab[v][w]
                    cells.append(f"{m:.2f} ± {s:.2f}" if n > 1 else f"{m:.2f}")
                else:
                    cells.append("-")
            lines.append(f"| {names[v]} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def run_study(cfg: StudyConfig, out: Path | None = None, resume: bool = True) -> StudyResult:
    """Run every method for every seed; results are saved after each run and reused when ``resume``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    result = StudyResult(config=asdict(cfg))
    path = out / "study.json" if out is not None else None
    if path is not None and resume and path.exists():
        saved = json.loads(path.read_text())
        if saved.get("config") == json.loads(json.dumps(asdict(cfg))):
            result = StudyResult(**saved)
            logger.info("reusing %d finished runs from %s", len(result.runs), path)
    data = _data(cfg)
    result.machine, result.numerics = machine_info(), _numerics(cfg.amp, cfg.channels_last).to_dict()
    logger.info("%s; %s", describe_machine(result.machine), _numerics(cfg.amp, cfg.channels_last).describe())
    t0 = time.perf_counter()
    for seed in cfg.seeds:
        for method in cfg.methods:
            key = f"{method}/{seed}"
            if key in result.runs:
                continue
            logger.info("training %s, seed %d", method, seed)
            result.runs[key] = run_method(cfg, method, seed, data)
            logger.info("  %s: %s (%.0f s)", key, result.runs[key]["top1"], result.runs[key]["seconds"])
            result.wall_seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(json.dumps(asdict(result), indent=2))
                os.replace(tmp, path)
    return result


def plot(result: StudyResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tab = result.table()
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, per_w in tab.items():
        ws = sorted(per_w, key=float)
        ax.errorbar([float(w) for w in ws], [per_w[w][0] for w in ws], yerr=[per_w[w][1] for w in ws],
                    marker="o", capsize=3, label=variant)  # fmt: skip
    ax.set_xlabel("width")
    ax.set_ylabel("Fashion-MNIST test top-1 (%)")
    ax.set_title("S-Nets vs baselines")
    lo = min(v[0] for per_w in tab.values() for v in per_w.values())
    ax.set_ylim(max(0.0, math.floor(lo / 5) * 5), 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# the CI check: 5,000 training images keep every ordering with a wide margin (S-Net 70-76%, individual 72-77%, shared
# BN 10-69%, re-estimated 69-75% on 2 cores) in 5/8 of the time 8,000 took
QUICK = StudyConfig(
    epochs=2, seeds=(0,), batch_size=128, lr=0.1, train_subset=5000, test_subset=2000, calib_batches=10, stem_stride=2
)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small subset and 1 seed (the CI check)")
    ap.add_argument("--seeds", help="comma-separated seeds (default 0,1)")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--model")
    ap.add_argument("--widths")
    ap.add_argument("--amp", choices=("auto", "off", "bf16"), help="autocast (default auto: bf16 only if native)")
    ap.add_argument("--channels-last", choices=("auto", "true", "false"), help="memory format (default auto)")
    ap.add_argument("--out", default="benchmarks/results/snets_study", help="results folder (finished runs are reused)")
    ap.add_argument("--fresh", action="store_true", help="ignore finished runs saved in --out")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    cfg = QUICK if args.quick else StudyConfig()
    over: dict[str, Any] = {}
    if args.seeds:
        over["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    if args.epochs:
        over["epochs"] = args.epochs
    if args.methods:
        over["methods"] = tuple(args.methods.split(","))
    if args.model:
        over["model"] = args.model
    if args.widths:
        over["widths"] = tuple(float(w) for w in args.widths.split(","))
    if args.amp:
        over["amp"] = args.amp
    if args.channels_last:
        over["channels_last"] = {"auto": "auto", "true": True, "false": False}[args.channels_last]
    cfg = replace(cfg, **over)
    out = Path(args.out)
    result = run_study(cfg, out, resume=not args.fresh)
    print(f"\n{cfg.model} widths {cfg.widths}, {cfg.epochs} epochs, seeds {cfg.seeds}, "
          f"{result.wall_seconds / 60:.1f} min on {describe_machine(result.machine)}")  # fmt: skip
    print(result.markdown())
    plot(result, out / "snets_study.png")
    (out / "snets_study.md").write_text(result.markdown() + "\n")
    print(f"wrote {out / 'study.json'}, {out / 'snets_study.png'}, {out / 'snets_study.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
