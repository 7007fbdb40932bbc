"""The detection study (issue 14): slimmable detectors against individually trained detectors of each width.

On Fashion-MNIST scenes (:mod:`slimmable.data.scenes`: synthetic compositions of real Fashion-MNIST items on
128x128 grey canvases, **not COCO**), for each task

* ``maskrcnn``: Mask R-CNN R18-FPN, box AP and mask AP;
* ``keypointrcnn``: Keypoint R-CNN R18-FPN, box AP and keypoint AP (5 keypoints per item);

and each seed, these runs train with the same budget (the same number of steps over the same batches in the same
order, the same optimiser and schedule) and are scored with ``COCOeval`` on the same test scenes:

* ``slimmable``: one detector, all widths, Algorithm 1 (each step: every width's summed losses backward, then one
  clipped AdamW step; :func:`slimmable.train.detection.detection_train_step`);
* ``slim_heads``: the same with the FPN and heads slimmed too (``slim_heads=True``, the unpublished variant);
* ``individual_w{w}``: a detector built with ``widths=(w,)``, the same architecture as the slimmable one at ``w``,
  trained alone on the same batches.

Each run writes ``<out>/<task>/<run>_s<seed>.json`` (AP per width, losses, wall and CPU time, machine); a run whose
file exists is skipped, so an interrupted study resumes where it stopped. ``--workers N`` trains N runs at once in
separate processes (one thread each). At the start the script times a few steps of each kind of run and prints the
estimated wall time; at the end it prints the table: mean over seeds per width, slimmable vs individual, and
whether slimmable >= individual at every width.

Usage:
    python benchmarks/detection_study.py [--steps 320] [--seeds 0,1] [--workers 2]
        [--out benchmarks/results/detection_study]
    python benchmarks/detection_study.py --quick  # tiny: 2 widths, 1 seed, a few steps (checks the machinery)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _bench import describe_machine, machine_info  # noqa: E402

import slimmable  # noqa: E402
from slimmable._utils import write_json  # noqa: E402
from slimmable.data.coco import CocoDetectionDataset, collate_detection  # noqa: E402
from slimmable.data.scenes import make_scenes  # noqa: E402
from slimmable.train.detection import detection_train_step, evaluate_detector  # noqa: E402

TASKS = {"maskrcnn": ("bbox", "segm"), "keypointrcnn": ("bbox", "keypoints")}


@dataclass(frozen=True)
class StudyConfig:
    """What every run of a study shares (recorded in each run's file; a changed config is a different study)."""

    widths: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    backbone: str = "resnet18"
    steps: int = 320
    batch_size: int = 4
    train_images: int = 640
    test_images: int = 100
    lr: float = 1e-3
    warmup: int = 30
    max_grad_norm: float = 35.0
    hflip: float = 0.5
    tasks: tuple[str, ...] = ("maskrcnn", "keypointrcnn")
    variants: tuple[str, ...] = field(default=())

    def run_names(self) -> list[str]:
        """``slimmable``, ``slim_heads`` and ``individual_w{w}`` for each width (or the configured variants)."""
        return list(self.variants) or ["slimmable", "slim_heads", *(f"individual_w{w:g}" for w in self.widths)]


QUICK = StudyConfig(
    widths=(0.5, 1.0), steps=6, batch_size=2, train_images=2, test_images=4, warmup=1, hflip=0.0, lr=2e-3
)


def build(task: str, run: str, cfg: StudyConfig) -> torch.nn.Module:
    """The detector of one run (small variant: 128 px scenes, RPN and RoI sampling sized to them)."""
    name = f"slim_{task}_{cfg.backbone}_fpn"
    if run.startswith("individual_w"):
        return slimmable.create_model(name, widths=(float(run.removeprefix("individual_w")),))
    return slimmable.create_model(name, widths=cfg.widths, slim_heads=run == "slim_heads")


def datasets(data_dir: Path, cfg: StudyConfig) -> tuple[CocoDetectionDataset, CocoDetectionDataset]:
    """The train and test scenes (written once, then reused: make_scenes is deterministic)."""
    sets = []
    for split, n, flip in (("train", cfg.train_images, cfg.hflip), ("test", cfg.test_images, 0.0)):
        folder = data_dir / f"{split}_{n}"
        ann = folder / "annotations.json"
        if not ann.is_file():
            ann = make_scenes(folder, split, n, seed=0)
        sets.append(CocoDetectionDataset(folder, ann, hflip=flip))
    return sets[0], sets[1]


def batches(train: CocoDetectionDataset, cfg: StudyConfig, seed: int) -> list[list[int]]:
    """The study's batches for a seed: the same for every run of that seed (epochs of a seeded permutation)."""
    g = torch.Generator().manual_seed(1000 + seed)
    order: list[int] = []
    need = cfg.steps * cfg.batch_size
    while len(order) < need:
        order += torch.randperm(len(train), generator=g).tolist()
    return [order[i * cfg.batch_size : (i + 1) * cfg.batch_size] for i in range(cfg.steps)]


def train_run(task: str, run: str, seed: int, cfg: StudyConfig, data_dir: str, out: str, threads: int) -> dict:
    """Train and evaluate one run; write its JSON (atomically) and return it."""
    torch.set_num_threads(threads)
    train, test = datasets(Path(data_dir), cfg)
    torch.manual_seed(seed)
    model = build(task, run, cfg)
    widths = tuple(model.widths)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup))
    model.train()
    flips = torch.Generator().manual_seed(2000 + seed)  # the same flips for every run of the seed
    losses: list[dict[str, float]] = []
    cpu0, t0 = time.process_time(), time.perf_counter()
    for idx in batches(train, cfg, seed):
        state = torch.random.get_rng_state()
        torch.random.set_rng_state(flips.get_state())
        images, targets = collate_detection([train[i] for i in idx])  # hflip draws from the global RNG
        flips.set_state(torch.random.get_rng_state())
        torch.random.set_rng_state(state)
        step = detection_train_step(model, images, targets, opt, widths, max_grad_norm=cfg.max_grad_norm)
        sched.step()
        losses.append({f"{w:g}": round(v["loss"], 4) for w, v in step.items()})
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    t0 = time.perf_counter()
    ap = evaluate_detector(model, test, widths)
    result = {
        "task": task,
        "run": run,
        "seed": seed,
        "widths": list(widths),
        "ap": {f"{w:g}": v for w, v in ap.items()},
        "losses": losses,
        "train_seconds": round(train_s, 2),
        "train_cpu_seconds": round(train_cpu, 2),
        "eval_seconds": round(time.perf_counter() - t0, 2),
        "threads": threads,
        "config": asdict(cfg),
        "machine": machine_info(),
    }
    write_json(run_path(Path(out), task, run, seed), result)
    return result


