"""The pretrained-model payoff (issue 24, item 6): convert + sort + fine-tune a trained dense network vs networks of
each width trained alone.

For each network (``torchvision/resnet18`` and ``timm/mobilenetv3_small_050``, both ``small_input``, ``in_chans=1``,
10 classes) and each seed, on Fashion-MNIST:

1. ``pretrain``: the dense original (converted with ``widths=(1.0,)``, whose state dict has the original's keys),
   initialised as the individuals are (each module's ``reset_parameters``: the same network as ``individual_w1``),
   trained for ``N`` steps; its state dict is saved (``pretrain_<net>_s<seed>.pt``) and reloaded strictly into the
   original architecture (:func:`slimmable.convert.zoo.create_original_model`).
2. ``convert``: the original converted at widths 0.25 / 0.5 / 0.75 / 1.0 unsorted, sorted by ``magnitude`` and by
   ``bn`` (``convert(..., sort=)``); each width's BN statistics calibrated on training images without augmentation
   (:func:`slimmable.train.calibrate_bn`), then test and held-out top-1 per width: the "right after conversion" rows.
   The sort that fine-tunes is the one with the better mean held-out top-1 (the only choice made; on held-out
   training images, never on the test set).
3. ``finetune``: that sorted converted model trained with Algorithm 1 (every width, every step) and the original as
   a frozen teacher (``alpha=0.5, T=4``, as ``train.teacher: original``) for ``N/4`` steps.
4. ``individual_w<w>``: the converted model's architecture at ``w`` (:func:`slimmable.export.export_width`: the very
   network the slimmable model runs at ``w``, same MACs), re-initialised at random and trained alone for ``N`` steps.
   This, not a width-multiplier builder, because torchvision's ResNet-18 has none (``width_per_group`` is fixed for
   BasicBlocks) and timm's multipliers exist only as a few registered variants, and their rounding differs from the
   conversion's: the exported architecture is the same family, and the comparison is width for width.
5. The cost of each run: optimizer steps, training MACs (per step: every trained width's forward MACs x 3 for forward
   + backward, times the batch; the teacher's forward once per step; :func:`slimmable.search.count_macs`), and wall
   and CPU seconds on this machine.

Every run of a seed sees the same batches in the same order (the loader's shuffle and the augmentation are seeded
from ``(seed, epoch)``; fine-tuning sees the first ``N/4`` of the pretraining batches), the same optimizer (SGD,
Nesterov momentum 0.9, weight decay 5e-5 without BN and biases, cosine schedule): peak LR 0.1 from scratch, 0.02 for
fine-tuning. No time budget: results do not depend on the machine's load.

Why the Trainer and not ``train_from_config``: a recipe trains whole epochs over the whole training set (no step
count, no training-image count), and a converted zoo model cannot be built at one width below 1.0 alone (its widths
must end at 1.0), so each run here goes through the library's :class:`slimmable.train.Trainer` (Algorithm 1,
objective with teacher), :func:`create_optimizer` / :func:`create_scheduler`, :func:`evaluate` and
:func:`calibrate_bn`, with an in-memory loader of the library's :class:`TensorImageDataset`.

Cost ratios (the issue's "at a quarter of its cost"): per width, fine-tune steps / the individual's steps (0.25 by
construction), fine-tune MACs / that individual's MACs (the fine-tune trains all four widths and runs the teacher, so
this ratio is larger), fine-tune MACs / all four individuals' MACs, and the same with the pretraining counted
((pretrain + fine-tune) / all individuals): the pretraining is paid once for the dense model someone already has,
so the first three are the payoff, the last is the whole bill.

Scale (defaults; 2 seeds x 2 networks on 2 cores, 2 workers x 1 thread: estimated 71 minutes): 20,000 training
images (the first 20,000 of a fixed permutation of Fashion-MNIST's 60,000, split seed 0) + 2,000 held-out ones, the
full 10,000 test images, batch 64, ``N = 1200`` steps (3.8 epochs of the 20,000), fine-tuning 300. torchvision's
ResNet-18 with ``small_input`` keeps its 7x7 stem (at stride 1) and its max-pool: 124 MMACs per 28 px image at 1.0
(8 at 0.25), not the 0.5 GMACs of a stride-1 stem without the pool (the zoo model takes no ``stem_stride``; the pool
already halves the resolution). mobilenetv3_small_050: 1.9 MMACs. Seconds per step measured on this machine (one
thread, batch 64, ``nice -n 19`` while others' jobs kept the load at 3-4 on 2 cores, so a quiet machine is faster):
ResNet-18 pretraining 0.65, fine-tuning (4 widths + teacher) 1.52, individuals 0.07 / 0.19 / 0.39 / 0.65 at
0.25 / 0.5 / 0.75 / 1.0, evaluation 2.9 ms per image at 1.0; mobilenetv3_small_050 0.13, 0.44, 0.06 / 0.08 / 0.12 /
0.13, 0.3 ms. That is 142 core-minutes, 71 minutes on 2 workers; the two ResNet-18 chains (pretrain -> convert ->
fine-tune, about 26 minutes each) are the longest jobs. ``N`` is the largest round count whose estimate fits about
75 minutes. The script times a few steps of every run type at start and prints its estimate before training
(``--estimate-only`` stops there).

Each run writes ``<out>/<run>.json`` (and the pretrained weights ``<out>/pretrain_<net>_s<seed>.pt``) and is
skipped when that file exists; the final table is printed and written to ``<out>/summary.json``.

Usage:
    python benchmarks/pretrained_study.py [--seeds 0,1] [--steps 1200] [--workers 2] [--estimate-only]
    python benchmarks/pretrained_study.py --quick   # tiny: 1 seed, a few steps on a few hundred images
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _bench import describe_machine, machine_info, schedule_seconds  # noqa: E402
from _study import run_jobs  # noqa: E402

import slimmable  # noqa: E402
from slimmable._utils import write_json  # noqa: E402
from slimmable.convert.zoo import create_original_model  # noqa: E402
from slimmable.data.datasets import TensorImageDataset, load_fashion_mnist  # noqa: E402
from slimmable.data.transforms import FASHION_MNIST_MEAN, FASHION_MNIST_STD  # noqa: E402
from slimmable.export.dense import export_width  # noqa: E402
from slimmable.search.cost import count_macs  # noqa: E402
from slimmable.train import AllWidths, Trainer, calibrate_bn, create_optimizer, create_scheduler, evaluate  # noqa: E402
from slimmable.train.objectives import ClassificationObjective  # noqa: E402

NETWORKS = {"resnet18": "torchvision/resnet18", "mnv3s050": "timm/mobilenetv3_small_050"}
SORTS = ("none", "magnitude", "bn")
#: a training step's MACs against its forward pass's (forward + the backward's two products)
TRAIN_MACS_PER_FORWARD = 3
#: seconds a run spends besides training and evaluation (building, tracing, conversion, process start), measured
RUN_OVERHEAD_S = 6.0


@dataclass(frozen=True)
class StudyConfig:
    """What every run shares (recorded in each run's file; a changed config is a different study)."""

    networks: tuple[str, ...] = tuple(NETWORKS)
    widths: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    train_images: int = 20000
    val_images: int = 2000
    test_images: int = 10000
    batch_size: int = 64
    eval_batch_size: int = 500
    steps: int = 1200  # N: pretraining and each individual network
    finetune_fraction: float = 0.25
    lr: float = 0.1
    finetune_lr: float = 0.02
    weight_decay: float = 5e-5
    calib_batches: int = 20
    teacher_temperature: float = 4.0
    teacher_weight: float = 0.5

    @property
    def finetune_steps(self) -> int:
        return max(1, round(self.steps * self.finetune_fraction))

    @property
    def steps_per_epoch(self) -> int:
        return self.train_images // self.batch_size


QUICK = StudyConfig(train_images=256, val_images=64, test_images=128, batch_size=32, eval_batch_size=64, steps=4,
                    calib_batches=2)  # fmt: skip


def run_name(stage: str, net: str, seed: int, width: float | None = None) -> str:
    return f"{stage}_{net}" + (f"_w{width:g}" if width is not None else "") + f"_s{seed}"


# -- data -----------------------------------------------------------------------------------------------------------


@dataclass
class Data:
    train: TensorImageDataset  # with crop/flip augmentation
    train_plain: TensorImageDataset  # the same images without augmentation (BN calibration)
    val: TensorImageDataset
    test: TensorImageDataset


def load_data(cfg: StudyConfig) -> Data:
    """A fixed split (seed 0, the same for every seed and run): training and held-out images, the first test ones."""
    images, labels, _ = load_fashion_mnist(split="train", download=False)
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))
    tr, va = perm[: cfg.train_images], perm[cfg.train_images : cfg.train_images + cfg.val_images]
    t_img, t_lbl, _ = load_fashion_mnist(split="test", download=False)
    norm = (FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    return Data(
        train=TensorImageDataset(images, labels, *norm, augment="crop_flip", indices=tr, source="fmnist train"),
        train_plain=TensorImageDataset(images, labels, *norm, indices=tr, source="fmnist train"),
        val=TensorImageDataset(images, labels, *norm, indices=va, source="fmnist held-out"),
        test=TensorImageDataset(t_img[: cfg.test_images], t_lbl[: cfg.test_images], *norm, source="fmnist test"),
    )


def _batches(ds: TensorImageDataset, batch: int, shuffle_seed: int | None = None) -> Iterator[tuple[Any, Any]]:
    """Batches of ``ds`` (the dataset fetches a whole batch at once); shuffled by ``shuffle_seed`` when given."""
    n = len(ds)
    if shuffle_seed is None:
        order = torch.arange(n)
    else:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed))
    full = n // batch if shuffle_seed is not None else -(-n // batch)  # training drops a partial batch
    for i in range(full):
        yield ds.__getitems__(order[i * batch : (i + 1) * batch].tolist())


