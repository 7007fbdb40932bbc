"""The segmentation study: slimmable segmenters against individually trained segmenters of each width, same budget.

The paper's second claim (S-Nets, Yu et al. ICLR 2019) for semantic segmentation, on Fashion-MNIST scenes
(:mod:`slimmable.data.scenes`: synthetic compositions of real Fashion-MNIST items on grey canvases, each item's
pixels labelled with its class + 1, 0 the background; **not** a real segmentation benchmark). For each seed these
runs train through :func:`slimmable.train.train_from_config` from the packaged recipe ``fmnist_scenes_lraspp``
(LR-ASPP on a slimmable MobileNet v2, AdamW 2e-3, cosine schedule with a 0.2-epoch warm-up, batch 16, flips) with
the overrides of :func:`run_overrides`:

* ``slimmable``: one segmenter at widths 0.25, 0.5, 0.75 and 1.0, Algorithm 1 (each step: every width's forward and
  backward, then one optimizer step);
* ``individual_w{w}``: a segmenter built with ``widths=(w,)``, the same architecture as the slimmable one at ``w``,
  trained alone.

Every run of a seed has the same recipe, ``train.seed``, ``data.*`` and epochs, so it trains the same number of
steps over the same batches in the same order (the loader's shuffle and the flips are seeded from
``(train.seed, epoch)``, and LR-ASPP draws no random numbers) with the same optimizer and schedule, and is scored on
the same test scenes. There is **no time budget** (``train.time_budget_min: null``, a fixed ``train.epochs``): the
runs do not depend on how busy the machine is. Numerics are fixed too (``amp: off``, ``channels_last: false``).
There is no validation split (``data.val_size: 0``) and one validation, after the last epoch
(``train.eval_every`` = the epochs), so the best checkpoint is the last one: every run is scored after all its
steps, none is picked among epochs (the library's warning that selection on the test split is optimistic does not
apply: there is nothing to select). Scores: mIoU and pixel accuracy in % on the test scenes, per width.

Sizing (the defaults, for a 2-core machine with 2 workers x 1 thread: 17-23 minutes for 2 seeds = 10 runs): the
recipe's own data and schedule (2000 training scenes, 200 test scenes, batch 16, 12 epochs = 1500 steps), at 64 px
instead of 128, without its time budget, and without its 200 held-out scenes (all 2000 train).

* **64 px scenes** (``data.image_size: 64``) because the recipe's 128 px costs 3x per step: measured at batch 16 on
  one thread, a slimmable step takes 0.30-0.42 s at 64 px, 0.65 s at 96 px and 1.11 s at 128 px. The architecture is
  the recipe's (no ``small_input``): LR-ASPP reads MobileNet v2's features at stride 8 (8x8) and 32 (2x2). The
  items (22-56 px) are large against the canvas: the foreground covers 37-39% of the pixels (22% at 128 px).
* **2000 training scenes, 12 epochs = 1500 steps** per run, all the recipe's (its 10-minute budget trains about that
  many steps at 128 px). Measured seconds per step at 64 px (batch 16, one thread; this 2-core machine's speed
  varied by up to 40% between measurements, its neighbours take CPU at times): slimmable 0.30-0.42, individual
  0.04-0.05 (w0.25), 0.06-0.07 (0.5), 0.08-0.10 (0.75), 0.10-0.13 (1.0); inside ``train_from_config`` a step costs
  about 8% more. So a seed costs 1500 x (0.30..0.42 + 0.28..0.35) x 1.08 s of one core, and the study 34-45
  core-minutes: 17-23 minutes on 2 cores, the longest runs first. 30 epochs of 960 scenes (1800 steps, 20-27
  minutes) were the first choice; they left too little margin under 30 minutes when the machine is slow.
* **200 test scenes**, the recipe's, from Fashion-MNIST's test images.

Each run writes ``<out>/<run>_s<seed>.json`` (mIoU, pixel accuracy, MACs and parameters per width, per-epoch
training losses, wall and CPU time, the resolved recipe, machine facts) and its training log
``<out>/logs/<run>_s<seed>.log``; a run whose JSON exists is skipped, so an interrupted study resumes where it
stopped (an unfinished run restarts). At the start the script times a few steps of each kind of run and prints the
estimated wall time; at the end it prints the table (per width, the mean over seeds of slimmable vs individual
mIoU and pixel accuracy, their difference, and whether slimmable >= individual at every width) and writes
``<out>/summary.json``.

Usage:
    python benchmarks/segmentation_study.py [--epochs 12] [--seeds 0,1] [--workers 2]
        [--out benchmarks/results/segmentation_study]
    python benchmarks/segmentation_study.py --quick  # tiny: 2 widths, 1 seed, 4 steps (checks the machinery)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

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
from slimmable.data.segmentation import create_segmentation_datasets  # noqa: E402
from slimmable.train.segmentation import segmentation_loss  # noqa: E402

#: seconds a run spends besides its training steps (process start, data, the final validation and test passes,
#: checkpoints, MACs), measured: 5 s at 64 px, and about 3 s to start a worker process
RUN_OVERHEAD_S = 8.0
#: a step inside ``train_from_config`` (data loading, loss checks, logging) against the bare step :func:`time_steps`
#: times, measured with two runs at once: 0.46 s against 0.42-0.44 s
TRAINER_OVERHEAD = 1.08


@dataclass(frozen=True)
class StudyConfig:
    """What every run of a study shares (recorded in each run's file; a changed config is a different study)."""

    recipe: str = "fmnist_scenes_lraspp"
    widths: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    image_size: int = 64
    scenes_train: int = 2000
    scenes_test: int = 200
    batch_size: int = 16
    epochs: int = 12

    @property
    def steps_per_epoch(self) -> int:
        return self.scenes_train // self.batch_size  # no held-out scenes; the loader drops a partial batch

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def run_names(self) -> list[str]:
        """``slimmable`` and ``individual_w{w}`` for each width."""
        return run_names(self.widths)


QUICK = StudyConfig(widths=(0.5, 1.0), image_size=64, scenes_train=16, scenes_test=8, batch_size=8, epochs=2)


def run_widths(run: str, cfg: StudyConfig) -> tuple[float, ...]:
    return individual_widths(run, cfg.widths)


def run_overrides(run: str, seed: int, cfg: StudyConfig) -> list[str]:
    """The ``section.key=value`` overrides of the recipe for one run: only ``model.widths`` differs within a seed."""
    return [
        f"model.widths={json.dumps(list(run_widths(run, cfg)))}",
        "data.root=null",  # Debian's real Fashion-MNIST, else the cache
        f"data.image_size={cfg.image_size}",
        f"data.scenes_train={cfg.scenes_train}",
        f"data.scenes_test={cfg.scenes_test}",
        "data.val_size=0",
        "data.split_seed=0",  # the same scenes for every seed
        f"data.batch_size={cfg.batch_size}",
        f"train.epochs={cfg.epochs}",
        f"train.eval_every={cfg.epochs}",  # one validation, after the last epoch: the last epoch is the best
        "train.time_budget_min=null",
        "train.amp=off",
        "train.channels_last=false",
        f"train.seed={seed}",
    ]


def run_config(run: str, seed: int, cfg: StudyConfig) -> RunConfig:
    return load_recipe(cfg.recipe, overrides=run_overrides(run, seed, cfg))


def prepare_scenes(cache_dir: Path, cfg: StudyConfig) -> Any:
    """Generate the scenes once, before the workers start (``train_from_config`` then finds them in the cache)."""
    rc = run_config("slimmable", 0, cfg)
    dc = rc.data
    return create_segmentation_datasets(
        dc.dataset, dc.root, image_size=dc.image_size, hflip=dc.hflip, val_size=dc.val_size,
        split_seed=dc.split_seed, scenes_train=dc.scenes_train, scenes_test=dc.scenes_test, cache_dir=cache_dir,
    )  # fmt: skip


def train_run(run: str, seed: int, cfg: StudyConfig, cache_dir: str, out: str, threads: int) -> dict:
    """Train and score one run through ``train_from_config``; write its JSON (atomically) and return it."""
    torch.set_num_threads(threads)
    rc = run_config(run, seed, cfg)
    result, final, history, wall, cpu = train_logged(rc, Path(out) / "logs" / f"{run}_s{seed}.log", cache_dir)
    rows = final["widths"]
    res = run_record(
        run, seed, cfg, rc, result, history, rows, wall, cpu, threads,
        metrics={f"{r['width']:g}": {k: r[k] for k in ("miou", "pixel_acc", "macs", "params")} for r in rows},
        test_scenes=rows[0]["images"],
        best_epoch=result.best_epoch if result.best_epoch is not None else final.get("epoch"),
    )  # fmt: skip
    write_json(run_path(Path(out), run, seed), res)
    return res


def time_steps(cfg: StudyConfig, splits: Any, runs: list[str], steps: int = 3) -> dict[str, float]:
    """Seconds per training step of each run (one thread, a real batch, after one warm-up step).

    The step is the bare Algorithm 1 step (every width's pixel cross-entropy backward, one AdamW step); inside
    ``train_from_config`` a step costs a little more (:data:`TRAINER_OVERHEAD`).
    """
    xs, ys = zip(*(splits.train[i % len(splits.train)] for i in range(cfg.batch_size)))
    images, masks = torch.stack(xs), torch.stack(ys)
    out = {}
    for run in runs:
        widths = run_widths(run, cfg)
        torch.manual_seed(0)
        model = slimmable.create_model(
            "slim_lraspp_mobilenet_v2", widths=widths, num_classes=splits.num_classes, in_chans=splits.in_chans
        ).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        _bare_step(model, opt, widths, images, masks)  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            _bare_step(model, opt, widths, images, masks)
        out[run] = (time.perf_counter() - t0) / steps
    return out


def _bare_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, widths: tuple[float, ...], images: torch.Tensor,
    masks: torch.Tensor,
) -> None:  # fmt: skip
    opt.zero_grad(set_to_none=True)
    for w in widths:
        slimmable.set_width(model, w)
        segmentation_loss(model(images), masks).backward()
    opt.step()