def run_path(out: Path, task: str, run: str, seed: int) -> Path:
    return out / task / f"{run}_s{seed}.json"


def check_resumable(out: Path, cfg: StudyConfig, done: list[tuple[str, str, int]]) -> None:
    """Refuse to resume over runs made with another config: their APs would be mixed into this study's table."""
    want = json.loads(json.dumps(asdict(cfg)))
    for job in done:
        path = run_path(out, *job)
        have = json.loads(path.read_text()).get("config")
        if have != want:
            have = have or {}
            diff = ", ".join(f"{k} {have.get(k)} there, {want[k]} now" for k in want if have.get(k) != want[k])
            raise SystemExit(
                f"{path} was trained with another study config ({diff}); give another --out, or delete {out} to "
                "start over"
            )


def time_steps(cfg: StudyConfig, data_dir: Path, steps: int = 1) -> dict[str, float]:
    """Seconds per training step of each task's slimmable run (one thread, after one warm-up step).

    The estimate takes a ``slim_heads`` step (narrower heads) and one step of each individual run together as costing
    about what a slimmable step costs (each width's forward and backward once); that over-estimates a little.
    """
    train, _ = datasets(data_dir, cfg)
    images, targets = collate_detection([train[i % len(train)] for i in range(cfg.batch_size)])
    out = {}
    for task in cfg.tasks:
        torch.manual_seed(0)
        model = build(task, "slimmable", cfg).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        detection_train_step(model, images, targets, opt, max_grad_norm=cfg.max_grad_norm)
        t0 = time.perf_counter()
        for _ in range(steps):
            detection_train_step(model, images, targets, opt, max_grad_norm=cfg.max_grad_norm)
        out[task] = (time.perf_counter() - t0) / steps
    return out


