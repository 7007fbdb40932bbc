"""The ViT study: one slimmable ViT against ViTs of each width trained alone, with the same steps over the same batches.

The claim (issue 25, after Scala, NeurIPS 2024: one slimmable DeiT-S at widths 0.25/0.5/0.75/1.0 reaches
59.8/72.0/75.6/76.7% ImageNet top-1 where DeiT-S of those widths trained separately reach 45.8/65.1/70.7/75.0%): a
slimmable ViT is at least as accurate as individually trained ViTs at every width. Measured here on Fashion-MNIST
with the native ``slim_vit_tiny`` (small input: 28-px images, heads of 48) as the packaged recipe
``fmnist_slim_vit_tiny`` builds it, from scratch. Runs per seed, each through
:func:`slimmable.train.train_from_config` with that recipe and the overrides of :func:`run_overrides`:

* ``slimmable``: one ViT at widths 0.25/0.5/0.75/1.0 (1-4 of its 4 heads, a quarter to all of its MLP units; the
  residual stream keeps 192 features), Algorithm 1 (every width's forward and backward, then one optimizer step);
* ``individual_w{w}``: a ViT built with ``widths=(w,)`` (the slimmable one's architecture at ``w``: the same heads,
  MLP units, MACs and parameters), trained alone;
* optionally (``--runs``) ``slimmable_distill``: the slimmable ViT with in-place distillation (the narrower widths
  learn the widest width's detached predictions instead of the labels), one of the ways to close a gap.

Every run of a seed has the same recipe, ``train.seed`` and epochs, so it trains the same number of steps over the
same batches in the same order (the loader's shuffle and the augmentation are seeded from ``(train.seed, epoch)``),
with the same optimizer and schedule, from the same initial weights (a model built with ``widths=(w,)`` holds the
same tensors as the slimmable one and draws them in the same order), and is scored on the same 10,000 test images.
There is **no time budget** (``train.time_budget_min: null``, fixed ``train.epochs``), so the runs do not depend on
how busy the machine is, and the numerics are fixed (``train.amp``, the study's, and ``channels_last: false``).
All 60,000 training images train (``data.val_size: 0``) and each run is validated once, after its last epoch
(``train.eval_every`` = the epochs): nothing is selected among epochs, every run is scored after all its steps.

Each run writes ``<out>/<run>_s<seed>.json`` (top-1, top-5, MACs and parameters per width, per-epoch training losses,
wall and CPU time, the resolved recipe, machine facts: CPU capability, threads, torch version) and its log
``<out>/logs/<run>_s<seed>.log``; a run whose JSON exists is skipped, so an interrupted study resumes where it stopped
(an unfinished run restarts). At the start the script times a few steps of each kind of run and prints the estimated
wall time; at the end it prints the table (per width: slimmable and individual top-1, mean over seeds and each seed,
the difference, the spread over seeds, whether slimmable >= individual) and writes ``<out>/summary.json``.

Usage:
    python benchmarks/vit_study.py [--epochs 4] [--seeds 0,1] [--workers 2] [--threads 1] [--amp bf16]
        [--runs slimmable,individual_w0.25,...,slimmable_distill] [--out benchmarks/results/vit_study]
    python benchmarks/vit_study.py --quick --data DIR  # tiny: 2 widths, 1 seed, 1 block, 4 steps (the machinery)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _bench import describe_machine  # noqa: E402
from _study import (  # noqa: E402
    add_study_args,
    estimate_schedule,
    finish_study,
    individual_widths,
    plan_study,
    reporter,
    run_jobs,
    run_names,
    run_path,
    run_record,
    summarize,
    train_logged,
)

import slimmable  # noqa: E402
from slimmable._utils import write_json  # noqa: E402
from slimmable.config import RunConfig, load_recipe  # noqa: E402
from slimmable.train import train_step  # noqa: E402

#: seconds a run spends besides its training steps (process start, data, the final test pass at every width)
RUN_OVERHEAD_S = 15.0
#: a step inside ``train_from_config`` (data loading and augmentation, loss checks, logging) against the bare step
#: :func:`time_steps` times
TRAINER_OVERHEAD = 1.1
DISTILL = "slimmable_distill"
METRICS = ("top1", "top5")


@dataclass(frozen=True)
class StudyConfig:
    """What every run of a study shares (recorded in each run's file; a changed config is a different study)."""

    recipe: str = "fmnist_slim_vit_tiny"
    widths: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    epochs: int = 4
    batch_size: int = 128
    train_images: int = 60000  # all of Fashion-MNIST's training images (no held-out split)
    amp: str = "off"
    data_root: str | None = None  # None: Debian's /usr/share/datasets/fashion-mnist
    model_options: dict[str, Any] | None = field(default=None)  # None: the recipe's model.options

    @property
    def steps_per_epoch(self) -> int:
        return self.train_images // self.batch_size  # the training loader drops a partial batch

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def run_names(self) -> list[str]:
        return [*run_names(self.widths), DISTILL]


#: 2 widths, 1 block, 2 epochs of 2 batches of 16 on the data given with --data (the tests write a tiny fake set)
QUICK = StudyConfig(widths=(0.5, 1.0), epochs=2, batch_size=16, train_images=32, model_options={"depth": 1})


def run_widths(run: str, cfg: StudyConfig) -> tuple[float, ...]:
    return cfg.widths if run == DISTILL else individual_widths(run, cfg.widths)


def run_overrides(run: str, seed: int, cfg: StudyConfig) -> list[str]:
    """The ``section.key=value`` overrides of the recipe for one run: only ``model.widths`` (and, for
    ``slimmable_distill``, ``train.inplace_distill``) differ within a seed."""
    out = [
        f"model.widths={json.dumps(list(run_widths(run, cfg)))}",
        f"data.root={json.dumps(cfg.data_root)}",
        "data.val_size=0",
        f"data.batch_size={cfg.batch_size}",
        f"train.epochs={cfg.epochs}",
        f"train.eval_every={cfg.epochs}",  # one validation, after the last epoch: the last epoch is the best
        "train.time_budget_min=null",
        f"train.amp={cfg.amp}",
        "train.channels_last=false",
        f"train.seed={seed}",
        f"train.inplace_distill={'true' if run == DISTILL else 'false'}",
    ]
    if cfg.model_options is not None:
        out.append(f"model.options={json.dumps(cfg.model_options)}")
    return out


def run_config(run: str, seed: int, cfg: StudyConfig) -> RunConfig:
    return load_recipe(cfg.recipe, overrides=run_overrides(run, seed, cfg))


def train_run(run: str, seed: int, cfg: StudyConfig, out: str, threads: int) -> dict:
    """Train and score one run through ``train_from_config``; write its JSON (atomically) and return it."""
    torch.set_num_threads(threads)
    rc = run_config(run, seed, cfg)
    result, final, history, wall, cpu = train_logged(rc, Path(out) / "logs" / f"{run}_s{seed}.log")
    rows = final["widths"]
    res = run_record(
        run, seed, cfg, rc, result, history, rows, wall, cpu, threads,
        metrics={f"{r['width']:g}": {k: r[k] for k in (*METRICS, "loss", "macs", "params")} for r in rows},
        test_images=rows[0]["images"],
    )  # fmt: skip
    write_json(run_path(Path(out), run, seed), res)
    return res


def time_steps(cfg: StudyConfig, runs: list[str], steps: int = 3) -> dict[str, float]:
    """Seconds per bare Algorithm-1 step of each run (the current thread count, a random batch, after a warm-up
    step); inside ``train_from_config`` a step costs a little more (:data:`TRAINER_OVERHEAD`)."""
    rc = run_config("slimmable", 0, cfg)
    x = torch.randn(cfg.batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (cfg.batch_size,))
    dtype = torch.bfloat16 if cfg.amp == "bf16" else None
    out = {}
    for run in runs:
        widths = sorted(run_widths(run, cfg), reverse=True)
        torch.manual_seed(0)
        model = slimmable.create_model(
            rc.model.name, widths=widths, num_classes=10, in_chans=1, small_input=rc.model.small_input,
            **(rc.model.options or {}),
        ).train()  # fmt: skip
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        train_step(model, opt, x, y, widths, autocast_dtype=dtype)  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step(model, opt, x, y, widths, autocast_dtype=dtype, inplace_distill=run == DISTILL)
        out[run] = (time.perf_counter() - t0) / steps
    return out


def run_seconds(per_step: dict[str, float], run: str, cfg: StudyConfig) -> float:
    """A run's estimated seconds: its steps at the measured speed, and the fixed overhead."""
    return per_step[run] * TRAINER_OVERHEAD * cfg.steps + RUN_OVERHEAD_S


def distill_rows(out: Path, cfg: StudyConfig, seeds: list[int]) -> dict[str, list[float]]:
    """``slimmable_distill``'s top-1 per width, one entry per finished seed."""
    found = [json.loads(run_path(out, DISTILL, s).read_text()) for s in seeds if run_path(out, DISTILL, s).is_file()]
    return {f"{w:g}": [r["metrics"][f"{w:g}"]["top1"] for r in found] for w in cfg.widths}


def _num(v: float | None, fmt: str = "6.2f") -> str:
    return format(v, fmt) if v is not None else f"{'-':>{int(fmt.split('.')[0])}}"


def print_table(table: dict[str, Any], cfg: StudyConfig, seeds: list[int], machine: dict[str, Any]) -> None:
    options = cfg.model_options or "as the recipe"
    print(f"\nFashion-MNIST, {cfg.recipe} (options {options}), {table['test_images']} test images; "
          f"{cfg.epochs} epochs x {cfg.steps_per_epoch} steps of batch {cfg.batch_size} ({cfg.steps} steps) per "
          f"run, amp {cfg.amp}; seeds {seeds}; {describe_machine(machine)}")  # fmt: skip
    head = (f"{'width':>5} {'MACs':>7} {'params':>7} | {'top-1 slim':>10} {'indiv':>6} {'diff':>6} {'>=':>3} | "
            f"{'per seed: slim vs indiv':<32} | {'spread slim/indiv':>17}")  # fmt: skip
    distill = table.get("distill") or {}
    if any(distill.values()):
        head += " | distill"
    print(head)
    print("-" * len(head))
    yes = {True: "yes", False: "no", None: "-"}
    for key, e in table["widths"].items():
        s, i = e["slimmable"], e["individual"]
        macs = f"{s['macs'] / 1e6:.1f}M" if s["macs"] is not None else "-"
        params = f"{s['params'] / 1e6:.3f}M" if s["params"] is not None else "-"
        by_seed = {n: dict(zip(v["seeds"], v["top1"])) for n, v in (("s", s), ("i", i))}
        per = ", ".join(
            f"s{seed} {by_seed['s'][seed]:.2f}/{by_seed['i'][seed]:.2f}"
            for seed in seeds
            if seed in by_seed["s"] and seed in by_seed["i"]
        )
        spread = "/".join(f"{max(v['top1']) - min(v['top1']):.2f}" if v["top1"] else "-" for v in (s, i))
        line = (f"{key:>5} {macs:>7} {params:>7} | {_num(s['top1_mean'], '10.2f')} {_num(i['top1_mean'])} "
                f"{_num(e['top1_diff'], '+6.2f')} {yes[e['top1_slimmable_ge_individual']]:>3} | {per or '-':<32} | "
                f"{spread:>17}")  # fmt: skip
        if any(distill.values()):
            line += " | " + (f"{statistics.fmean(distill[key]):.2f}" if distill.get(key) else "-")
        print(line)
    print(f"slimmable >= individual at every width (top-1, mean over seeds): {table['top1_at_every_width']}")
    t = table["train_seconds"]
    if t["slimmable_mean"] is not None and t["individual_sum_per_seed"] is not None:
        print(f"training time: slimmable run {t['slimmable_mean']:.0f} s (mean), the individual runs of a seed "
              f"{t['individual_sum_per_seed']:.0f} s together (mean over seeds)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(ap, name="vit_study", runs_help=f"comma-separated runs (default slimmable and individual_w<w>; "
                   f"also {DISTILL})")  # fmt: skip
    ap.add_argument("--epochs", type=int, help="epochs per run (default 4)")
    ap.add_argument("--amp", choices=("off", "bf16"), help="fixed numerics of every run (default off)")
    ap.add_argument("--data", default=None, help="Fashion-MNIST folder (default: Debian's)")
    args = ap.parse_args()
    if args.quick and not args.data:
        raise SystemExit("--quick trains on a small Fashion-MNIST-format set: give its folder with --data")
    cfg = QUICK if args.quick else StudyConfig()
    cfg = replace(cfg, **{k: v for k, v in (("epochs", args.epochs), ("amp", args.amp), ("data_root", args.data))
                          if v is not None})  # fmt: skip
    plan = plan_study(args, name="vit_study", results=HERE / "results", config=asdict(cfg),
                      all_runs=cfg.run_names(), default_runs=run_names(cfg.widths),
                      run_config=lambda r, s: run_config(r, s, cfg))  # fmt: skip
    if plan.todo:
        if not args.no_estimate:
            per_step = time_steps(cfg, sorted({r for r, _ in plan.todo}, key=cfg.run_names().index))
            estimate_schedule(plan, per_step, lambda r: run_seconds(per_step, r, cfg), steps=cfg.steps,
                              setting=f"batch {cfg.batch_size}")  # fmt: skip
        if args.estimate_only:
            return
        run_jobs(train_run, plan.todo, (cfg, str(plan.out), plan.threads), plan.workers, reporter("top1", "top-1"))
    table = summarize(plan.out, cfg.widths, plan.seeds, METRICS)
    table["distill"] = distill_rows(plan.out, cfg, plan.seeds)
    done = [run_path(plan.out, *j) for j in plan.jobs if run_path(plan.out, *j).is_file()]
    table["test_images"] = json.loads(done[0].read_text())["test_images"] if done else None
    print_table(table, cfg, plan.seeds, plan.machine)
    finish_study(plan, asdict(cfg), cfg.steps, table)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
