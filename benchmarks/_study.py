"""Shared by the studies of slimmable networks against networks of each width trained alone
(``segmentation_study.py``, ``vit_study.py``; ``pretrained_study.py`` uses :func:`run_jobs`): one run through
``train_from_config`` with its log in a file, one JSON per run so that an interrupted study resumes, the per-width
table, and the command line every study's ``main`` shares (options, the plan of jobs left, the estimate, the summary).

A study names its runs ``slimmable`` (every width, Algorithm 1) and ``individual_w{w}`` (a model built with
``widths=(w,)``, trained alone), and writes each run's result to ``<out>/<run>_s<seed>.json`` with at least
``seed``, ``metrics`` (``{width: {metric: value, "macs": ..., "params": ...}}``), ``train_seconds``, ``config``
(the study's) and ``run_config`` (the resolved recipe).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from _bench import describe_machine, machine_info, schedule_seconds

from slimmable._utils import write_json
from slimmable.config import RunConfig
from slimmable.train import TrainResult, train_from_config

__all__ = [
    "Plan",
    "add_study_args",
    "check_resumable",
    "estimate_schedule",
    "finish_study",
    "individual_widths",
    "plan_study",
    "reporter",
    "run_jobs",
    "run_names",
    "run_path",
    "summarize",
    "train_logged",
]


def run_names(widths: Sequence[float]) -> list[str]:
    """``slimmable`` and ``individual_w{w}`` for each width."""
    return ["slimmable", *(f"individual_w{w:g}" for w in widths)]


def individual_widths(run: str, widths: Sequence[float]) -> tuple[float, ...]:
    """The widths a run trains: all of ``widths`` for ``slimmable``, ``(w,)`` for ``individual_w{w}``."""
    if run.startswith("individual_w"):
        return (float(run.removeprefix("individual_w")),)
    if run != "slimmable":
        raise ValueError(f"unknown run {run!r}: not among {', '.join(run_names(widths))}")
    return tuple(widths)


def run_record(
    run: str, seed: int, cfg: Any, rc: RunConfig, result: TrainResult, history: list[dict], rows: list[dict],
    wall: float, cpu: float, threads: int, **fields: Any,
) -> dict[str, Any]:  # fmt: skip
    """A finished run's JSON record: ``run``, ``seed``, ``widths``, the study's own ``fields`` (its metrics), then
    what every study records (steps, per-width training loss, learning rates, times, numerics, configs, machine).
    ``cfg`` is the study's config dataclass, ``rows`` the final per-width rows."""
    return {
        "run": run,
        "seed": seed,
        "widths": [float(r["width"]) for r in rows],
        **fields,
        "epochs": result.epochs_done,
        "steps": result.epochs_done * cfg.steps_per_epoch,
        "train_loss": {
            width: [next(t["loss"] for t in h["train"] if f"{t['width']:g}" == width) for h in history]
            for width in (f"{r['width']:g}" for r in rows)
        },
        "lr": [h["lr"] for h in history],
        "epoch_seconds": [round(h["seconds"], 2) for h in history],
        "train_seconds": round(sum(h["seconds"] for h in history), 2),
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(cpu, 2),
        "numerics": result.numerics.label if result.numerics is not None else None,
        "threads": threads,
        "config": asdict(cfg),
        "run_config": rc.to_dict(),
        "machine": machine_info(),
    }


def run_path(out: Path, run: str, seed: int) -> Path:
    return out / f"{run}_s{seed}.json"


def train_logged(
    rc: RunConfig, log_path: Path, cache_dir: str | None = None
) -> tuple[TrainResult, dict[str, Any], list[dict[str, Any]], float, float]:
    """Train ``rc`` on the CPU in a temporary folder, the library's log going to ``log_path`` only.

    Returns:
        The result, ``final_metrics.json`` and ``history.json`` as read back, and the wall and CPU seconds.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("slimmable")
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the run's log goes to its file, not into the study's output
    try:
        with tempfile.TemporaryDirectory(prefix=f"study_{log_path.stem}_") as tmp:
            cpu0, t0 = time.process_time(), time.perf_counter()
            result = train_from_config(rc, tmp, device="cpu", latency_runs=0, tensorboard=False, cache_dir=cache_dir)
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            final = json.loads((Path(tmp) / "final_metrics.json").read_text())
            history = json.loads((Path(tmp) / "history.json").read_text())
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
    return result, final, history, wall, cpu


def check_resumable(
    out: Path, config: Mapping[str, Any], done: Iterable[tuple[str, int]], run_config: Callable[[str, int], RunConfig]
) -> None:
    """Refuse to resume over runs made with another study config or recipe: their scores would be mixed into this
    study's table. ``config`` is the study's (as its runs record it), ``run_config(run, seed)`` a run's recipe."""
    want = json.loads(json.dumps(dict(config)))
    defaults = RunConfig().to_dict()
    for run, seed in done:
        path = run_path(out, run, seed)
        data = json.loads(path.read_text())
        have = data.get("config") or {}
        if have != want:
            diff = ", ".join(f"{k} {have.get(k)} there, {want[k]} now" for k in want if have.get(k) != want[k])
            raise SystemExit(
                f"{path} was trained with another study config ({diff}); give another --out, or delete {out} to "
                "start over"
            )
        rc = run_config(run, seed).to_dict()
        old = data.get("run_config") or {}
        # a setting added to RunConfig after the run was made is absent from its record: at its default it is the
        # same run (the code then had that behaviour), at any other value a different one
        diff = ", ".join(
            f"{sec}.{k}"
            for sec, vals in rc.items()
            for k, v in vals.items()
            if (old.get(sec) or {}).get(k, defaults.get(sec, {}).get(k)) != v
        )
        if diff:  # the packaged recipe changed since
            raise SystemExit(
                f"{path} was trained with another recipe ({diff} differ); give another --out, or delete {out} to "
                "start over"
            )


