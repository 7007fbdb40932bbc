"""A whole training run from a :class:`~slimmable.config.RunConfig`: data, model, Algorithm 1, checkpoints, report.

Reproducibility: the model is initialised from ``train.seed`` on every process, and every epoch reseeds the random
generators from ``(seed, epoch, rank)``, so an epoch's data order and augmentation do not depend on what ran
before it. A run resumed from an end-of-epoch checkpoint therefore finishes exactly like an uninterrupted one
(on CPU, or with ``train.deterministic``). A run stopped by SIGINT/SIGTERM saves a mid-epoch checkpoint; resuming it
skips the batches already done and restores the random states (exact with ``--workers 0``).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import builds_same_model, load_checkpoint, model_build_kwargs, model_checkpoint, save_checkpoint
from ..config import RunConfig, save_config
from ..data import DatasetSplits, TensorImageDataset, create_loader, imagenet_eval_transform
from ..hardware import Numerics, choose_numerics, describe_machine, machine_info
from ..models import create_model
from ..tasks import Task, create_task, mean_metric
from .calibrate import add_stat_widths, calibrate_bn
from .clock import ThreadGovernor
from .distributed import (
    DistInfo,
    average_bn_statistics,
    convert_sync_batchnorm,
    init_distributed,
    shutdown_distributed,
    wrap_ddp,
)
from .engine import EpochStats, Trainer, width_label
from .nonfinite import NonFiniteLossError, with_checkpoint_note
from .objectives import Objective
from .optim import create_optimizer, create_scheduler
from .plan import (
    PROBE_MAX_BATCH,
    EpochPlan,
    decide_numerics,
    measure_step_seconds,
    plan_epochs,
    probe_step_factory,
    replan,
)
from .report import plot_report, write_json, write_report
from .rng import get_rng_state, set_rng_state
from .samplers import WidthSampler, create_width_sampler
from .teacher import build_teacher, describe_teacher

__all__ = ["TrainResult", "train_from_config"]

_logger = logging.getLogger(__name__)

#: steps timed (or one epoch's, if fewer) before a time budget is re-planned on the recent speed
MIN_STEPS_TO_REPLAN = 10


def _clock() -> float:
    """The run's timer: progress lines, the time budget (tests replace it with a fake clock)."""
    return time.perf_counter()


@dataclass
class TrainResult:
    """What a run produced.

    Attributes:
        out_dir: the output folder.
        report: per-width rows of the final evaluation (test split, best checkpoint) with costs; empty when
            interrupted.
        best_top1_mean: best mean validation top-1 over widths (classification), and its ``best_epoch``.
        metric, best_score: the validation metric (``top1``, or ``ap``: detectors' box AP %) and its best mean
            over widths.
        last_checkpoint, best_checkpoint: paths.
        interrupted: stopped by a signal before the last epoch (resume from ``last_checkpoint``).
        epochs_done: completed epochs.
        selection_split: the split the best checkpoint was selected on (``val`` or ``test``).
        numerics: the precision and memory format the run used, and why.
        plan: the epoch plan of a run with ``train.time_budget_min``.
        epochs: the epochs the run trains (``train.epochs``, or the plan's).
    """

    out_dir: Path
    report: list[dict[str, Any]] = field(default_factory=list)
    best_top1_mean: float | None = None
    best_epoch: int | None = None
    last_checkpoint: Path | None = None
    best_checkpoint: Path | None = None
    interrupted: bool = False
    epochs_done: int = 0
    selection_split: str = "val"
    numerics: Numerics | None = None
    plan: EpochPlan | None = None
    epochs: int = 0
    metric: str = "top1"
    best_score: float | None = None


