"""US-Nets and AutoSlim on Fashion-MNIST, from one trained universally slimmable checkpoint.

Three experiments on ``runs/fmnist_us_mobilenet_v1/best.pt`` (``slimmable train --recipe
fmnist_us_mobilenet_v1``: US-MobileNet v1 over widths 0.25-1.0, sandwich rule with 4 widths,
in-place distillation):

1. **Any width** (``widths``): test top-1 at 16 widths 0.25, 0.30, ..., 1.0. Training draws the middle widths
   uniformly at random, so only 0.25 and 1.0 are ever trained exactly. Each width is evaluated
   * *calibrated*: its own BN statistics, re-estimated on 20 batches of 128 training images (no augmentation);
   * *not calibrated*: the widest width's running statistics, sliced to the width's channels (one set of
     statistics for every width: what a US-Net without calibration has);
   and for four widths with 1 to 50 calibration batches.
2. **Search** (``search``): ``slimmable search`` on the same checkpoint at two MACs budgets, ranking candidates on
   1,000 of the 5,000 training images the run held out, each step narrowing one layer group by (1.0 - 0.25) / 6 of
   width. The uniform width compared with each found network is the
   widest uniform width within the same budget.
3. **Found vs uniform** (``supernet`` and ``scratch``): both networks of each budget are (a) taken out of the
   trained US-Net with BN statistics re-estimated (``calibrate_channels``) and (b) trained from scratch as
   ordinary single-width networks, ``fmnist_mobilenet_v1_channels`` with ``model.channels`` (the US
   recipe's data, schedule and epochs; lr 0.1, the US recipe's 0.025 times the 4 widths it sums per step), for
   ``--seeds``. The from-scratch runs use the training images the US run held out to pick their best epoch.

4. **Per-layer random widths** (``per_layer``, not run by default): a second US-Net trained with
   ``--set train.per_layer_widths=true`` (non-uniform random widths in the sandwich), evaluated like the first: at
   the 16 widths (calibrated) and at both networks of each budget, taken out with re-estimated statistics.

Only the final numbers read the test split; the search and every choice use training images.

Usage:
    python benchmarks/us_autoslim_fmnist.py                       # all stages, resumes benchmarks/results/us_autoslim
    python benchmarks/us_autoslim_fmnist.py --stages scratch --jobs 2   # two single-threaded trainings at a time
    python benchmarks/us_autoslim_fmnist.py --stages per_layer   # after training runs/fmnist_us_mobilenet_v1_pl
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import slimmable
from slimmable.cli._trained import load_trained, training_splits
from slimmable.cli.main import main as cli_main
from slimmable.data import create_loader
from slimmable.nn import USBatchNorm2d, slim_modules
from slimmable.search import count_macs
from slimmable.search.autoslim import load_channel_spec
from slimmable.train import add_stat_widths, calibrate_bn, calibrate_channels, evaluate

GRID = tuple(round(0.25 + 0.05 * i, 2) for i in range(16))  # 0.25 .. 1.0
CALIB_BATCHES = 20
SWEEP_WIDTHS = (0.3, 0.55, 0.8, 1.0)
SWEEP_BATCHES = (1, 2, 5, 20, 50)
STAGES = ("widths", "search", "supernet", "scratch", "per_layer")
SCRATCH_RECIPE = "fmnist_mobilenet_v1_channels"  # packaged: slimmable/recipes/


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _save(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


class Study:
    def __init__(self, checkpoint: Path, out: Path) -> None:
        self.checkpoint, self.out = checkpoint, out
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "results.json"
        self.results: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.ckpt, self.model, self.cfg = load_trained(checkpoint, torch.device("cpu"))
        self.splits = training_splits(self.cfg)
        self.test = create_loader(self.splits.test, 500, train=False)
        self.input = (1, self.splits.in_chans, self.splits.image_size, self.splits.image_size)

    def save(self) -> None:
        _save(self.path, self.results)

    def calib_loader(self, seed: int = 0) -> Any:
        return create_loader(self.splits.train, min(128, len(self.splits.train)), train=True, seed=seed)

    def top1(self, model: torch.nn.Module, widths: list[float]) -> dict[float, float]:
        return {m.width: m.top1 for m in evaluate(model, self.test, widths)}

    def macs(self, model: torch.nn.Module) -> float:
        """MACs of one image. On a copy in training mode (two images), so that widths without BN statistics run
        too and no running statistics of ``model`` move."""
        probe = copy.deepcopy(model).train()
        return count_macs(probe, torch.zeros(2, *self.input[1:]), eval_mode=False) / 2

    # 1. any width, with and without calibration
    def widths(self) -> None:
        if "widths" in self.results:
            return
        t0 = time.time()
        base = copy.deepcopy(self.model)
        rows = []
        nocal = copy.deepcopy(base)
        add_stat_widths(nocal, GRID)
        _copy_widest_stats(nocal)
        cal = copy.deepcopy(base)
        calibrate_bn(cal, self.calib_loader(), GRID, num_batches=CALIB_BATCHES)
        acc_nocal, acc_cal = self.top1(nocal, list(GRID)), self.top1(cal, list(GRID))
        trained_stats = set(base.widths)
        for w in GRID:
            with slimmable.use_width(cal, w):
                macs = self.macs(cal)
            rows.append({"width": w, "macs": macs, "calibrated": acc_cal[w], "not_calibrated": acc_nocal[w],
                         "trained_exactly": w in (min(GRID), max(GRID)),
                         "stats_after_training": w in trained_stats})  # fmt: skip
            _log(f"width {w:.2f}: calibrated {acc_cal[w]:.2f}  not calibrated {acc_nocal[w]:.2f}")
        sweep: dict[str, dict[str, float]] = {}
        for n in SWEEP_BATCHES:
            m = copy.deepcopy(base)
            calibrate_bn(m, self.calib_loader(), SWEEP_WIDTHS, num_batches=n)
            sweep[str(n)] = {f"{w:g}": v for w, v in self.top1(m, list(SWEEP_WIDTHS)).items()}
            _log(f"{n} calibration batches: {sweep[str(n)]}")
        self.results["widths"] = {"rows": rows, "calibration_batches": sweep, "seconds": time.time() - t0}
        self.save()

    # 2. AutoSlim search
    def search(self, budgets: list[str], heldout: int, steps: int) -> None:
        if "search" in self.results:
            return
        out = self.out / "search"
        args = ["search", "--checkpoint", str(self.checkpoint), "--budgets", ",".join(budgets), "--out", str(out),
                "--heldout", str(heldout), "--steps", str(steps), "--split", "val"]  # fmt: skip
        if (out / "search_state.json").exists():
            args.append("--resume")
        t0 = time.time()
        rc = cli_main(args)
        if rc != 0:
            raise SystemExit(f"slimmable search failed ({rc})")
        found = {}
        for b in budgets:
            spec = load_channel_spec(out / f"spec_{b}.json")
            meta = json.loads((out / f"spec_{b}.json").read_text())["meta"]
            w = self._uniform_width_within(meta["budget"])
            with slimmable.use_width(self.model, w):
                uniform = slimmable.get_channels(self.model)
                uniform_macs = self.macs(self.model)
            _save(out / f"uniform_{b}.json", {"channels": uniform, "meta": {"width": w, "macs": uniform_macs}})
            found[b] = {"budget": meta["budget"], "searched_macs": meta["cost"], "heldout_top1": meta["heldout_top1"],
                        "uniform_width": w, "uniform_macs": uniform_macs, "spec": spec}  # fmt: skip
            _log(f"budget {b}: searched {meta['cost'] / 1e6:.2f}M MACs, uniform width {w:g} {uniform_macs / 1e6:.2f}M")
        self.results["search"] = {"budgets": found, "seconds": time.time() - t0}
        self.save()

    def _uniform_width_within(self, budget: float) -> float:
        lo, hi = float(self.model.widths[0]), float(self.model.widths[-1])
        best = lo
        for i in range(round((hi - lo) / 0.005) + 1):
            w = round(lo + 0.005 * i, 3)
            with slimmable.use_width(self.model, w):
                if self.macs(self.model) <= budget:
                    best = w
        return best

    def _specs(self) -> dict[str, dict[str, dict[str, int]]]:
        out = {}
        for b in self.results["search"]["budgets"]:
            out[b] = {"searched": load_channel_spec(self.out / "search" / f"spec_{b}.json"),
                      "uniform": load_channel_spec(self.out / "search" / f"uniform_{b}.json")}  # fmt: skip
        return out

    # 3a. both networks out of the trained US-Net, statistics re-estimated
    def supernet(self) -> None:
        if "supernet" in self.results:
            return
        self.results["supernet"] = self._out_of(self.model, "supernet")
        self.save()

    def _out_of(self, model: torch.nn.Module, what: str) -> dict[str, dict[str, float]]:
        rows = {}
        for b, specs in self._specs().items():
            for kind, spec in specs.items():
                fixed = calibrate_channels(model, spec, self.calib_loader(), num_batches=CALIB_BATCHES)
                rows[f"{b}/{kind}"] = {"macs": self.macs(fixed), "top1": self.top1(fixed, [1.0])[1.0]}
                _log(f"{what} {b} {kind}: {rows[f'{b}/{kind}']}")
        return rows

    # 4. the same, for a US-Net trained with per-layer random widths (train.per_layer_widths)
    def per_layer(self, checkpoint: Path) -> None:
        if "per_layer" in self.results:
            return
        _, model, _ = load_trained(checkpoint, torch.device("cpu"))
        calibrate_bn(model, self.calib_loader(), GRID, num_batches=CALIB_BATCHES)
        widths = {f"{w:g}": v for w, v in self.top1(model, list(GRID)).items()}
        _log(f"per-layer US-Net, calibrated: {widths}")
        self.results["per_layer"] = {"checkpoint": str(checkpoint), "widths": widths,
                                     "specs": self._out_of(model, "per-layer US-Net")}  # fmt: skip
        self.save()

    # 3b. both networks trained from scratch
    def scratch(self, seeds: list[int], epochs: int, jobs: int) -> None:
        runs = []
        for b, specs in self._specs().items():
            for kind in specs:
                spec_file = self.out / "search" / f"{'spec' if kind == 'searched' else 'uniform'}_{b}.json"
                for seed in seeds:
                    runs.append((f"{b}_{kind}_s{seed}", spec_file, seed))
        pending = [r for r in runs if not (self.out / "scratch" / r[0] / "final_metrics.json").exists()]
        _log(
            f"scratch: {len(runs) - len(pending)} of {len(runs)} runs finished, {len(pending)} to go ({jobs} at a time)"
        )
        procs: list[tuple[str, subprocess.Popen]] = []
        while pending or procs:
            while pending and len(procs) < jobs:
                name, spec_file, seed = pending.pop(0)
                procs.append((name, self._launch(name, spec_file, seed, epochs)))
            time.sleep(5)
            for item in list(procs):
                if item[1].poll() is not None:
                    procs.remove(item)
                    if item[1].returncode != 0:
                        raise SystemExit(f"training {item[0]} failed; see {self.out / 'scratch' / item[0] / 'log.txt'}")
                    _log(f"scratch {item[0]} done")
        rows = {}
        for name, _, _ in runs:
            fm = json.loads((self.out / "scratch" / name / "final_metrics.json").read_text())
            row = fm["widths"][0]
            rows[name] = {"top1": row["top1"], "macs": row.get("macs"), "params": row.get("params")}
        self.results["scratch"] = {"epochs": epochs, "seeds": seeds, "runs": rows}
        self.save()

    def _launch(self, name: str, spec_file: Path, seed: int, epochs: int) -> subprocess.Popen:
        run = self.out / "scratch" / name
        run.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "slimmable.cli.main", "train", "--recipe", SCRATCH_RECIPE, "--out", str(run),
               "--set", f"model.channels={spec_file}", "--set", f"train.seed={seed}", "--set", f"train.epochs={epochs}",
               "--no-tensorboard", "--no-progress", "--latency-runs", "0"]  # fmt: skip
        if (run / "last.pt").exists():
            cmd = [*cmd[:4], "--resume", str(run / "last.pt"), *cmd[4:]]
        dc = self.cfg.data  # the US run's data and held-out split
        for key in ("root", "image_size", "val_size", "split_seed", "batch_size", "download"):
            cmd += ["--set", f"data.{key}={json.dumps(getattr(dc, key))}"]  # JSON is YAML: null, true, 5000
        env = dict(os.environ, OMP_NUM_THREADS="1")
        _log(f"scratch {name}: {' '.join(cmd[2:])}")
        return subprocess.Popen(cmd, stdout=open(run / "log.txt", "a"), stderr=subprocess.STDOUT, env=env)


def _copy_widest_stats(model: torch.nn.Module) -> None:
    """Every width's statistics := the widest width's, sliced (no calibration: one set of statistics)."""
    for _, m in slim_modules(model):
        if isinstance(m, USBatchNorm2d):
            top = m.bn[len(m.stat_widths) - 1]
            for bn in m.bn:
                c = bn.num_features
                bn.running_mean.copy_(top.running_mean[:c])
                bn.running_var.copy_(top.running_var[:c])


def _scratch(results: dict[str, Any], budget: str, kind: str) -> list[float]:
    """Test top-1 of the from-scratch runs of one network, over seeds."""
    runs = results.get("scratch", {}).get("runs", {})
    return [v["top1"] for k, v in runs.items() if k.startswith(f"{budget}_{kind}_")]


def _mean_spread(vals: list[float]) -> str:
    if not vals:
        return "-"
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{mean:.2f} (1 seed)"
    return f"{mean:.2f} ± {(max(vals) - min(vals)) / 2:.2f} ({len(vals)} seeds)"


def report(results: dict[str, Any], out: Path) -> str:
    lines = ["# US-Nets and AutoSlim on Fashion-MNIST", ""]
    if "widths" in results:
        lines += ["## Any width: test top-1 (%) with and without BN calibration", "",
                  "| width | MACs (M) | calibrated (20 batches) | not calibrated (width 1.0's statistics) | trained at "
                  "exactly this width | per-layer-trained US-Net, calibrated |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in results["widths"]["rows"]:
            pl = results.get("per_layer", {}).get("widths", {}).get(f"{r['width']:g}")
            cells = [f"{r['width']:.2f}", f"{r['macs'] / 1e6:.1f}", f"{r['calibrated']:.2f}",
                     f"{r['not_calibrated']:.2f}", "every step" if r["trained_exactly"] else "never",
                     "-" if pl is None else f"{pl:.2f}"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        sweep = results["widths"]["calibration_batches"]
        ws = list(next(iter(sweep.values())))
        lines += ["", "Calibration batches (128 images each) vs test top-1 (%):", "",
                  "| batches | " + " | ".join(f"width {w}" for w in ws) + " |",
                  "|---" * (len(ws) + 1) + "|"]  # fmt: skip
        for n, accs in sweep.items():
            lines.append(f"| {n} | " + " | ".join(f"{accs[w]:.2f}" for w in ws) + " |")
    if "search" in results:
        lines += ["", "## AutoSlim search vs uniform width (test top-1 %)", "",
                  "| budget | network | MACs (M) | held-out top-1 (search) | out of the US-Net, calibrated | "
                  "out of the per-layer-trained US-Net | from scratch |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for b, f in results["search"]["budgets"].items():
            for kind in ("searched", "uniform"):
                macs = f["searched_macs"] if kind == "searched" else f["uniform_macs"]
                held = f"{f['heldout_top1']:.2f}" if kind == "searched" else "-"
                sup = results.get("supernet", {}).get(f"{b}/{kind}")
                name = kind if kind == "searched" else f"uniform {f['uniform_width']:g}"
                pl = results.get("per_layer", {}).get("specs", {}).get(f"{b}/{kind}")
                cells = [b, name, f"{macs / 1e6:.2f}", held, f"{sup['top1']:.2f}" if sup else "-",
                         f"{pl['top1']:.2f}" if pl else "-", _mean_spread(_scratch(results, b, kind))]  # fmt: skip
                lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (out / "us_autoslim.md").write_text(text)
    return text


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    if "widths" in results:
        rows = results["widths"]["rows"]
        ax = axes[0]
        ax.plot([r["width"] for r in rows], [r["calibrated"] for r in rows], "o-", label="calibrated (20 batches)")
        ax.plot([r["width"] for r in rows], [r["not_calibrated"] for r in rows], "s--", label="not calibrated")
        pl = results.get("per_layer", {}).get("widths")
        if pl:
            ax.plot([float(w) for w in pl], list(pl.values()), "^:", label="per-layer-trained, calibrated")
        ax.set(xlabel="width", ylabel="test top-1 (%)", title="US-MobileNet v1, Fashion-MNIST")
        ax.legend()
        ax.grid(alpha=0.3)
    if "search" in results:
        ax = axes[1]
        for kind, marker in (("searched", "o"), ("uniform", "s")):
            xs, sup, scr, pls = [], [], [], []
            for b, f in results["search"]["budgets"].items():
                xs.append((f["searched_macs"] if kind == "searched" else f["uniform_macs"]) / 1e6)
                sup.append(results.get("supernet", {}).get(f"{b}/{kind}", {}).get("top1"))
                pls.append(results.get("per_layer", {}).get("specs", {}).get(f"{b}/{kind}", {}).get("top1"))
                vals = _scratch(results, b, kind)
                scr.append(sum(vals) / len(vals) if vals else None)
            if all(v is not None for v in sup):
                ax.plot(xs, sup, marker + "--", label=f"{kind}, out of the US-Net")
            if all(v is not None for v in pls):
                ax.plot(xs, pls, marker + ":", label=f"{kind}, out of the per-layer-trained US-Net")
            if all(v is not None for v in scr):
                ax.plot(xs, scr, marker + "-", label=f"{kind}, trained from scratch")
        ax.set(xlabel="MACs (M)", ylabel="test top-1 (%)", title="AutoSlim search vs uniform width")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "us_autoslim.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="runs/fmnist_us_mobilenet_v1/best.pt", type=Path)
    ap.add_argument(
        "--per-layer-checkpoint", default="runs/fmnist_us_mobilenet_v1_pl/best.pt", type=Path,
        help="stage per_layer: the same recipe trained with --set train.per_layer_widths=true",
    )  # fmt: skip
    ap.add_argument("--out", default="benchmarks/results/us_autoslim", type=Path)
    ap.add_argument("--stages", default="widths,search,supernet,scratch",
                    help=f"comma-separated subset of {','.join(STAGES)} (default: all but per_layer)")  # fmt: skip
    ap.add_argument("--budgets", default="10M,20M", help="MACs budgets of the search")
    ap.add_argument("--heldout", type=int, default=1000, help="held-out images ranking the search's candidates")
    ap.add_argument("--steps", type=int, default=6, help="notches per layer in the search (width step (hi-lo)/steps)")
    ap.add_argument("--seeds", default="0", help="seeds of the from-scratch trainings")
    ap.add_argument("--epochs", type=int, default=4, help="epochs of the from-scratch trainings (the US run's 4)")
    ap.add_argument("--jobs", type=int, default=2, help="from-scratch trainings at a time (one thread each)")
    args = ap.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    if bad := [s for s in stages if s not in STAGES]:
        ap.error(f"unknown stages {bad}; choose from {','.join(STAGES)}")
    if not args.checkpoint.exists():
        ap.error(f"{args.checkpoint} does not exist: train it with `slimmable train --recipe "
                 "fmnist_us_mobilenet_v1`")  # fmt: skip
    study = Study(args.checkpoint, args.out)
    budgets = [b for b in args.budgets.split(",") if b]
    if "widths" in stages:
        study.widths()
    if "search" in stages:
        study.search(budgets, args.heldout, args.steps)
    if "supernet" in stages:
        study.supernet()
    if "per_layer" in stages:
        if not args.per_layer_checkpoint.exists():
            ap.error(f"{args.per_layer_checkpoint} does not exist: train it with `slimmable train --recipe "
                     "fmnist_us_mobilenet_v1 --set train.per_layer_widths=true --out "
                     "runs/fmnist_us_mobilenet_v1_pl`, or leave out the per_layer stage")  # fmt: skip
        study.per_layer(args.per_layer_checkpoint)
    if "scratch" in stages:
        study.scratch([int(s) for s in args.seeds.split(",")], args.epochs, args.jobs)
    print(report(study.results, args.out))
    plot(study.results, args.out)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'us_autoslim.md'}, {args.out / 'us_autoslim.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