def run_jobs(
    fn: Callable[..., Any],
    jobs: Sequence[tuple],
    common: tuple,
    workers: int,
    report: Callable[[Any], None],
) -> None:
    """``fn(*job, *common)`` for every job (a study's: ``(run, seed)``), in order, ``workers`` at a time (spawned
    processes, so that no OpenMP pool is forked), ``report`` called with each result as it comes."""
    if workers == 1:
        for job in jobs:
            report(fn(*job, *common))
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = [pool.submit(fn, *job, *common) for job in jobs]
        for fut in as_completed(futures):
            report(fut.result())


def summarize(out: Path, widths: Sequence[float], seeds: Sequence[int], metrics: Sequence[str]) -> dict[str, Any]:
    """Per width and metric: the mean over seeds (and the per-seed values) of the slimmable and the individual
    run's score, their difference and whether slimmable >= individual; whether that holds at every width; and the
    training seconds of the slimmable run and of a seed's individual runs together.

    A mean is ``None`` until every seed's run of that kind is done (the verdicts then too)."""
    runs = {
        (run, s): json.loads(run_path(out, run, s).read_text())
        for run in run_names(widths)
        for s in seeds
        if run_path(out, run, s).is_file()
    }
    table: dict[str, Any] = {"widths": {}}
    for w in widths:
        key = f"{w:g}"
        entry: dict[str, Any] = {}
        for variant, name in (("slimmable", "slimmable"), ("individual", f"individual_w{key}")):
            src = [runs[(name, s)] for s in seeds if (name, s) in runs]
            first = src[0]["metrics"][key] if src else {}
            complete = len(src) == len(seeds)
            entry[variant] = {
                "seeds": [r["seed"] for r in src],
                **{m: [r["metrics"][key][m] for r in src] for m in metrics},
                **{f"{m}_mean": statistics.fmean(r["metrics"][key][m] for r in src) if complete else None
                   for m in metrics},
                "macs": first.get("macs"),
                "params": first.get("params"),
                "train_seconds": [r["train_seconds"] for r in src],
            }  # fmt: skip
        for m in metrics:
            a, b = entry["slimmable"][f"{m}_mean"], entry["individual"][f"{m}_mean"]
            entry[f"{m}_diff"] = a - b if a is not None and b is not None else None
            entry[f"{m}_slimmable_ge_individual"] = a >= b if a is not None and b is not None else None
        table["widths"][key] = entry
    for m in metrics:
        verdicts = [e[f"{m}_slimmable_ge_individual"] for e in table["widths"].values()]
        table[f"{m}_at_every_width"] = all(verdicts) if None not in verdicts else None
    slim = [r["train_seconds"] for (name, _), r in runs.items() if name == "slimmable"]
    indiv = [r["train_seconds"] for (name, _), r in runs.items() if name != "slimmable"]
    table["train_seconds"] = {"slimmable_mean": statistics.fmean(slim) if slim else None,
                              "individual_sum_per_seed": sum(indiv) / len(seeds) if indiv else None}  # fmt: skip
    return table


# -- a study's command line: what every study's main() shares ------------------------------------------------------