def train_batches(data: Data, cfg: StudyConfig, seed: int, epoch: int) -> Iterator[tuple[Any, Any]]:
    """Epoch ``epoch``'s batches for ``seed``: the same for every run of the seed (order and augmentation)."""
    torch.manual_seed(1_000_003 * seed + epoch)  # the augmentation's draws (torch's global generator) ...
    # ... all made now, so that nothing the model draws during the epoch changes them (63 MB for 20,000 images)
    return iter(list(_batches(data.train, cfg.batch_size, shuffle_seed=1_000_003 * seed + epoch)))


# -- models ---------------------------------------------------------------------------------------------------------


def _original(net: str, weights: Any = None) -> nn.Module:
    return create_original_model(NETWORKS[net], num_classes=10, in_chans=1, small_input=True, weights=weights)


def _example() -> torch.Tensor:
    return torch.zeros(1, 1, 28, 28)


def _reinit(model: nn.Module, seed: int) -> nn.Module:
    """Random weights (each module's own initialisation) and fresh BN statistics: a network trained from scratch."""
    torch.manual_seed(seed)
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()
    return model


def forward_macs(model: nn.Module, widths: Sequence[float]) -> dict[str, int]:
    """Forward MACs per image at each width."""
    out = {}
    for w in widths:
        with slimmable.use_width(model, w):
            out[f"{w:g}"] = int(count_macs(model, _example()))
    return out


