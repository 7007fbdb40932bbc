"""Run configuration: frozen dataclasses filled from a YAML recipe, strictly.

A recipe has four sections, one per dataclass: ``model``, ``data``, ``optim``, ``train``. Loading is strict: an
unknown or duplicate key, or a value of the wrong type, is an error naming the key, the file and the valid keys.
``--set section.key=value`` overrides are applied to the raw YAML before validation, so they are checked the same
way. Recipes hold no hardware settings: the device and the number of data workers come from command-line flags.

Example:
    >>> cfg = load_recipe("fmnist_slim_mobilenet_v2", overrides=["train.epochs=1"])  # a packaged recipe, or a path
    >>> cfg.optim.lr
    0.2
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ._utils import plain, write_text
from .recipes import resolve_recipe

__all__ = [
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "load_recipe",
    "save_config",
]

DatasetName = Literal["fashion_mnist", "cifar10", "cifar100", "image_folder", "fmnist_scenes", "coco", "mask_folder"]
AugmentName = Literal["crop_flip", "basic", "mobile", "none"]
ScheduleName = Literal["constant", "multistep", "cosine", "linear", "exponential"]
AmpMode = Literal["off", "bf16", "fp16", "auto"]


#: the largest ``train.time_budget_min``: a week (larger numbers overflow the plan's step counts)
MAX_TIME_BUDGET_MIN = 7 * 24 * 60


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ValueError(f"{key}: {msg}")


@dataclass(frozen=True)
class ModelConfig:
    """Which model to build (``slimmable.create_model`` arguments).

    Attributes:
        name: a registered model, e.g. ``slim_mobilenet_v2`` (see ``slimmable.list_models()``).
        widths: the switches to train; ``None`` keeps the model's default widths.
        num_classes: classifier outputs; ``None`` takes the dataset's class count.
        in_chans: input channels; ``None`` takes the dataset's (1 for Fashion-MNIST, 3 otherwise).
        small_input: stride-1 stem for 28x28 / 32x32 images.
        stem_stride: ResNets with ``small_input``: stride of the 3x3 stem (1 or 2); ``None`` keeps the model's
            default (1). Stride 2 costs about a quarter of the MACs.
        drop_rate: dropout before the classifier.
        width_range: ``[lo, hi]`` of a universally slimmable model (``us_*``); ``None`` keeps the model's
            default (official: 0.25-1.0 for MobileNet v1, 0.35-1.0 for v2).
        stat_widths: universally slimmable models: the widths whose BN statistics are stored and calibrated after
            training (and evaluated); ``None`` keeps the model's default (official: every 0.025 of the range).
        channels: path of a channel spec JSON (``slimmable search`` writes them): per-layer channels of a network
            trained from scratch, e.g. a searched one with ``widths: [1.0]``. The spec is read when the model is
            built and saved in the checkpoint's model arguments, so the checkpoint reloads without the file.
        options: further keyword arguments of the model's builder, e.g. a detector's ``num_keypoints``,
            ``slim_heads``, ``frozen_bn`` or torchvision's ``rpn_batch_size_per_image`` (scalars and lists; the
            builder rejects names it does not take).
        weights: ``torchvision/<arch>`` and ``timm/<arch>`` models: a state dict file of the original architecture
            (as ``num_classes``, ``in_chans`` and ``small_input`` build it), read with ``weights_only=True`` and
            loaded strictly before conversion; ``train.teacher: original`` distils from that model. Read again on
            ``--resume`` (the teacher is rebuilt from it).
        sort: ``torchvision/<arch>`` and ``timm/<arch>`` models: reorder each channel group (and attention heads)
            by importance at conversion, ``magnitude`` or ``bn`` (:func:`slimmable.sort_channels`), so that each
            width keeps the most important channels of pretrained ``weights``; ``None`` keeps their order. Not
            recorded in checkpoints (their weights are sorted already).
    """

    name: str = "slim_mobilenet_v2"
    widths: tuple[float, ...] | None = None
    num_classes: int | None = None
    in_chans: int | None = None
    small_input: bool = False
    stem_stride: int | None = None
    drop_rate: float = 0.0
    width_range: tuple[float, float] | None = None
    stat_widths: tuple[float, ...] | None = None
    channels: str | None = None
    options: dict[str, Any] | None = None
    weights: str | None = None
    sort: str | None = None

    def __post_init__(self) -> None:
        _check(bool(self.name), "model.name", "give a registered model name such as slim_mobilenet_v2")
        _check(
            self.weights is None or self.name.startswith(("torchvision/", "timm/")), "model.weights",
            f"is the state dict of an original torchvision/<arch> or timm/<arch> model; {self.name} is slimmable "
            "already (continue its training with --resume, or load a checkpoint)",
        )  # fmt: skip
        _check(
            self.sort is None or self.name.startswith(("torchvision/", "timm/")), "model.sort",
            f"sorts a torchvision/<arch> or timm/<arch> model at conversion; {self.name} is built slimmable (sort "
            "it with slimmable.sort_channels)",
        )  # fmt: skip
        _check(
            self.sort in (None, "magnitude", "bn"), "model.sort",
            "must be magnitude or bn (taylor needs data: call slimmable.sort_channels(model, 'taylor', data=...))",
        )  # fmt: skip
        _check(
            self.channels is None or self.width_range is None, "model.channels",
            "a channel spec fixes every layer's channels; it cannot be combined with model.width_range",
        )  # fmt: skip
        if self.width_range is not None:
            lo, hi = self.width_range
            _check(0 < lo < hi, "model.width_range", f"must be [lo, hi] with 0 < lo < hi, got {list(self.width_range)}")
        if self.stat_widths is not None:
            _check(len(self.stat_widths) > 0, "model.stat_widths", "give at least one width, or null for the default")
            _check(all(w > 0 for w in self.stat_widths), "model.stat_widths", f"must be positive: {self.stat_widths}")
            if self.width_range is not None:
                lo, hi = self.width_range
                out = [w for w in self.stat_widths if not lo <= w <= hi]
                _check(not out, "model.stat_widths", f"{out} are outside model.width_range {list(self.width_range)}")
        if self.widths is not None:
            _check(len(self.widths) > 0, "model.widths", "give at least one width, e.g. [0.25, 0.5, 0.75, 1.0]")
            _check(all(w > 0 for w in self.widths), "model.widths", f"widths must be positive, got {self.widths}")
        _check(self.num_classes is None or self.num_classes >= 1, "model.num_classes", "must be >= 1")
        _check(self.in_chans is None or self.in_chans >= 1, "model.in_chans", "must be >= 1")
        _check(0.0 <= self.drop_rate < 1.0, "model.drop_rate", f"must be in [0, 1), got {self.drop_rate}")


@dataclass(frozen=True)
class DataConfig:
    """Dataset, augmentation and batching.

    Attributes:
        dataset: ``fashion_mnist`` (IDX files), ``cifar10`` / ``cifar100`` (python pickles) or ``image_folder``
            (``root/train/<class>/*``, ``root/val/<class>/*``, e.g. ImageNet); for detectors ``fmnist_scenes``
            (synthetic COCO-format scenes of real Fashion-MNIST items, generated once into the data cache, see
            :mod:`slimmable.data.scenes`) or ``coco`` (COCO-format data: ``root/annotations/instances_{train,val}2017
            .json`` with ``root/{train,val}2017/``, or ``root/{train,test}/annotations.json`` with the images they
            name); for segmenters also ``mask_folder`` (``root/{train,test}/images/`` and ``masks/`` PNGs of class
            indices, see :mod:`slimmable.data.segmentation`). Which task a dataset serves is the model's:
            :mod:`slimmable.tasks`.
        root: the dataset folder. ``None`` is allowed for Fashion-MNIST only (Debian's
            ``/usr/share/datasets/fashion-mnist``, else a torchvision download).
        download: Fashion-MNIST: download with torchvision when no local copy is found.
        image_size: training crop and evaluation size; ``None``: 28 (Fashion-MNIST), 32 (CIFAR), 224 (folders);
            ``fmnist_scenes``: the scenes' side (default 128).
        eval_resize: folders: resize the shorter side to this before the center crop; ``None``: image_size / 0.875.
        augment: ``crop_flip`` (pad + random crop + flip, small images), ``basic`` / ``mobile`` (the official
            ImageNet recipes: random-resized crop from scale 0.08 / 0.25, colour jitter 0.4, PCA lighting 0.1,
            flip), or ``none``.
        crop_scale_min: override the random-resized crop's smallest scale (``basic``/``mobile``).
        crop_padding: ``crop_flip`` padding in pixels.
        hflip: random horizontal flips.
        val_size: images held out from the training set for validation and best-checkpoint selection; 0 selects
            on the test split (ImageNet ``val/``), which is then no longer an unbiased test.
        split_seed: seed of the held-out split (fixed, independent of ``train.seed``).
        batch_size: global batch size, split evenly across processes.
        eval_batch_size: global evaluation batch size; ``None``: ``batch_size``.
        scenes_train, scenes_test: ``fmnist_scenes``: scenes generated from Fashion-MNIST's training / test
            images (the held-out ``val_size`` come out of the training scenes).
    """

    dataset: DatasetName = "fashion_mnist"
    root: str | None = None
    download: bool = True
    image_size: int | None = None
    eval_resize: int | None = None
    augment: AugmentName = "crop_flip"
    crop_scale_min: float | None = None
    crop_padding: int = 4
    hflip: bool = True
    val_size: int = 0
    split_seed: int = 0
    batch_size: int = 128
    eval_batch_size: int | None = None
    scenes_train: int = 2000
    scenes_test: int = 200

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "data.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.eval_batch_size is None or self.eval_batch_size >= 1, "data.eval_batch_size", "must be >= 1")
        _check(self.val_size >= 0, "data.val_size", f"must be >= 0, got {self.val_size}")
        _check(self.image_size is None or self.image_size >= 8, "data.image_size", "must be >= 8 pixels")
        _check(self.crop_padding >= 0, "data.crop_padding", "must be >= 0")
        if self.crop_scale_min is not None:
            _check(0 < self.crop_scale_min <= 1, "data.crop_scale_min", "must be in (0, 1]")
        _check(self.scenes_train >= 1 and self.scenes_test >= 1, "data.scenes_train", "scene counts must be >= 1")
        from .tasks import get_task, tasks_for_dataset  # the tasks say which data they train on

        tasks = [get_task(t) for t in tasks_for_dataset(self.dataset)]
        if tasks and all(self.augment not in t.augmentations for t in tasks):
            raise ValueError(
                f"data.augment: {self.dataset} is {' and '.join(t.name for t in tasks)} data, whose only augmentation "
                f"is data.hflip (boxes, masks and keypoints flip with the image); set data.augment to none (got "
                f"{self.augment!r})"
            )
        if self.dataset != "image_folder" and self.augment in ("basic", "mobile"):
            raise ValueError(
                f"data.augment: {self.augment!r} is the ImageNet random-resized-crop recipe, for "
                f"dataset image_folder; {self.dataset} uses 'crop_flip' or 'none'"
            )


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule (stepped every optimizer step).

    Attributes:
        name: ``sgd`` or ``adamw``.
        lr: peak learning rate (for the global batch size).
        momentum, nesterov: SGD.
        betas, eps: AdamW.
        weight_decay: L2 (SGD) / decoupled (AdamW) weight decay.
        decay_norm_and_bias: also decay BatchNorm weights and all biases (default: not).
        decay_depthwise: decay depthwise convolution weights (the official recipes do not).
        schedule: ``constant``, ``multistep`` (``milestones`` in epochs, factor ``gamma``), ``cosine`` (to
            ``min_lr``), ``linear`` (to ``min_lr``), ``exponential`` (``gamma`` per epoch, the official MobileNets).
        milestones: ``multistep`` epochs.
        gamma: ``multistep`` factor, or ``exponential`` factor per epoch.
        min_lr: final learning rate of ``cosine`` / ``linear``.
        warmup_epochs: linear warm-up from ``lr * warmup_factor`` (fractional epochs allowed).
        warmup_factor: starting fraction of ``lr`` for warm-up.
        grad_clip: clip the global gradient norm to this; ``None``: no clipping.
    """

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-4
    decay_norm_and_bias: bool = False
    decay_depthwise: bool = True
    schedule: ScheduleName = "cosine"
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    warmup_factor: float = 0.0
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.momentum < 1, "optim.momentum", f"must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(self.min_lr >= 0, "optim.min_lr", "must be >= 0")
        _check(self.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
        _check(0 <= self.warmup_factor <= 1, "optim.warmup_factor", "must be in [0, 1]")
        _check(self.gamma > 0, "optim.gamma", "must be > 0")
        _check(self.grad_clip is None or self.grad_clip > 0, "optim.grad_clip", "must be > 0 or null")
        if self.schedule == "multistep":
            _check(len(self.milestones) > 0, "optim.milestones", "schedule multistep needs milestones, e.g. [30, 60]")
        _check(list(self.milestones) == sorted(self.milestones), "optim.milestones", "must be increasing")
        if self.nesterov and self.name == "sgd":
            _check(self.momentum > 0, "optim.nesterov", "Nesterov momentum needs optim.momentum > 0")


@dataclass(frozen=True)
class TrainConfig:
    """The training loop (Algorithm 1 of Yu et al. 2019) and its numerics.

    Attributes:
        epochs: passes over the training set.
        seed: seeds model initialisation, data order and augmentation.
        width_sampler: which widths train on each batch; ``all`` = every switch, widest first (S-Nets);
            ``sandwich`` = the widest and narrowest width of a universally slimmable model's range plus
            ``num_sampled_widths - 2`` random widths in between (US-Nets).
        num_sampled_widths: widths per batch of the ``sandwich`` sampler (official: 4); unused by ``all``.
        per_layer_widths: ``sandwich`` only: each random width is drawn per group of layers (non-uniform widths;
            layers tied by a residual addition share a draw), so training covers the per-layer mixes that
            AutoSlim's search visits. The widest and narrowest samples stay uniform.
        inplace_distill: narrower widths learn the widest width's (detached) predictions instead of the labels.
        calib_batches: universally slimmable models: training batches (without augmentation) used to re-estimate
            the BN statistics of each of the model's ``stat_widths`` after training, before the final evaluation
            and the final ``best.pt`` / ``last.pt``.
        label_smoothing: cross-entropy label smoothing (labels only, not the distillation target).
        amp: autocast: ``auto`` (decided on the machine at start-up: CUDA bf16 where supported, else fp16; CPU bf16
            only with native bf16 instructions, AVX512-BF16 or AMX, and only if a measured probe finds it faster),
            ``off``, ``bf16`` or ``fp16`` (CUDA only, with a gradient scaler). See :mod:`slimmable.hardware`.
            ``false`` means ``off`` (YAML reads an unquoted ``off``, as in ``--set train.amp=off``, as false).
        channels_last: NHWC memory format for model and inputs: ``auto`` (CUDA: with autocast; CPU: never on AVX2,
            elsewhere where the probe measures it faster), ``true`` or ``false``. The choice and its reason are
            printed at start and written to ``hardware.json`` in the run folder; an explicit setting that the probe
            measures much slower gets a warning.
        compile: ``torch.compile`` the model (recompiles once per width).
        deterministic: deterministic algorithms (slower on CUDA).
        sync_bn: synchronise BatchNorm statistics across processes, per switch.
        eval_every: validate every this many epochs (and after the last).
        time_budget_min: size the run to this many minutes of training (validation included): a few steps are
            timed at start-up and the epoch count becomes the most that fit, at most ``epochs`` (at least 1). The
            plan is printed and recorded (``hardware.json``, checkpoints); a resumed run keeps it. At most a week
            (10080 minutes).
        log_interval: steps between TensorBoard scalars.
        log_seconds: seconds between progress lines when no progress bar is shown (the first comes after the
            first step); each gives steps per second and the run's ETA.
        nonfinite: a NaN or infinite training loss ``stop``s the run with an error naming the step and width (the
            last good checkpoint is kept), or ``skip``s the step (no update, BN statistics restored) and counts it in
            ``history.json``.
        teacher: distil every width from a frozen teacher (classification): ``original`` = the unconverted
            ``torchvision/<arch>`` / ``timm/<arch>`` model with ``model.weights``, or the path of a slimmable
            checkpoint (run at its widest width). Rebuilt from the recipe on ``--resume``, never saved in the
            student's checkpoints. ``None``: no teacher.
        teacher_temperature: the softmax temperature ``T`` of the teacher's and each width's logits.
        teacher_weight: ``alpha`` in ``alpha * T^2 * KL(teacher || width) + (1 - alpha) * target loss``, where the
            target loss is the labels' cross-entropy (with in-place distillation, narrower widths: the soft
            cross-entropy with the widest width's predictions); 1.0 distils from the teacher alone.
    """

    epochs: int = 10
    seed: int = 0
    width_sampler: Literal["all", "sandwich"] = "all"
    num_sampled_widths: int = 4
    per_layer_widths: bool = False
    inplace_distill: bool = False
    calib_batches: int = 20
    label_smoothing: float = 0.0
    amp: AmpMode = "auto"
    channels_last: bool | Literal["auto"] = "auto"
    compile: bool = False
    deterministic: bool = False
    sync_bn: bool = False
    eval_every: int = 1
    time_budget_min: float | None = None
    log_interval: int = 50
    log_seconds: float = 30.0
    nonfinite: Literal["stop", "skip"] = "stop"
    teacher: str | None = None
    # T = 4 softens a 10- to 1000-class teacher enough that its ranking of the wrong classes carries signal, the
    # usual choice for CIFAR/ImageNet-scale distillation; alpha = 0.5 weighs the teacher and the labels equally (the
    # T^2 factor keeps the KL term's gradients on the scale of the cross-entropy's)
    teacher_temperature: float = 4.0
    teacher_weight: float = 0.5

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        _check(
            self.teacher is None or bool(self.teacher.strip()), "train.teacher",
            "give 'original' or the path of a slimmable checkpoint, or null for no teacher",
        )  # fmt: skip
        _check(
            self.teacher_temperature > 0, "train.teacher_temperature", f"must be > 0, got {self.teacher_temperature}"
        )
        _check(
            0 < self.teacher_weight <= 1, "train.teacher_weight",
            f"must be in (0, 1] (1: the teacher alone), got {self.teacher_weight}; set train.teacher to null for none",
        )  # fmt: skip
        _check(
            not self.per_layer_widths or self.width_sampler == "sandwich", "train.per_layer_widths",
            "draws the sandwich sampler's random widths per layer; set train.width_sampler: sandwich",
        )  # fmt: skip
        _check(
            self.num_sampled_widths >= 2,
            "train.num_sampled_widths",
            f"must be >= 2 (the widest, the narrowest and n-2 random widths), got {self.num_sampled_widths}",
        )
        _check(self.calib_batches >= 1, "train.calib_batches", f"must be >= 1, got {self.calib_batches}")
        _check(0 <= self.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)")
        _check(self.eval_every >= 1, "train.eval_every", "must be >= 1")
        _check(self.log_interval >= 1, "train.log_interval", "must be >= 1")
        _check(self.log_seconds > 0, "train.log_seconds", f"must be > 0, got {self.log_seconds}")
        _check(
            self.time_budget_min is None or 0 < self.time_budget_min <= MAX_TIME_BUDGET_MIN, "train.time_budget_min",
            f"must be > 0 and at most {MAX_TIME_BUDGET_MIN} minutes (a week) or null, got {self.time_budget_min}",
        )  # fmt: skip


@dataclass(frozen=True)
class RunConfig:
    """A whole training run: the four sections of a recipe."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), as written to ``config.yaml`` and into checkpoints."""
        return plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> RunConfig:
        """Build from a nested dict, strictly.

        Args:
            data: ``{"model": {...}, "data": {...}, "optim": {...}, "train": {...}}``; missing sections and keys
                take their defaults.
            source: where ``data`` came from, used in error messages (a file name).

        Raises:
            ValueError: unknown key, wrong type or invalid value; the message names the key, ``source`` and the
                valid keys.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: a recipe is a mapping of sections {_SECTION_NAMES}, got {type(data).__name__}")
        kwargs = {}
        for key, value in data.items():
            if key not in _SECTIONS:
                hint = _suggest(key, _SECTIONS)
                raise ValueError(f"{source}: unknown section {key!r}{hint}; valid sections: {_SECTION_NAMES}")
            if value is None:
                value = {}
            kwargs[key] = _build(_SECTIONS[key], value, key, source)
        return cls(**kwargs)


_SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig}
_SECTION_NAMES = ", ".join(_SECTIONS)


def _suggest(key: str, valid: Sequence[str]) -> str:
    near = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _build(cls: type, values: Any, section: str, source: str) -> Any:
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(values, Mapping):
        raise ValueError(f"{source}: section {section!r} must be a mapping of keys {', '.join(names)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        where = f"{section}.{key}"
        if key not in names:
            raise ValueError(
                f"{source}: unknown key {where!r}{_suggest(str(key), names)}; valid keys in {section}: "
                f"{', '.join(names)}"
            )
        try:
            kwargs[key] = _coerce(value, hints[key], where)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from err
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from err


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        inner = _type_name(args[0])
        return f"a list of {inner}" if len(args) == 2 and args[1] is Ellipsis else f"a list of {len(args)} {inner}"
    if tp is type(None):
        return "null"
    if tp is bool:
        return "true or false"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats, lists for tuples."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except (TypeError, ValueError):
                continue
        raise TypeError(f"{where} must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value is False and "off" in allowed:  # YAML 1.1 reads an unquoted off (train.amp=off) as false
            return "off"
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise ValueError(f"{where} must be {_type_name(tp)}, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where} must be {_type_name(tp)}, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{where} must be {_type_name(tp)}, got {len(value)} values {list(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):  # .inf / .nan: a hyper-parameter that trains to NaN
            raise ValueError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if origin is dict:  # plain keyword arguments (model.options): string keys, YAML scalars and lists as values
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise TypeError(f"{where} must be a mapping of names to values, got {value!r}")
        return {k: plain(v) for k, v in value.items()}
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported annotation {tp!r}")  # internal: a field type this loader lacks


class _DuplicateKeyError(yaml.YAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys in a mapping (plain YAML keeps the last one silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise _DuplicateKeyError(f"duplicate key {key!r} at line {line} (first at line {seen[key]})")
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path) -> Any:
    if not path.exists():
        raise FileNotFoundError(f"recipe {path} does not exist; `slimmable list` shows the packaged recipes")
    try:
        return yaml.load(path.read_text(), Loader=_StrictLoader)  # a SafeLoader subclass
    except _DuplicateKeyError as err:
        raise ValueError(f"{path}: {err}; keep one (YAML would silently use the last)") from err
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from err


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str], source: str = "--set") -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw recipe dict (values are parsed as YAML scalars/lists).

    Raises:
        ValueError: malformed override, or a section/key that does not exist (the message lists valid keys).
    """
    out: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"{source} {item!r}: expected section.key=value, e.g. train.epochs=5")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"{source} {item!r}: the key must be section.key with a section of {_SECTION_NAMES}")
        section, key = parts
        if section not in _SECTIONS:
            raise ValueError(
                f"{source} {item!r}: unknown section {section!r}{_suggest(section, _SECTIONS)}; valid: {_SECTION_NAMES}"
            )
        names = [f.name for f in dataclasses.fields(_SECTIONS[section])]
        if key not in names:
            raise ValueError(
                f"{source} {item!r}: unknown key {dotted!r}{_suggest(key, names)}; valid keys in {section}: "
                f"{', '.join(names)}"
            )
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise ValueError(f"{source} {item!r}: the value is not valid YAML ({err})") from err
        sec = out.get(section)
        out[section] = dict(sec) if isinstance(sec, Mapping) else {}
        out[section][key] = value
    return out


def load_recipe(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> RunConfig:
    """Load a YAML recipe strictly, applying ``section.key=value`` overrides first.

    Args:
        path: a recipe file, or the name of a packaged recipe (``fmnist_slim_resnet18``); an existing file wins
            (see :func:`slimmable.recipes.resolve_recipe`).
        overrides: e.g. ``["train.epochs=5", "optim.lr=0.05", "model.widths=[0.5,1.0]"]``.

    Returns:
        The validated :class:`RunConfig`.

    Raises:
        FileNotFoundError: no file at ``path`` and no packaged recipe of that name (the message lists them).
        ValueError: invalid YAML, duplicate or unknown key, wrong type or value; the message names the key, the
            file and the valid keys.
    """
    p = resolve_recipe(path)
    raw = _read_yaml(p)
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{p}: a recipe is a mapping of sections {_SECTION_NAMES}, got {type(raw).__name__}")
    source = str(p) if not overrides else f"{p} (with --set {' '.join(overrides)})"
    return RunConfig.from_dict(apply_overrides(raw, overrides), source=source)


def save_config(config: RunConfig, path: str | os.PathLike[str]) -> Path:
    """Write the resolved config as YAML (atomically: temporary file, then rename); ``load_recipe`` reads it back."""
    return write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