def add_study_args(ap: argparse.ArgumentParser, *, name: str, runs_help: str) -> None:
    """The options every study takes: ``--quick``, ``--seeds``, ``--workers``, ``--threads``, ``--runs``, ``--out``
    (default ``benchmarks/results/<name>[_quick]``), ``--no-estimate`` and ``--estimate-only``."""
    ap.add_argument("--quick", action="store_true", help="tiny study (2 widths, 1 seed, 4 steps): checks the code")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1; --quick: 0)")
    ap.add_argument("--workers", type=int, default=None, help="runs trained at once (default: 2, --quick: 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    ap.add_argument("--runs", help=runs_help)
    ap.add_argument("--out", default=None, help=f"results folder (default benchmarks/results/{name}[_quick])")
    ap.add_argument("--no-estimate", action="store_true", help="skip timing steps for the estimate")
    ap.add_argument("--estimate-only", action="store_true", help="print the estimate and stop (trains nothing)")


@dataclass
class Plan:
    """A study invocation's runs and seeds, where it writes, and the jobs left to train (``todo``)."""

    runs: list[str]
    seeds: list[int]
    workers: int
    threads: int
    out: Path
    jobs: list[tuple[str, int]]
    todo: list[tuple[str, int]]
    machine: dict[str, Any]
    started: float


def plan_study(
    args: argparse.Namespace,
    *,
    name: str,
    results: Path,
    config: Mapping[str, Any],
    all_runs: Sequence[str],
    default_runs: Sequence[str],
    run_config: Callable[[str, int], RunConfig],
) -> Plan:
    """Resolve :func:`add_study_args`' options (``--runs`` must be among ``all_runs``), set the thread count, print
    the machine, find the jobs already done (refused when made with another ``config`` or recipe:
    :func:`check_resumable`) and print the counts."""
    runs = list(default_runs)
    if args.runs:
        runs = args.runs.split(",")
        if unknown := [r for r in runs if r not in all_runs]:
            raise SystemExit(f"--runs {','.join(unknown)}: not among {','.join(all_runs)}")
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1")).split(",")]
    workers = args.workers or (1 if args.quick else 2)
    out = Path(args.out or results / (f"{name}_quick" if args.quick else name))
    torch.set_num_threads(args.threads)
    machine = machine_info()
    print(f"{describe_machine(machine)}; {workers} worker(s) x {args.threads} thread(s); results in {out}")
    started = time.perf_counter()
    jobs = [(r, s) for s in seeds for r in runs]
    todo = [j for j in jobs if not run_path(out, *j).is_file()]
    check_resumable(out, config, [j for j in jobs if j not in todo], run_config)
    print(f"{len(jobs)} runs, {len(jobs) - len(todo)} already done (skipped), {len(todo)} to train")
    return Plan(runs, seeds, workers, args.threads, out, jobs, todo, machine, started)


def estimate_schedule(
    plan: Plan, per_step: Mapping[str, float], seconds: Callable[[str], float], *, steps: int, setting: str
) -> None:
    """Print the measured seconds per step (``setting``: the batch and the like), put the longest runs of
    ``plan.todo`` first (the schedule's wall time is then close to the ideal) and print the estimated wall time;
    ``seconds(run)``: a run's estimated seconds."""
    speeds = ", ".join(f"{k} {v:.3f}" for k, v in per_step.items())
    print(f"seconds per training step ({plan.threads} thread(s), {setting}): {speeds}")
    plan.todo.sort(key=lambda j: -seconds(j[0]))
    secs = [seconds(r) for r, _ in plan.todo]
    est = schedule_seconds(secs, plan.workers)
    print(f"estimated wall time: {est / 60:.1f} min ({len(plan.todo)} runs of {steps} steps, "
          f"{sum(secs) / 60:.1f} core-minutes, {plan.workers} worker(s), if each gets a core)", flush=True)  # fmt: skip


def finish_study(plan: Plan, config: Mapping[str, Any], steps: int, table: dict[str, Any]) -> None:
    """Write ``<out>/summary.json`` (the study's config, runs, seeds, machine and table) and print the wall time."""
    wall = time.perf_counter() - plan.started
    summary = {"config": dict(config), "steps": steps, "seeds": plan.seeds, "runs": plan.runs,
               "workers": plan.workers, "threads": plan.threads, "wall_seconds_this_invocation": round(wall, 1),
               "machine": plan.machine, "table": table}  # fmt: skip
    write_json(plan.out / "summary.json", summary)
    print(f"wall time {wall / 60:.1f} min; wrote {plan.out / 'summary.json'}")


def reporter(metric: str, label: str) -> Callable[[dict], None]:
    """What prints a finished run: its wall and training seconds and ``metric`` (shown as ``label``) per width."""

    def report(res: dict) -> None:
        scores = " ".join(f"{w}:{v[metric]:.2f}" for w, v in res["metrics"].items())
        print(f"{res['run']} seed {res['seed']}: {res['wall_seconds']:.0f} s wall ({res['train_seconds']:.0f} s "
              f"training), {label} {scores}", flush=True)  # fmt: skip

    return report