# -- training -------------------------------------------------------------------------------------------------------


def train_steps(
    model: nn.Module,
    data: Data,
    cfg: StudyConfig,
    seed: int,
    *,
    steps: int,
    lr: float,
    teacher: nn.Module | None = None,
) -> dict[str, Any]:
    """Algorithm 1 at all of ``model``'s widths for ``steps`` steps of the seed's batches (with ``teacher``: every
    width also learns it); returns per-epoch losses and the seconds spent."""
    objective = ClassificationObjective()
    if teacher is not None:
        objective.set_teacher(teacher, cfg.teacher_temperature, cfg.teacher_weight)
    spe = cfg.steps_per_epoch
    epochs = -(-steps // spe)
    opt = create_optimizer(model, "sgd", lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    sched = create_scheduler(opt, "cosine", epochs=epochs, steps_per_epoch=spe, total_steps=steps)
    widths = slimmable.get_widths(model).switches
    trainer = Trainer(model, opt, sched, AllWidths(widths), device=torch.device("cpu"), objective=objective,
                      seed=seed, log_seconds=120.0, total_steps=steps)  # fmt: skip
    losses, t0, c0 = [], time.perf_counter(), time.process_time()
    for epoch in range(epochs):
        n = min(spe, steps - trainer.step)
        stats = trainer.train_epoch(None, epoch, steps_in_epoch=n, batches=train_batches(data, cfg, seed, epoch))  # type: ignore[arg-type]
        losses.append({f"{k:g}" if isinstance(k, float) else k: v for k, v in stats.loss.items()})
    assert trainer.step == steps, (trainer.step, steps)
    return {"steps": steps, "train_loss": losses, "train_seconds": time.perf_counter() - t0,
            "train_cpu_seconds": time.process_time() - c0}  # fmt: skip


def scores(
    model: nn.Module, data: Data, cfg: StudyConfig, widths: Sequence[float], splits: Sequence[str] = ("test", "val")
) -> dict[str, dict[str, float]]:
    """Top-1 (%) per width on the test and held-out images."""
    out: dict[str, dict[str, float]] = {f"{w:g}": {} for w in widths}
    for split in splits:
        ds = data.test if split == "test" else data.val
        for m in evaluate(model, list(_batches(ds, cfg.eval_batch_size)), widths, device="cpu"):
            out[f"{m.width:g}"][split] = m.top1
    return out


def train_cost(steps: int, batch: int, macs: dict[str, int], teacher_macs: int = 0) -> dict[str, Any]:
    """Training MACs of a run: each step runs every trained width forward and backward, the teacher forward."""
    per_step = batch * (TRAIN_MACS_PER_FORWARD * sum(macs.values()) + teacher_macs)
    return {"steps": steps, "macs_per_step": per_step, "train_macs": per_step * steps}


# -- the stages -----------------------------------------------------------------------------------------------------


def run_pretrain(net: str, seed: int, cfg: StudyConfig, data: Data, out: Path) -> dict[str, Any]:
    # the individuals' initialisation (each module's own ``reset_parameters``), not the builder's: timm's
    # MobileNetV3 init trained 4 points below it at this budget, which the comparison would otherwise inherit
    model = slimmable.convert(_reinit(_original(net), seed), widths=(1.0,), example_input=_example())
    res = train_steps(model, data, cfg, seed, steps=cfg.steps, lr=cfg.lr)
    weights = out / f"{run_name('pretrain', net, seed)}.pt"
    torch.save(model.state_dict(), weights)
    original = _original(net, weights)  # the keys are the original's: loaded strictly
    macs = forward_macs(model, (1.0,))
    return {**res, "weights": weights.name, "scores": scores(model, data, cfg, (1.0,)), "macs": macs,
            "params": sum(p.numel() for p in original.parameters()),
            "cost": train_cost(cfg.steps, cfg.batch_size, macs)}  # fmt: skip


def run_convert(net: str, seed: int, cfg: StudyConfig, data: Data, out: Path) -> dict[str, Any]:
    weights = out / f"{run_name('pretrain', net, seed)}.pt"
    rows: dict[str, Any] = {}
    for sort in SORTS:
        model = slimmable.convert(_original(net, weights), widths=cfg.widths, example_input=_example(),
                                  sort=None if sort == "none" else sort)  # fmt: skip
        raw = scores(model, data, cfg, cfg.widths, splits=("test",))
        calib = _batches(data.train_plain, cfg.batch_size)
        calibrate_bn(model, list(calib), cfg.widths, num_batches=cfg.calib_batches)
        rows[sort] = {"calibrated": scores(model, data, cfg, cfg.widths), "uncalibrated": raw}
    val_mean = {s: statistics.fmean(r["calibrated"][f"{w:g}"]["val"] for w in cfg.widths) for s, r in rows.items()}
    chosen = max(("magnitude", "bn"), key=lambda s: val_mean[s])
    return {"rows": rows, "heldout_mean_calibrated": val_mean, "chosen_sort": chosen,
            "calib_images": cfg.calib_batches * cfg.batch_size, "macs": forward_macs(model, cfg.widths)}  # fmt: skip


def run_finetune(net: str, seed: int, cfg: StudyConfig, data: Data, out: Path) -> dict[str, Any]:
    conv = json.loads((out / f"{run_name('convert', net, seed)}.json").read_text())
    weights = out / f"{run_name('pretrain', net, seed)}.pt"
    model = slimmable.convert(_original(net, weights), widths=cfg.widths, example_input=_example(),
                              sort=conv["chosen_sort"])  # fmt: skip
    teacher = _original(net, weights).requires_grad_(False)
    torch.manual_seed(seed)
    res = train_steps(model, data, cfg, seed, steps=cfg.finetune_steps, lr=cfg.finetune_lr, teacher=teacher)
    macs = forward_macs(model, cfg.widths)
    teacher_macs = int(count_macs(teacher, _example()))
    return {**res, "sort": conv["chosen_sort"], "scores": scores(model, data, cfg, cfg.widths), "macs": macs,
            "teacher_macs": teacher_macs,
            "cost": train_cost(cfg.finetune_steps, cfg.batch_size, macs, teacher_macs)}  # fmt: skip


def run_individual(net: str, seed: int, width: float, cfg: StudyConfig, data: Data, out: Path) -> dict[str, Any]:
    slim = slimmable.convert(_original(net), widths=cfg.widths, example_input=_example())
    dense = _reinit(export_width(slim, width, example=_example()), seed)
    model = slimmable.convert(dense, widths=(1.0,), example_input=_example())
    res = train_steps(model, data, cfg, seed, steps=cfg.steps, lr=cfg.lr)
    macs = forward_macs(model, (1.0,))
    with slimmable.use_width(slim, width):
        assert macs["1"] == count_macs(slim, _example()), "the individual network is the converted one at its width"
    return {**res, "width": width, "scores": {f"{width:g}": scores(model, data, cfg, (1.0,))["1"]}, "macs": macs,
            "params": sum(p.numel() for p in model.parameters()),
            "cost": train_cost(cfg.steps, cfg.batch_size, macs)}  # fmt: skip


def do_chain(net: str, seed: int, cfg: StudyConfig, out: str, threads: int) -> list[dict[str, Any]]:
    """pretrain -> convert -> finetune of one network and seed, each stage skipped when its file exists."""
    torch.set_num_threads(threads)
    data, done = load_data(cfg), []
    for stage, fn in (("pretrain", run_pretrain), ("convert", run_convert), ("finetune", run_finetune)):
        path = Path(out) / f"{run_name(stage, net, seed)}.json"
        if path.is_file():
            continue
        done.append(_record(path, stage, net, seed, None, cfg, lambda fn=fn: fn(net, seed, cfg, data, Path(out))))
    return done


def do_individual(net: str, seed: int, width: float, cfg: StudyConfig, out: str, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    data = load_data(cfg)
    path = Path(out) / f"{run_name('individual', net, seed, width)}.json"
    return [_record(path, "individual", net, seed, width, cfg,
                    lambda: run_individual(net, seed, width, cfg, data, Path(out)))]  # fmt: skip


def _record(path: Path, stage: str, net: str, seed: int, width: float | None, cfg: StudyConfig, fn: Any) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    res = fn()
    res.update(run=path.stem, stage=stage, network=NETWORKS[net], net=net, seed=seed, study=asdict(cfg),
               wall_seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0,
               threads=torch.get_num_threads(), machine=machine_info())  # fmt: skip
    if width is not None:
        res["width"] = width
    write_json(path, res)
    print(f"{path.stem}: {res['wall_seconds']:.0f} s", flush=True)
    return res


# -- estimate -------------------------------------------------------------------------------------------------------


def time_steps(cfg: StudyConfig, data: Data, nets: Sequence[str], steps: int = 3) -> dict[str, dict[str, float]]:
    """Seconds per training step (after one warm-up step) of each run type, and per evaluated image at 1.0."""
    out: dict[str, dict[str, float]] = {}
    small = replace(cfg, steps=steps + 1)
    for net in nets:
        t: dict[str, float] = {}
        slim = slimmable.convert(_original(net), widths=cfg.widths, example_input=_example())
        teacher = _original(net).requires_grad_(False)
        runs: dict[str, tuple[nn.Module, nn.Module | None]] = {"finetune": (slim, teacher)}
        for w in cfg.widths:
            runs[f"individual_w{w:g}"] = (slimmable.convert(export_width(slim, w, example=_example()), widths=(1.0,),
                                                            example_input=_example()), None)  # fmt: skip
        for name, (model, teach) in runs.items():
            train_steps(model, data, replace(small, steps=1), 0, steps=1, lr=0.01, teacher=teach)  # warm-up
            t0 = time.perf_counter()
            train_steps(model, data, small, 0, steps=steps, lr=0.01, teacher=teach)
            t[name] = (time.perf_counter() - t0) / steps
        t["pretrain"] = t["individual_w1"]
        model = runs["individual_w1"][0]
        batch = next(_batches(data.test, cfg.eval_batch_size))[0]
        t0 = time.perf_counter()
        with torch.no_grad():
            model.eval()(batch)
        t["eval_image_w1"] = (time.perf_counter() - t0) / batch.shape[0]
        out[net] = t
    return out


def job_seconds(job: tuple, cfg: StudyConfig, t: dict[str, dict[str, float]]) -> float:
    """Estimated seconds of a job: its steps, its evaluations (scaled by MACs as width^2), its overhead."""
    kind, net, _seed, *rest = job
    tt = t[net]
    width_share = sum(w * w for w in cfg.widths)  # evaluation at every width, relative to 1.0
    per_eval = (cfg.test_images + cfg.val_images) * tt["eval_image_w1"]
    if kind == "chain":
        train = cfg.steps * tt["pretrain"] + cfg.finetune_steps * tt["finetune"]
        test_share = cfg.test_images / (cfg.test_images + cfg.val_images)  # uncalibrated: test images only
        evals = per_eval * (1 + len(SORTS) * (1 + test_share) * width_share + width_share)
        return train + evals + 5 * RUN_OVERHEAD_S
    w = rest[0]
    return cfg.steps * tt[f"individual_w{w:g}"] + per_eval * w * w + RUN_OVERHEAD_S


# -- summary --------------------------------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, Any]:
    return {"per_seed": values, "mean": statistics.fmean(values) if values else None,
            "spread": (max(values) - min(values)) if values else None}  # fmt: skip


def summarize(out: Path, cfg: StudyConfig, seeds: list[int]) -> dict[str, Any]:
    """Per network, per width: accuracies of every row (mean, per seed, spread), fine-tuned - individual, cost
    ratios, verdict."""

    def load(stage: str, net: str, seed: int, w: float | None = None) -> dict | None:
        p = out / f"{run_name(stage, net, seed, w)}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    table: dict[str, Any] = {}
    for net in cfg.networks:
        pre = {s: load("pretrain", net, s) for s in seeds}
        conv = {s: load("convert", net, s) for s in seeds}
        ft = {s: load("finetune", net, s) for s in seeds}
        ind = {(s, w): load("individual", net, s, w) for s in seeds for w in cfg.widths}
        complete = all(v is not None for v in [*pre.values(), *conv.values(), *ft.values(), *ind.values()])
        entry: dict[str, Any] = {
            "network": NETWORKS[net],
            "complete": complete,
            "pretrained_top1": _stats([p["scores"]["1"]["test"] for p in pre.values() if p]),
            "chosen_sort": {s: c["chosen_sort"] for s, c in conv.items() if c},
            "widths": {},
        }
        all_ind_macs = {s: sum(ind[(s, w)]["cost"]["train_macs"] for w in cfg.widths if ind[(s, w)]) for s in seeds}
        for w in cfg.widths:
            k = f"{w:g}"
            e: dict[str, Any] = {}
            for sort in SORTS:
                e[f"converted_{sort}"] = _stats([c["rows"][sort]["calibrated"][k]["test"] for c in conv.values() if c])
                e[f"converted_{sort}_uncalibrated"] = _stats(
                    [c["rows"][sort]["uncalibrated"][k]["test"] for c in conv.values() if c]
                )
            e["finetuned"] = _stats([f["scores"][k]["test"] for f in ft.values() if f])
            e["individual"] = _stats([i["scores"][k]["test"] for (s, ww), i in ind.items() if ww == w and i])
            pairs = [(ft[s], ind[(s, w)]) for s in seeds if ft[s] and ind[(s, w)]]
            e["diff_finetuned_minus_individual"] = _stats([f["scores"][k]["test"] - i["scores"][k]["test"]
                                                           for f, i in pairs])  # fmt: skip
            cost = [{"steps": f["cost"]["steps"] / i["cost"]["steps"],
                     "macs_vs_individual": f["cost"]["train_macs"] / i["cost"]["train_macs"],
                     "macs_vs_all_individuals": f["cost"]["train_macs"] / all_ind_macs[f["seed"]],
                     "macs_with_pretrain_vs_all_individuals": (f["cost"]["train_macs"] + pre[f["seed"]]["cost"][
                         "train_macs"]) / all_ind_macs[f["seed"]] if pre[f["seed"]] else None,
                     "wall_vs_individual": f["train_seconds"] / i["train_seconds"]} for f, i in pairs]  # fmt: skip
            e["cost_ratio"] = {m: statistics.fmean(c[m] for c in cost) if cost else None
                               for m in ("steps", "macs_vs_individual", "macs_vs_all_individuals",
                                         "macs_with_pretrain_vs_all_individuals", "wall_vs_individual")}  # fmt: skip
            d, r = e["diff_finetuned_minus_individual"]["mean"], e["cost_ratio"]["steps"]
            e["accuracy_reached"] = None if d is None else d >= 0
            e["quarter_cost_steps"] = None if r is None else r <= 0.25 + 1e-9
            e["goal_met"] = None if d is None or r is None else e["accuracy_reached"] and e["quarter_cost_steps"]
            entry["widths"][k] = e
        entry["cost"] = {
            "pretrain": [p["cost"] | {"train_seconds": p["train_seconds"]} for p in pre.values() if p],
            "finetune": [f["cost"] | {"train_seconds": f["train_seconds"]} for f in ft.values() if f],
            "individual": {f"{w:g}": [i["cost"] | {"train_seconds": i["train_seconds"]} for (s, ww), i in ind.items()
                                      if ww == w and i] for w in cfg.widths},
        }  # fmt: skip
        table[net] = entry
    return table


def _n(v: float | None, fmt: str = "6.2f") -> str:
    return format(v, fmt) if v is not None else f"{'-':>{int(fmt.split('.')[0].lstrip('+'))}}"


def print_table(table: dict[str, Any], cfg: StudyConfig, seeds: list[int]) -> None:
    print(f"\nFashion-MNIST, {cfg.train_images} training images, {cfg.test_images} test images; test top-1 %, mean "
          f"over seeds {seeds} (spread = max - min); pretraining and individuals {cfg.steps} steps, fine-tuning "
          f"{cfg.finetune_steps} steps of batch {cfg.batch_size}")  # fmt: skip
    for e in table.values():
        pre = e["pretrained_top1"]
        print(f"\n{e['network']}: pretrained dense {_n(pre['mean'])}; fine-tuned sort {e['chosen_sort']}"
              f"{'' if e['complete'] else ' (INCOMPLETE)'}")  # fmt: skip
        head = (f"{'width':>5} | {'unsorted':>8} {'sort-mag':>8} {'sort-bn':>8} (calibrated) | {'finetuned':>9} "
                f"{'indiv':>6} {'ft-ind':>7} {'spread':>6} | {'steps':>5} {'MACs/w':>6} {'MACs/all':>8} "
                f"{'+pre/all':>8} | verdict")  # fmt: skip
        print(head)
        print("-" * len(head))
        for k, w in e["widths"].items():
            c = w["cost_ratio"]
            d = w["diff_finetuned_minus_individual"]
            verdict = ("-" if w["goal_met"] is None else
                       f"{'goal met' if w['goal_met'] else 'goal NOT met'}: {_n(d['mean'], '+.2f')} points vs the "
                       f"individual at {_n(c['steps'], '.2f')}x its steps, {_n(c['macs_vs_individual'], '.2f')}x its "
                       "training MACs")  # fmt: skip
            print(f"{k:>5} | {_n(w['converted_none']['mean'], '8.2f')} {_n(w['converted_magnitude']['mean'], '8.2f')} "
                  f"{_n(w['converted_bn']['mean'], '8.2f')}              | {_n(w['finetuned']['mean'], '9.2f')} "
                  f"{_n(w['individual']['mean'])} {_n(d['mean'], '+7.2f')} {_n(d['spread'])} | "
                  f"{_n(c['steps'], '5.2f')} {_n(c['macs_vs_individual'], '6.2f')} "
                  f"{_n(c['macs_vs_all_individuals'], '8.2f')} {_n(c['macs_with_pretrain_vs_all_individuals'], '8.2f')}"
                  f" | {verdict}")  # fmt: skip
    print(
        "\ncost ratios: fine-tune / individual at that width (steps, training MACs), fine-tune / all four "
        "individuals (MACs), (pretraining + fine-tune) / all four individuals (MACs)"
    )


# -- main -----------------------------------------------------------------------------------------------------------


def _call(fn: Any, *args: Any) -> Any:
    """``fn(*args)``: a job of :func:`run_jobs` names the stage it runs."""
    return fn(*args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny study (1 seed, a few steps on a few hundred images)")
    ap.add_argument("--steps", type=int, help=f"N, pretraining and individual steps (default {StudyConfig.steps})")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1; --quick: 0)")
    ap.add_argument("--networks", default=None, help=f"comma-separated subset of {','.join(NETWORKS)}")
    ap.add_argument("--workers", type=int, default=None, help="jobs at once (default 2, --quick 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per job (default 1)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/pretrained_study[_quick])")
    ap.add_argument("--no-estimate", action="store_true", help="skip timing steps for the estimate")
    ap.add_argument("--estimate-only", action="store_true", help="print the estimate and stop (trains nothing)")
    args = ap.parse_args()
    cfg = QUICK if args.quick else StudyConfig()
    if args.steps:
        cfg = replace(cfg, steps=args.steps)
    if args.networks:
        nets = tuple(args.networks.split(","))
        if unknown := [n for n in nets if n not in NETWORKS]:
            raise SystemExit(f"--networks {','.join(unknown)}: not among {','.join(NETWORKS)}")
        cfg = replace(cfg, networks=nets)
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1")).split(",")]
    workers = args.workers or (1 if args.quick else 2)
    out = Path(args.out or HERE / "results" / ("pretrained_study_quick" if args.quick else "pretrained_study"))
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    machine = machine_info()
    print(f"{describe_machine(machine)}; {workers} worker(s) x {args.threads} thread(s); results in {out}")
    for p in out.glob("*.json"):
        if p.name != "summary.json" and json.loads(p.read_text()).get("study") != json.loads(json.dumps(asdict(cfg))):
            raise SystemExit(f"{p} is from another study config; use another --out or remove it")
    t_start = time.perf_counter()
    jobs: list[tuple] = [("chain", n, s) for s in seeds for n in cfg.networks]
    jobs += [("individual", n, s, w) for s in seeds for n in cfg.networks for w in cfg.widths]

    def pending(j: tuple) -> bool:
        if j[0] == "chain":
            return not (out / f"{run_name('finetune', j[1], j[2])}.json").is_file()
        return not (out / f"{run_name('individual', j[1], j[2], j[3])}.json").is_file()

    todo = [j for j in jobs if pending(j)]
    print(f"{len(jobs)} jobs ({len(seeds)} seed(s) x {len(cfg.networks)} network(s): a pretrain -> convert -> "
          f"finetune chain and {len(cfg.widths)} individual networks each), {len(jobs) - len(todo)} done (skipped), "
          f"{len(todo)} to run")  # fmt: skip
    estimate = None
    if todo and not args.no_estimate:
        per_step = time_steps(cfg, load_data(cfg), sorted({j[1] for j in todo}), steps=2 if args.quick else 3)
        for net, t in per_step.items():
            print(f"seconds per step ({args.threads} thread(s), batch {cfg.batch_size}), {net}: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in t.items()))  # fmt: skip
        todo.sort(key=lambda j: -job_seconds(j, cfg, per_step))
        secs = [job_seconds(j, cfg, per_step) for j in todo]
        wall = schedule_seconds(secs, workers)
        estimate = {"seconds_per_step": per_step, "core_minutes": sum(secs) / 60, "wall_minutes": wall / 60}
        print(f"estimated wall time: {wall / 60:.1f} min ({sum(secs) / 60:.1f} core-minutes, {workers} worker(s), "
              "if each gets a core)", flush=True)  # fmt: skip
    if args.estimate_only:
        return
    if todo:
        calls = [(do_chain, j[1], j[2]) if j[0] == "chain" else (do_individual, j[1], j[2], j[3]) for j in todo]
        run_jobs(_call, calls, (cfg, str(out), args.threads), workers, report=lambda _: None)  # each job prints
    table = summarize(out, cfg, seeds)
    print_table(table, cfg, seeds)
    wall = time.perf_counter() - t_start
    write_json(out / "summary.json", {"study": asdict(cfg), "finetune_steps": cfg.finetune_steps, "seeds": seeds,
                                      "workers": workers, "threads": args.threads, "estimate": estimate,
                                      "scale_reason": __doc__.split("Scale (defaults")[1].split("\n\n")[0].strip(),
                                      "wall_seconds_this_invocation": round(wall, 1), "machine": machine,
                                      "table": table})  # fmt: skip
    print(f"wall time {wall / 60:.1f} min")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