def run_seconds(per_step: dict[str, float], run: str, cfg: StudyConfig) -> float:
    """A run's estimated seconds on one core: its steps at the measured speed, and the fixed overhead."""
    return per_step[run] * TRAINER_OVERHEAD * cfg.steps + RUN_OVERHEAD_S


def _num(v: float | None, fmt: str = "6.2f") -> str:
    return format(v, fmt) if v is not None else f"{'-':>{int(fmt.split('.')[0])}}"


def print_table(table: dict[str, Any], cfg: StudyConfig, seeds: list[int]) -> None:
    print(f"\nFashion-MNIST scenes (synthetic, {cfg.image_size} px), {cfg.scenes_test} test scenes; mean over seeds "
          f"{seeds}; {cfg.epochs} epochs x {cfg.steps_per_epoch} steps of batch {cfg.batch_size} "
          f"({cfg.steps} steps) per run")  # fmt: skip
    head = (f"{'width':>5} {'MACs':>8} {'params':>8} | {'mIoU slim':>9} {'indiv':>6} {'diff':>6} {'>=':>3} | "
            f"{'pixacc slim':>11} {'indiv':>6} {'diff':>6} {'>=':>3}")  # fmt: skip
    print(head)
    print("-" * len(head))
    yes = {True: "yes", False: "no", None: "-"}
    for key, e in table["widths"].items():
        s, i = e["slimmable"], e["individual"]
        macs = f"{s['macs'] / 1e6:.1f}M" if s["macs"] is not None else "-"
        params = f"{s['params'] / 1e6:.3f}M" if s["params"] is not None else "-"
        print(f"{key:>5} {macs:>8} {params:>8} | {_num(s['miou_mean'], '9.2f')} {_num(i['miou_mean'])} "
              f"{_num(e['miou_diff'], '+6.2f')} {yes[e['miou_slimmable_ge_individual']]:>3} | "
              f"{_num(s['pixel_acc_mean'], '11.2f')} {_num(i['pixel_acc_mean'])} {_num(e['pixel_acc_diff'], '+6.2f')} "
              f"{yes[e['pixel_acc_slimmable_ge_individual']]:>3}")  # fmt: skip
    print("per seed, slimmable vs individual (mIoU, pixel acc):")
    for key, e in table["widths"].items():
        s, i = e["slimmable"], e["individual"]
        by_seed = {n: dict(zip(v["seeds"], zip(v["miou"], v["pixel_acc"]))) for n, v in (("s", s), ("i", i))}
        per = "; ".join(
            f"s{seed}: {by_seed['s'][seed][0]:.2f} vs {by_seed['i'][seed][0]:.2f}, "
            f"{by_seed['s'][seed][1]:.2f} vs {by_seed['i'][seed][1]:.2f}"
            for seed in seeds
            if seed in by_seed["s"] and seed in by_seed["i"]
        )
        print(f"  {key:>5}: {per or '-'}")
    print(f"slimmable >= individual at every width: mIoU {table['miou_at_every_width']}, "
          f"pixel accuracy {table['pixel_acc_at_every_width']}")  # fmt: skip
    t = table["train_seconds"]
    if t["slimmable_mean"] is not None and t["individual_sum_per_seed"] is not None:
        print(f"training time on one core: slimmable run {t['slimmable_mean']:.0f} s (mean), the individual runs "
              f"of a seed {t['individual_sum_per_seed']:.0f} s together (mean over seeds)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(ap, name="segmentation_study", runs_help="comma-separated subset of the runs (slimmable, "
                   "individual_w<w>)")  # fmt: skip
    ap.add_argument("--epochs", type=int, help="epochs per run (default 12: 1500 steps)")
    ap.add_argument("--data", default=None, help="scenes cache folder (default <out>/data)")
    args = ap.parse_args()
    cfg = QUICK if args.quick else StudyConfig()
    if args.epochs:
        cfg = StudyConfig(**{**asdict(cfg), "epochs": args.epochs})
    plan = plan_study(args, name="segmentation_study", results=HERE / "results", config=asdict(cfg),
                      all_runs=cfg.run_names(), default_runs=cfg.run_names(),
                      run_config=lambda r, s: run_config(r, s, cfg))  # fmt: skip
    cache_dir = Path(args.data) if args.data else plan.out / "data"
    if plan.todo:
        splits = prepare_scenes(cache_dir, cfg)
        if not args.no_estimate:
            per_step = time_steps(cfg, splits, sorted({r for r, _ in plan.todo}, key=cfg.run_names().index))
            estimate_schedule(plan, per_step, lambda r: run_seconds(per_step, r, cfg), steps=cfg.steps,
                              setting=f"batch {cfg.batch_size}, {cfg.image_size} px")  # fmt: skip
        if args.estimate_only:
            return
        run_jobs(train_run, plan.todo, (cfg, str(cache_dir), str(plan.out), plan.threads), plan.workers,
                 reporter("miou", "mIoU"))  # fmt: skip
    table = summarize(plan.out, cfg.widths, plan.seeds, ("miou", "pixel_acc"))
    print_table(table, cfg, plan.seeds)
    finish_study(plan, asdict(cfg), cfg.steps, table)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