def estimate_seconds(per_step: dict[str, float], todo: list[tuple[str, str, int]], cfg: StudyConfig) -> float:
    """Training and evaluation seconds of the runs in ``todo`` on one core (see :func:`time_steps`)."""
    n = len(cfg.widths)
    train = sum(per_step[t] * (1 / n if r.startswith("individual") else 1.0) for t, r, _ in todo) * cfg.steps
    return train + len(todo) * n * cfg.test_images * 0.05  # evaluation: about 50 ms per image and width


def summarize(out: Path, cfg: StudyConfig, seeds: list[int]) -> dict[str, Any]:
    """Mean AP over seeds per task, metric, run and width, and slimmable vs individual at each width."""
    table: dict[str, Any] = {}
    for task, types in TASKS.items():
        if task not in cfg.tasks:
            continue
        runs: dict[str, list[dict]] = {}
        for run in cfg.run_names():
            files = [run_path(out, task, run, s) for s in seeds]
            runs[run] = [json.loads(f.read_text()) for f in files if f.is_file()]
        for iou in types:
            rows: dict[str, dict[str, float | None]] = {}
            for variant in ("slimmable", "slim_heads", "individual"):
                row: dict[str, float | None] = {}
                for w in cfg.widths:
                    key = f"{w:g}"
                    src = runs.get(f"individual_w{key}", []) if variant == "individual" else runs.get(variant, [])
                    vals = [r["ap"][key][iou]["AP"] for r in src if key in r["ap"]]
                    row[key] = statistics.fmean(vals) if len(vals) == len(seeds) else None
                rows[variant] = row
            done = [
                k for k in rows["slimmable"] if rows["slimmable"][k] is not None and rows["individual"][k] is not None
            ]
            wins = {k: rows["slimmable"][k] >= rows["individual"][k] for k in done}  # type: ignore[operator]
            table[f"{task}/{iou}"] = {
                "ap": rows,
                "slimmable_ge_individual": wins,
                "at_every_width": all(wins.values()) if len(wins) == len(cfg.widths) else None,
            }
    return table