class _StopSignal:
    """SIGINT/SIGTERM set a flag polled between steps; a second SIGINT aborts at once (KeyboardInterrupt)."""

    def __init__(self, info: DistInfo, sync_every: int = 10) -> None:
        self.info, self.sync_every = info, sync_every
        self.requested = False
        self._polls = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def poll(self, force: bool = False) -> bool:
        """The stop flag, agreed by all processes (synchronised every ``sync_every`` polls, or when ``force``)."""
        if not self.info.distributed:
            return self.requested
        self._polls += 1
        if not force and self._polls % self.sync_every:
            return False
        flag = torch.tensor([1.0 if self.requested else 0.0], device=self.info.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.requested = bool(flag.item())
        return self.requested


def _layer_groups(model: Any) -> list[list[str]]:
    try:
        return model.channel_groups()
    except (AttributeError, NotImplementedError) as err:
        raise ValueError(
            f"train.per_layer_widths: {type(model).__name__} does not list its channel groups (channel_groups()), "
            "so per-layer widths cannot keep residual channels tied; use it with the MobileNet families"
        ) from err


def _without_augmentation(data: DatasetSplits) -> Any:
    """The training split with the evaluation transform (for BN calibration)."""
    ds = data.train
    if isinstance(ds, TensorImageDataset):
        return ds.view(augment="none")
    eval_tf = imagenet_eval_transform(data.image_size, data.eval_resize)
    if isinstance(ds, torch.utils.data.Subset) and hasattr(ds.dataset, "transform"):
        base = copy.copy(ds.dataset)
        base.transform = eval_tf
        return torch.utils.data.Subset(base, ds.indices)
    if hasattr(ds, "transform"):
        out = copy.copy(ds)
        out.transform = eval_tf
        return out
    _logger.warning("BN calibration uses the training transform of %s (no evaluation transform known)", data.root)
    return ds


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    _seed_all((seed * 1_000_003 + (epoch + 1) * 10_007 + rank) % (2**63))


def _set_determinism(deterministic: bool, device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def _gather_rng(info: DistInfo) -> list[dict[str, Any]]:
    state = get_rng_state()
    if not info.distributed:
        return [state]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, state)
    return out


def _check_resume(ckpt: Mapping[str, Any], cfg: RunConfig, model: Any, path: str) -> None:
    if not builds_same_model(ckpt, model):
        name, kwargs = model.model_name, model_build_kwargs(model)
        raise ValueError(
            f"--resume {path}: the checkpoint is {ckpt['model_name']}({dict(ckpt['model_kwargs'])}) but the recipe "
            f"builds {name}({dict(kwargs)}); resume with the recipe the run started with (its config.yaml)"
        )
    old = ckpt.get("config") or {}
    new = cfg.to_dict()
    changed = [
        f"{sec}.{k}: {old[sec].get(k)!r} -> {v!r}"
        for sec, vals in new.items()
        for k, v in vals.items()
        if isinstance(old.get(sec), Mapping) and old[sec].get(k) != v
    ]
    if changed:
        _logger.warning("resuming with changed settings: %s", "; ".join(changed))


def train_from_config(
    cfg: RunConfig,
    out_dir: str | os.PathLike[str],
    *,
    device: str | None = None,
    num_workers: int = 0,
    resume: str | os.PathLike[str] | None = None,
    progress: bool = False,
    tensorboard: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    latency_runs: int = 10,
) -> TrainResult:
    """Train a slimmable model as ``cfg`` describes; run it alike as one process or under ``torchrun``.

    Writes to ``out_dir`` (rank 0): ``config.yaml`` (resolved recipe), ``last.pt`` (every epoch and on
    SIGINT/SIGTERM), ``best.pt`` (best mean validation top-1 over widths), ``history.json``, ``final_metrics.json``
    and ``.csv`` (test split, best checkpoint, with MACs/parameters/latency), and TensorBoard scalars in ``tb/``.

    Args:
        cfg: the run configuration.
        out_dir: output folder.
        device: ``cpu``, ``cuda``, ``cuda:N``; default CUDA when available.
        num_workers: data-loading worker processes.
        resume: continue from this checkpoint (its model must match ``cfg.model``).
        progress: progress bars instead of periodic log lines.
        tensorboard: write TensorBoard scalars.
        cache_dir: where downloaded data go.
        latency_runs: timed forward passes per width in the final report (0: no latency).

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError: inconsistent settings or data (the message names the setting and the fix).
        FileNotFoundError: missing data or checkpoint.
    """
    info = init_distributed(device)
    try:
        return _train(cfg, Path(out_dir), info, num_workers, resume, progress, tensorboard, cache_dir, latency_runs)
    finally:
        if info.distributed:
            shutdown_distributed()


def _train(
    cfg: RunConfig,
    out_dir: Path,
    info: DistInfo,
    num_workers: int,
    resume: str | os.PathLike[str] | None,
    progress: bool,
    tensorboard: bool,
    cache_dir: str | os.PathLike[str] | None,
    latency_runs: int,
) -> TrainResult:
    """The run's four steps: build, resume, the epoch loop, finish (final checkpoints and the test report)."""
    choose_numerics(cfg.train.amp, cfg.train.channels_last, info.device)  # before the data: fail fast
    ckpt = load_checkpoint(resume) if resume is not None else None
    run = _Run.build(cfg, out_dir, info, num_workers, cache_dir, ckpt)
    if ckpt is not None:
        run.restore(ckpt, str(resume))
    run.start_outputs(tensorboard)
    try:
        if run.train_epochs(progress):
            run.finish(latency_runs)
    finally:
        _close(run.writer)
    return run.result


@dataclass
class _Loaders:
    train: Any
    select: Any  # the split the best checkpoint is selected on (val, else test)
    select_dataset: Any
    selection_split: str
    calib: Any  # US-Nets: a fixed order of training images without augmentation, for BN calibration
    eval_batch_size: int
    num_workers: int


class _Run:
    """What one training run builds, and its steps (see :func:`_train`). Only rank 0 writes files.

    Its state is declared here in two parts: the components :meth:`build` makes once (each build step fills its
    group), and the progress that changes as the run goes (set in ``__init__``; a checkpoint saves and
    :meth:`restore` brings back what a resumed run needs).
    """

    # -- components, made once by build() ---------------------------------------------------------------------------
    task: Task  # the model's task: data, objective, validation, report
    objective: Objective
    data: Any  # the task's splits (train, val, test, num_classes, in_chans, image_size, name, root)
    # _build_model
    kwargs: dict[str, Any]  # create_model's arguments (recorded in checkpoints)
    model: nn.Module
    teacher: nn.Module | None  # train.teacher: frozen, one per process, rebuilt from the recipe (not checkpointed)
    sampler: WidthSampler
    widths: tuple[float, ...]
    val_widths: tuple[float, ...]  # validated each epoch (US-Nets: the widths trained at every step)
    width_range: tuple[float, float] | None  # US-Nets
    calibrates: bool  # US-Nets with BatchNorm: statistics re-estimated after training (LayerNorm keeps none)
    # _decide_numerics
    per_rank_batch: int
    make_step: Callable[[torch.dtype | None, bool], Callable[[], None]]  # the probe's training step
    machine: dict[str, Any]
    numerics: Numerics
    numerics_history: list[dict[str, Any]]  # every numerics the run trained with, and from which step
    # _make_loaders and the plan
    loaders: _Loaders
    steps_per_epoch: int
    # _build_optimization
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    trainer: Trainer
    result: TrainResult

    # -- progress -----------------------------------------------------------------------------------------------------
    plan: EpochPlan | None  # a time budget's plan (re-fitted as the run goes)
    epochs: int  # the plan's epochs (train.epochs without a budget)
    total_steps: int

    def __init__(self, cfg: RunConfig, out_dir: Path, info: DistInfo) -> None:
        self.cfg, self.out_dir, self.info = cfg, out_dir, info
        self.last_path, self.best_path = out_dir / "last.pt", out_dir / "best.pt"
        self.writer: Any = None
        self.start_epoch, self.start_batch = 0, 0
        self.best: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.rng_to_restore: dict[str, Any] | None = None
        #: the time budget spent before this process started (a resumed run), and when its epochs began
        self.spent_before: float | None = 0.0
        self.t_train: float | None = None
        self.validations_done = 0
        self.eval_seconds: float | None = None  # the last validation's, measured
        self.replans: list[dict[str, Any]] = []  # every change of the plan (hardware.json)
        #: distributed runs: (step, budget spent, seconds per step) of rank 0 at the last re-plan (the learning rate)
        self.budget_sync: tuple[int, float, float] | None = None

    # -- build ----------------------------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        cfg: RunConfig,
        out_dir: Path,
        info: DistInfo,
        num_workers: int,
        cache_dir: str | os.PathLike[str] | None,
        ckpt: Mapping[str, Any] | None,
    ) -> _Run:
        """Data, model, width sampler, numerics, loaders, epoch plan, optimizer, schedule and trainer."""
        run = cls(cfg, out_dir, info)
        tc = cfg.train
        _set_determinism(tc.deterministic, info.device)
        _seed_all(tc.seed)
        run.task = create_task(cfg)
        run.objective = run.task.objective(cfg)
        run.data = run.task.load_data(cfg, cache_dir)
        run._build_model()
        run._decide_numerics(ckpt)
        run.loaders = run._make_loaders(num_workers)
        run.steps_per_epoch = len(run.loaders.train)
        run.plan = _plan_epochs(
            tc, ckpt, run.numerics, run.make_step, run.per_rank_batch, run.steps_per_epoch, len(run.loaders.select),
            len(run.val_widths), info,
        )  # fmt: skip
        run.epochs = run.plan.epochs if run.plan is not None else tc.epochs
        # the last epoch may be partial under a time budget
        run.total_steps = run.plan.total_steps if run.plan is not None else run.epochs * run.steps_per_epoch
        run._build_optimization()
        run.result = TrainResult(
            out_dir, last_checkpoint=run.last_path, selection_split=run.loaders.selection_split,
            numerics=run.numerics, plan=run.plan, epochs=run.epochs,
        )  # fmt: skip
        return run

    def _build_model(self) -> None:
        mc, tc, data, info = self.cfg.model, self.cfg.train, self.data, self.info
        self.kwargs = self.task.model_kwargs(self.cfg, data)
        model = create_model(mc.name, **self.kwargs)
        self.width_range = getattr(model, "width_range", None)
        if self.width_range is not None and mc.widths is not None:
            raise ValueError(
                f"model.widths {list(mc.widths)} is for slimmable (S-Net) switches, but {mc.name} is universally "
                "slimmable (any width in its range); set model.widths to null and give model.width_range [lo, hi] and "
                "model.stat_widths (the widths calibrated and evaluated after training) instead"
            )
        self.sampler = create_width_sampler(
            tc.width_sampler,
            tuple(model.widths),
            width_range=self.width_range,
            n=tc.num_sampled_widths,
            layer_groups=_layer_groups(model) if tc.per_layer_widths else None,
        )
        fixed = tuple(getattr(self.sampler, "fixed_widths", ()))
        if self.width_range is not None:
            # the widths trained at every step keep running statistics during training (validated each epoch)
            add_stat_widths(model, fixed)
        self.widths = tuple(model.widths)
        self.val_widths = self.widths if self.width_range is None else tuple(sorted(fixed or self.widths))
        bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        self.calibrates = self.width_range is not None and bn
        if tc.sync_bn and info.distributed:
            convert_sync_batchnorm(model, dist.new_group())
        self.model = model.to(info.device)
        self.teacher = None
        if tc.teacher is not None:  # rebuilt from the recipe on every process and on resume, never checkpointed
            self.teacher = build_teacher(tc.teacher, mc.name, self.kwargs, info.device)
            self.objective.set_teacher(self.teacher, tc.teacher_temperature, tc.teacher_weight)
            if info.is_main:
                _logger.info(
                    "teacher: %s; loss = %g * T^2 * KL + %g * %s (T = %g)",
                    describe_teacher(tc.teacher, mc.name, self.teacher), tc.teacher_weight, 1 - tc.teacher_weight,
                    "target (labels; in-place distillation: the widest width)" if tc.inplace_distill else "labels",
                    tc.teacher_temperature,
                )  # fmt: skip

    def _decide_numerics(self, ckpt: Mapping[str, Any] | None) -> None:
        tc, data, info = self.cfg.train, self.data, self.info
        self.per_rank_batch = self.cfg.data.batch_size // info.world_size
        self.make_step = probe_step_factory(
            self.model, self.sampler, self.task.probe_batches(data, self.kwargs["num_classes"]),
            min(self.per_rank_batch, PROBE_MAX_BATCH), info.device, objective=self.objective, seed=tc.seed,
        )  # fmt: skip
        self.machine = machine_info(info.device)
        self.numerics = _kept_numerics(ckpt, tc, self.machine) or decide_numerics(
            tc.amp, self.task.auto_channels_last(tc.channels_last), info.device, self.make_step
        )
        # every numerics the run has trained with, and from which step (a resume may change them)
        self.numerics_history = list((ckpt or {}).get("numerics_history") or [])
        if ckpt is not None and ckpt.get("numerics") and not self.numerics_history:  # a checkpoint from before
            self.numerics_history = [{"label": Numerics(**ckpt["numerics"]).label, "from_step": 0}]
        step = int(ckpt["step"]) if ckpt is not None else 0
        if not self.numerics_history or self.numerics_history[-1]["label"] != self.numerics.label:
            if self.numerics_history and info.is_main:
                _logger.warning(
                    "resuming a run trained with %s in %s: the run goes on from step %d but not exactly as it would "
                    "have (%s)", self.numerics_history[-1]["label"], self.numerics.label, step,
                    self.numerics.describe(),
                )  # fmt: skip
            self.numerics_history.append({"label": self.numerics.label, "from_step": step})
        if self.numerics.channels_last:
            self.model.to(memory_format=torch.channels_last)
            if self.teacher is not None:
                self.teacher.to(memory_format=torch.channels_last)
        if info.is_main:
            _logger.info("machine: %s", describe_machine(self.machine))
            _logger.info("numerics: %s", self.numerics.describe())

    def _make_loaders(self, num_workers: int) -> _Loaders:
        dc, tc, data, info = self.cfg.data, self.cfg.train, self.data, self.info
        pin = info.device.type == "cuda"
        assert data.train is not None
        split = {"rank": info.rank, "world_size": info.world_size, "pin_memory": pin, "num_workers": num_workers,
                 "collate_fn": self.task.collate_fn()}  # fmt: skip
        train = create_loader(data.train, dc.batch_size, train=True, seed=tc.seed, **split)
        eval_bs = dc.eval_batch_size or dc.batch_size
        eval_bs = max(info.world_size, eval_bs - eval_bs % info.world_size)
        selection_split = "val" if data.val is not None else "test"
        select_dataset = data.val if data.val is not None else data.test
        select = create_loader(select_dataset, eval_bs, train=False, **split)
        if selection_split == "test" and info.is_main:
            _logger.warning(
                "data.val_size is 0: the best checkpoint is selected on the test split (%s), so its test accuracy is "
                "optimistic; hold out images with data.val_size",
                data.root,
            )
        calib = None
        if self.calibrates:  # a fixed-seed order without augmentation: the same batches on every call
            calib = create_loader(_without_augmentation(data), dc.batch_size, train=True, seed=tc.seed, **split)
        return _Loaders(train, select, select_dataset, selection_split, calib, eval_bs, num_workers)

    def eval_loader(self, dataset: Any) -> Any:
        info = self.info
        return create_loader(
            dataset, self.loaders.eval_batch_size, train=False, num_workers=self.loaders.num_workers, rank=info.rank,
            world_size=info.world_size, pin_memory=info.device.type == "cuda", collate_fn=self.task.collate_fn(),
        )  # fmt: skip

    def _build_optimization(self) -> None:
        oc, tc, info = self.cfg.optim, self.cfg.train, self.info
        self.optimizer = create_optimizer(
            self.model, oc.name, oc.lr, momentum=oc.momentum, nesterov=oc.nesterov, betas=oc.betas, eps=oc.eps,
            weight_decay=oc.weight_decay, decay_norm_and_bias=oc.decay_norm_and_bias,
            decay_depthwise=oc.decay_depthwise,
        )  # fmt: skip
        self.scheduler = create_scheduler(
            self.optimizer, oc.schedule, epochs=self.epochs, steps_per_epoch=self.steps_per_epoch,
            warmup_epochs=oc.warmup_epochs, warmup_factor=oc.warmup_factor, milestones=oc.milestones, gamma=oc.gamma,
            min_lr=oc.min_lr,
            # a time budget: the decay follows the budget's time, over at most train.epochs (the plan only says when
            # the run stops)
            total_steps=self.plan.max_epochs * self.steps_per_epoch if self.plan else self.total_steps,
            budget_seconds=self.plan.budget_minutes * 60 if self.plan else None,
        )  # fmt: skip
        self.scaler = torch.amp.GradScaler("cuda") if self.numerics.use_grad_scaler else None
        ddp = wrap_ddp(self.model, info) if info.distributed else None
        forward: Any = ddp if ddp is not None else self.model
        if tc.compile:
            forward = torch.compile(forward)
        self.trainer = Trainer(
            self.model, self.optimizer, self.scheduler, self.sampler, device=info.device, forward=forward, ddp=ddp,
            autocast_dtype=self.numerics.autocast_dtype, scaler=self.scaler, objective=self.objective,
            grad_clip=oc.grad_clip, channels_last=self.numerics.channels_last,
            seed=tc.seed, log_interval=tc.log_interval, log_seconds=tc.log_seconds, total_steps=self.total_steps,
            nonfinite=tc.nonfinite, clock=_clock, before_schedule_step=self._budget_spent if self.plan else None,
        )  # fmt: skip
        self.trainer.expected_step_seconds = self.plan.seconds_per_step if self.plan is not None else None
        if self.plan is not None and info.device.type == "cpu" and not info.distributed and torch.get_num_threads() > 1:
            # a time budget is spent best at whatever thread count runs fastest now (results depend on the timing
            # anyway); distributed runs keep theirs
            self.trainer.thread_governor = ThreadGovernor(torch.get_num_threads(), clock=_clock)

    # -- resume ---------------------------------------------------------------------------------------------------

    def restore(self, ckpt: Mapping[str, Any], resume: str) -> None:
        """Continue from ``ckpt``: weights, optimizer, schedule, step, progress and (mid-epoch) random states."""
        info = self.info
        _check_resume(ckpt, self.cfg, self.model, resume)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.trainer.step = int(ckpt["step"])
        self.start_epoch, self.start_batch = int(ckpt["epoch"]), int(ckpt.get("batch_in_epoch", 0))
        self.best, self.history = dict(ckpt.get("best") or {}), list(ckpt.get("history") or [])
        # a checkpoint from before the budget was recorded: the plan is kept as it is
        self.spent_before = float(ckpt["time_spent"]) if ckpt.get("time_spent") is not None else None
        if self.spent_before is not None and self.plan is not None:
            self.budget_sync = (int(ckpt["step"]), self.spent_before, self.plan.seconds_per_step)
        self.validations_done = sum(1 for h in self.history if "val" in h)
        if self.start_batch:
            if int(ckpt.get("steps_per_epoch", self.steps_per_epoch)) != self.steps_per_epoch:
                raise ValueError(
                    f"--resume {resume}: the checkpoint stopped mid-epoch with {ckpt.get('steps_per_epoch')} steps "
                    f"per epoch, this run has {self.steps_per_epoch} (batch size or process count changed); resume "
                    "with the settings it was written with"
                )
            states = ckpt.get("rng") or []
            if len(states) == info.world_size:
                self.rng_to_restore = states[info.rank]
            else:
                _logger.warning(
                    "the checkpoint holds random states of %d processes, not %d", len(states), info.world_size
                )
        if info.is_main:
            _logger.info(
                "resuming %s at epoch %d, batch %d (step %d)",
                resume, self.start_epoch + 1, self.start_batch, self.trainer.step,
            )  # fmt: skip

    # -- outputs --------------------------------------------------------------------------------------------------

    def start_outputs(self, tensorboard: bool) -> None:
        """Rank 0: the output folder, the resolved recipe, hardware.json, TensorBoard; log what is trained."""
        if not self.info.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.out_dir / "config.yaml")
        self.write_hardware()
        if tensorboard:
            self.writer = _tensorboard(self.out_dir / "tb")
        _logger.info(
            "training %s widths %s (%r) on %s: %d images, %d steps/epoch of %d (x%d processes), %d epochs -> %s",
            self.cfg.model.name, ",".join(f"{w:g}" for w in self.widths), self.sampler, self.info.device,
            len(self.data.train), self.steps_per_epoch, self.per_rank_batch, self.info.world_size, self.epochs,
            self.out_dir,
        )  # fmt: skip

    def write_hardware(self) -> None:
        """The machine, the numerics and the current plan."""
        plan = self.plan and self.plan.to_dict()
        governor = self.trainer.thread_governor
        keys = ("step", "from", "to", "seconds_before", "seconds_after")
        threads = [dict(zip(keys, c)) for c in governor.changes] if governor is not None else []
        write_json(self.out_dir / "hardware.json", {"machine": self.machine, "numerics": self.numerics.to_dict(),
                                                     "numerics_history": self.numerics_history, "plan": plan,
                                                     "replans": self.replans, "thread_changes": threads})  # fmt: skip

    def checkpoint(self, epoch: int, batch_in_epoch: int) -> dict[str, Any]:
        """Everything a resume needs (a collective in a distributed run: every rank calls it)."""
        return model_checkpoint(
            self.model,
            preprocess=self.data.preprocess(),
            config=self.cfg.to_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            epoch=epoch,
            batch_in_epoch=batch_in_epoch,
            steps_per_epoch=self.steps_per_epoch,
            step=self.trainer.step,
            rng=_gather_rng(self.info),
            best=self.best,
            history=self.history,
            plan=self.plan and self.plan.to_dict(),
            time_spent=self.spent_seconds(),
            numerics=self.numerics.to_dict(),
            numerics_history=self.numerics_history,
            machine=self.machine,
        )

    def _budget_spent(self) -> None:
        """Before every learning-rate step of a budgeted run: the decay follows the budget's time."""
        if self.plan is None or self.spent_before is None:
            return
        factor = self.scheduler.lr_lambdas[0]
        if self.info.distributed:
            # every process must take the same rate: rank 0's time at the last re-plan, carried on at its speed then
            step0, spent0, per_step = self.budget_sync or (0, 0.0, self.plan.seconds_per_step)
            factor.spent = spent0 + (self.trainer.step - step0) * per_step
            factor.reserve = self.plan.eval_seconds
        else:
            factor.spent = self.spent_seconds()
            factor.reserve = self.eval_seconds if self.eval_seconds is not None else self.plan.eval_seconds

    def spent_seconds(self) -> float | None:
        """The time budget spent so far: the epoch loop's time, across resumes (``None``: not known)."""
        if self.spent_before is None:
            return None
        return self.spent_before + (self.trainer.clock() - self.t_train if self.t_train is not None else 0.0)

    def _on_log(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(f"train/{k}", v, step)

    # -- the epoch loop -------------------------------------------------------------------------------------------

    def train_epochs(self, progress: bool) -> bool:
        """Train the planned epochs, evaluating and saving after each; ``False`` if stopped by a signal."""
        try:
            return self._epoch_loop(progress)
        finally:  # evaluation and latency with every thread, as the caller had them
            if self.trainer.thread_governor is not None:
                self.trainer.thread_governor.restore()

    def _epoch_loop(self, progress: bool) -> bool:
        info, tc = self.info, self.cfg.train
        self.t_train = self.trainer.clock()
        with _StopSignal(info) as stop:
            epoch = self.start_epoch
            while epoch < self.epochs:  # the plan may shorten ``epochs`` as the run goes
                stats = self._train_one_epoch(epoch, progress, stop)
                if stats.interrupted:
                    ck = self.checkpoint(epoch, stats.batches_done)
                    if info.is_main:
                        save_checkpoint(self.last_path, ck)
                        _logger.warning(
                            "stopped by a signal at epoch %d, batch %d/%d; saved %s. Continue with --resume %s",
                            epoch + 1, stats.batches_done, self.steps_per_epoch, self.last_path, self.last_path,
                        )  # fmt: skip
                    self.result.interrupted, self.result.epochs_done = True, epoch
                    return False
                if info.distributed:
                    average_bn_statistics(self.model, info.world_size)
                record = _epoch_record(stats)
                if (epoch + 1) % tc.eval_every == 0 or epoch + 1 == self.epochs:
                    t_val = self.trainer.clock()
                    self._validate(record, epoch)
                    self.eval_seconds = self.trainer.clock() - t_val
                    self.validations_done += 1
                self.history.append(record)
                self._replan(record)  # validation timed: fit the rest to the budget
                ck = self.checkpoint(epoch + 1, 0)
                if info.is_main:
                    save_checkpoint(self.last_path, ck)
                    if record.get("best"):
                        save_checkpoint(self.best_path, ck)
                    if self.trainer.thread_governor is not None:
                        self.write_hardware()  # its thread changes
                    write_json(self.out_dir / "history.json", self.history)
                    _log_epoch(record, self.epochs, self.loaders.selection_split, self.writer, self.task)
                epoch += 1
                if stop.poll(force=True) and epoch < self.epochs:
                    if info.is_main:
                        _logger.warning(
                            "stopped by a signal after epoch %d; continue with --resume %s", epoch, self.last_path
                        )
                    self.result.interrupted, self.result.epochs_done = True, epoch
                    return False
        return True

    def _train_one_epoch(self, epoch: int, progress: bool, stop: _StopSignal) -> EpochStats:
        info, seed = self.info, self.cfg.train.seed
        loader = self.loaders.train
        loader.batch_sampler.sampler.set_epoch(epoch, start=self.start_batch * self.per_rank_batch)
        if self.start_batch == 0:
            _seed_epoch(seed, epoch, info.rank)
        batches = iter(loader)
        if self.rng_to_restore is not None:
            set_rng_state(self.rng_to_restore)
            self.rng_to_restore = None
        # the trainer ends the epoch early at the plan's total steps (a partial last epoch, whatever re-planning does)
        try:
            stats = self.trainer.train_epoch(
                loader, epoch, steps_in_epoch=self.steps_per_epoch,
                start_batch=self.start_batch, should_stop=stop.poll, progress=progress and info.is_main,
                on_log=self._on_log, batches=batches, on_progress=lambda step: self._replan(None),
                progress_every=self.cfg.train.log_interval if info.distributed else None,
            )  # fmt: skip
        except NonFiniteLossError as err:  # nothing diverged is saved: last.pt / best.pt stay as they were
            raise with_checkpoint_note(err, self.last_path) from None
        self.start_batch = 0
        return stats

    def _evaluate(self, dataset: Any, loader: Any, widths: Sequence[float]) -> list[dict[str, Any]]:
        return self.task.validate(
            self.model, dataset, loader, widths, device=self.info.device,
            autocast_dtype=self.numerics.autocast_dtype, channels_last=self.numerics.channels_last,
        )  # fmt: skip

    def _validate(self, record: dict[str, Any], epoch: int) -> None:
        metric = self.task.metric
        rows = self._evaluate(self.loaders.select_dataset, self.loaders.select, self.val_widths)
        record["val"] = rows
        record[f"val_{metric}_mean"] = mean_metric(rows, metric)
        if not self.best or record[f"val_{metric}_mean"] > self.best[f"{metric}_mean"]:
            self.best = {f"{metric}_mean": record[f"val_{metric}_mean"], "epoch": epoch + 1}
            record["best"] = True

    def _replan(self, record: dict[str, Any] | None) -> None:
        """Refit the plan to the budget left at the current speed, both ways (a collective in a distributed run).

        Called at every progress line and when the speed leaves the plan's (every ``train.log_interval`` steps in a
        distributed run, the same steps on every process), and after every epoch (``record``: that epoch's history
        entry). The plan decides when the run stops; the learning rate follows the budget's time and needs no refit
        (:class:`~slimmable.train.optim.TimeBudgetFactor`)."""
        if self.plan is None:  # no time budget (alike on every process)
            return
        spent = self.spent_seconds()
        per_step = self.trainer.step_clock.seconds_per_step()
        new = None
        if (
            spent is not None and per_step is not None
            and len(self.trainer.step_clock) >= min(MIN_STEPS_TO_REPLAN, self.steps_per_epoch)
            and self.trainer.step < self.total_steps
        ):  # fmt: skip
            new = replan(
                self.plan, steps_done=self.trainer.step, validations_done=self.validations_done, spent_seconds=spent,
                seconds_per_step=per_step, eval_seconds=self.eval_seconds,
            )  # fmt: skip
        if self.info.distributed:  # every process follows rank 0's plan, and its clock for the learning rate
            box: list[Any] = [new, spent, per_step]
            dist.broadcast_object_list(box, src=0)
            new = box[0]
            if box[1] is not None:
                self.budget_sync = (self.trainer.step, float(box[1]), box[2] or self.plan.seconds_per_step)
        if new is None:
            if per_step is not None and len(self.trainer.step_clock) >= MIN_STEPS_TO_REPLAN:
                self.trainer.expected_step_seconds = per_step  # the plan holds at this speed: check against it
            return
        old = self.plan
        assert old is not None and spent is not None and per_step is not None
        self.plan = new
        self.epochs, self.total_steps = self.plan.epochs, self.plan.total_steps
        self.trainer.total_steps = self.total_steps
        self.trainer.expected_step_seconds = self.plan.seconds_per_step
        if record is not None:
            record["replanned_total_steps"] = self.total_steps
        self.replans.append({"step": self.trainer.step, "from": old.total_steps, "to": new.total_steps,
                             "seconds_per_step": per_step, "spent_seconds": spent})  # fmt: skip
        self.result.plan, self.result.epochs = self.plan, self.epochs
        if self.info.is_main:
            way = "ahead of the plan, extended" if new.total_steps > old.total_steps else "behind the plan, shortened"
            _logger.warning(
                "time budget: %s from %d to %d steps (%.2f epochs) at step %d: steps take %.3f s now (mean of the "
                "last %d but the slowest), the plan assumed %.3f s; %.1f of %g min left",
                way, old.total_steps, new.total_steps, new.epochs_float, self.trainer.step, per_step,
                len(self.trainer.step_clock), old.seconds_per_step, max(0.0, old.budget_minutes - spent / 60),
                old.budget_minutes,
            )  # fmt: skip
            self.write_hardware()

    # -- finish ---------------------------------------------------------------------------------------------------

    def finish(self, latency_runs: int) -> None:
        """US-Nets: calibrate every stat width; then the best checkpoint's test report (rank 0 writes it)."""
        info, result, best = self.info, self.result, self.best
        result.epochs_done = self.epochs
        result.metric, result.best_score = self.task.metric, best.get(f"{self.task.metric}_mean")
        result.best_top1_mean, result.best_epoch = best.get("top1_mean"), best.get("epoch")
        result.best_checkpoint = self.best_path if best else None
        best_is_last = best.get("epoch") == self.epochs
        if self.calibrates:
            # US-Nets: only the widths trained at every step have statistics; calibrate every stat width so that
            # the final checkpoints evaluate at all of them without recalibration
            self._calibrate()
            ck = self.checkpoint(self.epochs, 0)
            if info.is_main:
                save_checkpoint(self.last_path, ck)
                if best_is_last:
                    save_checkpoint(self.best_path, ck)
        self._load_best()
        if self.calibrates and best and not best_is_last:
            self._calibrate()
            if info.is_main:
                best_ck = load_checkpoint(self.best_path)
                best_ck.update(model_checkpoint(self.model))
                save_checkpoint(self.best_path, best_ck)
        self._test_report(latency_runs)

    def _calibrate(self) -> None:
        info = self.info
        assert self.loaders.calib is not None
        used = calibrate_bn(
            self.model, self.loaders.calib, self.widths, num_batches=self.cfg.train.calib_batches, device=info.device
        )
        if info.distributed:
            average_bn_statistics(self.model, info.world_size)
        if info.is_main:
            _logger.info(
                "calibrated BN statistics of %d widths (%s) on %d training images each, without augmentation",
                len(used), ",".join(f"{w:g}" for w in used), next(iter(used.values())) * info.world_size,
            )  # fmt: skip

    def _load_best(self) -> None:
        """Every process takes the weights of ``best.pt`` (which rank 0 wrote)."""
        if self.info.is_main and self.best_path.exists():
            self.model.load_state_dict(load_checkpoint(self.best_path)["model"])
        if self.info.distributed:  # other machines may not see the output folder
            with torch.no_grad():
                for t in self.model.state_dict().values():
                    # receive into a copy, then copy_: an in-place op bumps the version counter that the slim
                    # layers' inference weight memo checks (a collective writing into t would not)
                    buf = t.clone()
                    dist.broadcast(buf, src=0)
                    t.copy_(buf)

    def _test_report(self, latency_runs: int) -> None:
        data, name, task = self.data, self.cfg.model.name, self.task
        test = self._evaluate(data.test, self.eval_loader(data.test), self.widths)
        if not self.info.is_main:
            return
        self.result.report = task.report(self.model, test, data, latency_runs)
        meta = {
            "model": name,
            "checkpoint": str(self.best_path),
            "epoch": self.best.get("epoch"),
            "split": "test",
            "dataset": data.name,
            "root": data.root,
            "device": str(self.info.device),
        }
        write_report(self.out_dir / "final_metrics", self.result.report, meta, columns=task.columns(self.result.report))
        plot_report(self.result.report, self.out_dir / "accuracy_vs_macs.png", f"{name} on {data.name} (test split)",
                    metric=task.row_key, label=f"test {task.metric_label} (%)")  # fmt: skip
        if self.writer is not None:
            for r in self.result.report:
                for k, v in r.items():
                    if k != "width" and isinstance(v, float):
                        self.writer.add_scalar(f"test/{k}/{r['width']:g}", v, self.epochs)


def _kept_numerics(ckpt: Mapping[str, Any] | None, tc: Any, machine: Mapping[str, Any]) -> Numerics | None:
    """A resumed run keeps its numerics when the settings and the machine's kind are unchanged (exact resume)."""
    if ckpt is None or not ckpt.get("numerics"):
        return None
    saved, before = ckpt["numerics"], ckpt.get("machine") or {}
    same_settings = saved.get("requested") == {"amp": tc.amp, "channels_last": tc.channels_last}
    keys = ("device", "cpu_capability", "native_bf16", "gpu")
    if not same_settings or any(before.get(k) != machine.get(k) for k in keys):
        return None
    kept = Numerics(**saved)
    reasons = {k: f"kept from the checkpoint ({v})" for k, v in kept.reasons.items()}
    return Numerics(kept.amp, kept.channels_last, reasons, kept.probe, kept.requested)


def _plan_epochs(
    tc: Any,
    ckpt: Mapping[str, Any] | None,
    numerics: Numerics,
    make_step: Any,
    batch: int,
    steps_per_epoch: int,
    eval_batches: int,
    eval_widths: int,
    info: DistInfo,
) -> EpochPlan | None:
    """The epoch plan of a run with ``train.time_budget_min``: a resumed run keeps its checkpoint's plan."""
    if tc.time_budget_min is None:
        return None
    if ckpt is not None and ckpt.get("plan"):
        plan = EpochPlan(**ckpt["plan"])
        if info.is_main:
            _logger.info("time budget: keeping the plan of the checkpoint: %s", plan.describe())
        return plan
    if batch <= PROBE_MAX_BATCH and numerics.probe:
        seconds = numerics.probe[numerics.label]  # the probe already ran at the training batch
    else:
        seconds = measure_step_seconds(make_step(numerics.autocast_dtype, numerics.channels_last, batch))
    if info.distributed:  # every process plans the same epochs: the slowest process's time
        t = torch.tensor([seconds], dtype=torch.float64, device=info.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        seconds = float(t)
    train_widths = tc.num_sampled_widths if tc.width_sampler == "sandwich" else eval_widths
    plan = plan_epochs(tc.time_budget_min, tc.epochs, steps_per_epoch, seconds, eval_batches, eval_widths, train_widths)
    if info.is_main:
        _logger.info("time budget: %s", plan.describe())
        if plan.total_steps == steps_per_epoch and plan.estimated_minutes > tc.time_budget_min:
            _logger.warning(
                "train.time_budget_min=%g: even one epoch (%.1f min) does not fit on this machine; training 1 epoch",
                tc.time_budget_min, plan.estimated_minutes,
            )  # fmt: skip
    return plan


def _epoch_record(stats: EpochStats) -> dict[str, Any]:
    return {
        "epoch": stats.epoch + 1,
        "train": [{"width": w, "loss": stats.loss[w], "top1": stats.top1[w]} for w in stats.loss],  # w: "random" too
        "lr": stats.lr,
        "seconds": stats.seconds,
        "images_per_second": stats.images_per_second,
        "skipped_steps": stats.skipped_steps,  # non-finite loss (train.nonfinite: skip)
    }


def _log_epoch(record: dict[str, Any], epochs: int, split: str, writer: Any, task: Task) -> None:
    metric = task.metric
    train = " ".join(f"{width_label(t['width'])}:{t['loss']:.3f}" for t in record["train"])
    msg = f"epoch {record['epoch']}/{epochs}  train loss {train}"
    if "val" in record:
        val = task.describe(record["val"])
        mean = record[f"val_{metric}_mean"]
        msg += f"  | {split} {val} (mean {mean:.2f}{', best' if record.get('best') else ''})"
    msg += f"  | {record['seconds']:.1f}s, {record['images_per_second']:.0f} img/s"
    _logger.info(msg)
    if writer is None:
        return
    e = record["epoch"]
    for t in record["train"]:
        writer.add_scalar(f"train_epoch/loss/{width_label(t['width'])}", t["loss"], e)
        if not math.isnan(t["top1"]):  # objectives that count correct answers (classification)
            writer.add_scalar(f"train_epoch/top1/{width_label(t['width'])}", t["top1"], e)
    for v in record.get("val", []):
        for k, value in v.items():
            if k not in ("width", "images") and isinstance(value, float):
                writer.add_scalar(f"{split}/{k}/{v['width']:g}", value, e)
    if "val" in record:
        writer.add_scalar(f"{split}/{metric}_mean", record[f"val_{metric}_mean"], e)
    writer.add_scalar("train_epoch/images_per_second", record["images_per_second"], e)
    writer.flush()


def _tensorboard(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # tensorboard is a dependency, but a broken install should not stop training
        _logger.warning("TensorBoard logging is off: %s", err)
        return None
    return SummaryWriter(str(path))


def _close(writer: Any) -> None:
    if writer is not None:
        writer.close()