def print_table(table: dict[str, Any], cfg: StudyConfig, seeds: list[int]) -> None:
    ws = [f"{w:g}" for w in cfg.widths]
    print(f"\nCOCO AP on Fashion-MNIST test scenes (not COCO), mean over seeds {seeds}; {cfg.steps} steps of batch "
          f"{cfg.batch_size}")  # fmt: skip
    head = f"{'task/metric':<22} {'run':<11} " + " ".join(f"{w:>7}" for w in ws)
    print(head)
    print("-" * len(head))
    for key, entry in table.items():
        for variant, row in entry["ap"].items():
            vals = " ".join(f"{row[w]:7.3f}" if row[w] is not None else f"{'-':>7}" for w in ws)
            print(f"{key:<22} {variant:<11} {vals}")
        verdict = entry["at_every_width"]
        wins = " ".join(f"{w}:{'yes' if v else 'no'}" for w, v in entry["slimmable_ge_individual"].items())
        print(f"{'':<22} slimmable >= individual: {wins or '-'}; at every width: {verdict}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny study (2 widths, 1 seed, 6 steps): checks the code")
    ap.add_argument("--steps", type=int, help="training steps per run (default 320: 2 epochs of the 640 scenes)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1; --quick: 0)")
    ap.add_argument("--workers", type=int, default=None, help="runs trained at once (default: 2, --quick: 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    ap.add_argument("--tasks", help="comma-separated subset of maskrcnn,keypointrcnn")
    ap.add_argument("--runs", help="comma-separated subset of the runs (slimmable, slim_heads, individual_w<w>)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/detection_study[_quick])")
    ap.add_argument("--data", default=None, help="scenes folder (default <out>/data)")
    ap.add_argument("--no-estimate", action="store_true", help="skip timing steps for the estimate")
    args = ap.parse_args()
    cfg = QUICK if args.quick else StudyConfig()
    if args.steps:
        cfg = StudyConfig(**{**asdict(cfg), "steps": args.steps})
    if args.tasks:
        cfg = StudyConfig(**{**asdict(cfg), "tasks": tuple(args.tasks.split(","))})
    if args.runs:
        runs, known = tuple(args.runs.split(",")), cfg.run_names()
        if unknown := [r for r in runs if r not in known]:
            raise SystemExit(f"--runs {','.join(unknown)}: not among {','.join(known)}")
        cfg = StudyConfig(**{**asdict(cfg), "variants": runs})
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1")).split(",")]
    workers = args.workers or (1 if args.quick else 2)
    out = Path(args.out or HERE / "results" / ("detection_study_quick" if args.quick else "detection_study"))
    data_dir = Path(args.data) if args.data else out / "data"
    torch.set_num_threads(args.threads)
    machine = machine_info()
    print(f"{describe_machine(machine)}; {workers} worker(s) x {args.threads} thread(s); results in {out}")
    t_start = time.perf_counter()
    datasets(data_dir, cfg)
    jobs = [(t, r, s) for s in seeds for t in cfg.tasks for r in cfg.run_names()]
    todo = [j for j in jobs if not run_path(out, *j).is_file()]
    check_resumable(out, cfg, [j for j in jobs if j not in todo])
    print(f"{len(jobs)} runs, {len(jobs) - len(todo)} already done (skipped), {len(todo)} to train")
    if todo and not args.no_estimate:
        per_step = time_steps(cfg, data_dir)
        est = estimate_seconds(per_step, todo, cfg) / workers
        print("seconds per slimmable step (1 thread): " + ", ".join(f"{k} {v:.2f}" for k, v in per_step.items()))
        print(f"estimated wall time: {est / 60:.1f} min ({workers} worker(s), if each gets a core)", flush=True)
    if todo:
        common = (cfg, str(data_dir), str(out), args.threads)
        if workers == 1:
            for t, r, s in todo:
                res = train_run(t, r, s, *common)
                print(f"{t} {r} seed {s}: {res['train_seconds']:.1f} s, AP {_short(res)}", flush=True)
        else:
            ctx = multiprocessing.get_context("spawn")  # no forked OpenMP pools
            with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                futures = {pool.submit(train_run, t, r, s, *common): (t, r, s) for t, r, s in todo}
                for fut, (t, r, s) in futures.items():
                    res = fut.result()
                    print(f"{t} {r} seed {s}: {res['train_seconds']:.1f} s, AP {_short(res)}", flush=True)
    table = summarize(out, cfg, seeds)
    print_table(table, cfg, seeds)
    wall = time.perf_counter() - t_start
    summary = {"config": asdict(cfg), "seeds": seeds, "workers": workers, "threads": args.threads,
               "wall_seconds_this_invocation": round(wall, 1), "machine": machine, "table": table}  # fmt: skip
    write_json(out / "summary.json", summary)
    print(f"wall time {wall / 60:.1f} min; wrote {out / 'summary.json'}")


def _short(res: dict) -> str:
    return " ".join(f"{w}:{v['bbox']['AP']:.3f}" for w, v in res["ap"].items())


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
