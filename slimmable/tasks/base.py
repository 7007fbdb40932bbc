"""The :class:`Task` protocol: everything that differs between classification, detection and segmentation.

A task is the one seam where a new kind of model plugs in. Training (:mod:`slimmable.train.run`), evaluation,
calibration, the latency runtime, the server, export and profiling ask a model's task (:func:`slimmable.tasks.
task_of`) instead of checking model types. A new task subclasses :class:`Task`, overrides what differs, and
registers itself with :func:`slimmable.tasks.register_task`.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._utils import input_shape

__all__ = [
    "COST_HEADERS",
    "Inputs",
    "Objective",
    "Task",
    "cost_cells",
    "mean_metric",
    "model_kwargs_from_config",
    "with_options",
]

#: an input batch: ``(N, C, H, W)``, or for a detector a list of ``(C, H, W)`` images
Inputs = torch.Tensor | Sequence[torch.Tensor]


class Objective:
    """The task side of a training step. Subclasses implement :meth:`width_loss` and, for batches that are not
    ``(images tensor, targets tensor)``, :meth:`to_device` and :meth:`batch_size`."""

    #: whether :meth:`width_loss`'s second result counts correct predictions (training top-1 is reported)
    counts_correct: bool = True

    def begin_step(self) -> None:
        """Called before the first width of each step (resets per-step state such as a distillation teacher)."""

    def set_teacher(self, teacher: nn.Module, temperature: float, weight: float) -> None:
        """Distil every width from ``teacher`` (``train.teacher``); objectives that cannot refuse.

        Args:
            teacher: a frozen model in eval mode on the training device, taking the same inputs.
            temperature: the softmax temperature of the distillation.
            weight: the distillation term's share of the loss, in (0, 1].

        Raises:
            ValueError: this objective has no distillation from a teacher.
        """
        raise ValueError(
            f"train.teacher: {type(self).__name__} has no distillation from a teacher (classification only); set "
            "train.teacher to null"
        )

    def width_loss(
        self, forward: Callable[..., Any], images: Any, targets: Any, index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward at the current width and the loss to backpropagate.

        Args:
            forward: the model (or its DDP / compiled wrapper) at the width being trained.
            images, targets: the batch, on the device.
            index: the width's position in the step (0: the first, widest).

        Returns:
            ``(loss, correct)``: a scalar loss, and the number of correct predictions (a scalar tensor; zero when
            the task counts none).
        """
        raise NotImplementedError

    def to_device(self, images: Any, targets: Any, device: torch.device, channels_last: bool) -> tuple[Any, Any]:
        """Move a batch to ``device`` (NHWC images when ``channels_last``)."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return images.to(device, non_blocking=True, memory_format=fmt), targets.to(device, non_blocking=True)

    def batch_size(self, targets: Any) -> int:
        """Images in a batch."""
        return int(targets.shape[0])


class Task:
    """The task side of a model (see the module docstring). Subclasses set :attr:`name`, :attr:`metric` and
    :attr:`datasets` and override the methods that differ; the defaults fit a model that takes ``(N, C, H, W)``
    tensors of one size."""

    #: the registry tag of the task's models (``create_model`` records it on every model it builds)
    name: str = ""
    #: the validation metric: rows carry it per width; a run selects its best checkpoint by its mean over widths
    metric: str = ""
    #: how logs name :attr:`metric` (``top-1``, ``box AP``)
    metric_label: str = ""
    #: a key that every report row of this task carries (identifies the task of a saved report)
    row_key: str = ""
    #: the ``data.dataset`` names this task trains on
    datasets: tuple[str, ...] = ()
    #: the ``data.augment`` settings its data takes (detection and segmentation data flip with ``data.hflip`` only)
    augmentations: tuple[str, ...] = ("none",)
    #: the model resizes what it is given to a side of its own (:meth:`default_input_size`): profiles and latency
    #: tables use that side, and an input size option would not change what it computes
    resizes_inputs: bool = False
    #: the answer's list field in the server's JSON (``predictions``, ``detections``, ``masks``)
    answer_field: str = "predictions"

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # -- identifying models that were not built by create_model ---------------------------------------------------

    def claims(self, model: nn.Module) -> bool:
        """Whether a model without a recorded task is one of this task's (e.g. a torchvision detector)."""
        return False

    # -- training ---------------------------------------------------------------------------------------------------

    def load_data(self, cfg: Any, cache_dir: str | os.PathLike[str] | None, load_train: bool = True) -> Any:
        """The recipe's data (``cfg.data``): an object with ``train``, ``val``, ``test``, ``num_classes``,
        ``in_chans``, ``image_size``, ``name`` and ``root``. ``load_train=False``: evaluation only (the training
        images are not read; ``val`` still exists when ``data.val_size`` holds images out)."""
        raise NotImplementedError

    def model_kwargs(self, cfg: Any, data: Any) -> dict[str, Any]:
        """The ``create_model`` keyword arguments (``None`` model fields take the data's values)."""
        raise NotImplementedError

    def check_model(self, model: nn.Module, data: Any) -> None:
        """Raise ``ValueError`` (naming the fix) when a trained model cannot be evaluated on ``data``."""

    def objective(self, cfg: Any) -> Objective:
        """The training objective: what one width of an Algorithm-1 step computes."""
        raise NotImplementedError

    def collate_fn(self) -> Callable[..., Any] | None:
        """How the loaders batch items (``None``: stacked tensors)."""
        return None

    def probe_batches(self, data: Any, num_classes: int) -> Callable[[int, torch.Generator], tuple[Any, Any]]:
        """``make_batch(n, generator)`` for the start-up probe of the training step."""
        raise NotImplementedError

    def auto_channels_last(self, setting: bool | str) -> bool | str:
        """The ``channels_last`` setting handed to the numerics decision."""
        return setting

    def validate(
        self, model: nn.Module, dataset: Any, loader: Any, widths: Sequence[float], **numerics: Any
    ) -> list[dict[str, Any]]:
        """One row per width with :attr:`metric` (and more), in eval mode."""
        raise NotImplementedError

    def describe(self, rows: Sequence[Mapping[str, Any]]) -> str:
        """The validation rows in one log line."""
        return " ".join(f"{r['width']:g}:{r[self.metric]:.2f}" for r in rows)

    def report(self, model: nn.Module, rows: list[dict[str, Any]], data: Any, latency_runs: int) -> list[dict]:
        """The test rows with each width's cost (MACs, parameters, latency), with :meth:`columns`."""
        raise NotImplementedError

    def columns(self, rows: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
        """The columns of a report made of ``rows``."""
        raise NotImplementedError

    def table(self, rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[tuple]]:
        """A report's rows as a printed table: headers and one tuple of cells per width."""
        raise NotImplementedError

    # -- inputs -----------------------------------------------------------------------------------------------------

    def default_input_size(self, model: nn.Module) -> int:
        """The square side a model is profiled and calibrated at when none is given."""
        return 224

    def example_inputs(
        self, model: nn.Module, shape: Sequence[int], batch_size: int = 1, seed: int | None = 0
    ) -> Inputs:
        """A random input batch of ``batch_size`` items of ``shape`` ``(C, H, W)`` on the model's device and
        dtype (a local generator seeded with ``seed``; ``None``: the global RNG)."""
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        return torch.randn((batch_size, *shape), generator=gen).to(device=device, dtype=dtype)

    def check_inputs(
        self, x: Any, shape: Sequence[int], device: torch.device, dtype: torch.dtype
    ) -> tuple[Inputs, int]:
        """Validate a batch for a model calibrated at ``shape`` ``(C, H, W)``; return it on ``device``/``dtype``
        with its batch size.

        Raises:
            TypeError, ValueError: the message names what the model takes.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor (N, C, H, W), got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"input must be a floating-point tensor, got dtype {x.dtype}; convert it with x.float()")
        c, h, w = shape
        if x.dim() != 4 or tuple(x.shape[1:]) != tuple(shape) or x.shape[0] < 1:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not fit: this runner takes (N, {c}, {h}, {w}) with N >= 1; "
                "resize the image to the calibrated input size (or build the runner with that input_size)"
            )
        return x.to(device=device, dtype=dtype), int(x.shape[0])

    def batch_size(self, x: Inputs) -> int:
        """The number of items in an input batch."""
        return len(x) if not isinstance(x, torch.Tensor) else int(x.shape[0])

    def join_inputs(self, inputs: Sequence[Inputs]) -> Inputs:
        """Several checked input batches (:meth:`check_inputs`) as one, for one forward pass over them all
        (a server batching requests): tensors concatenated along the batch, lists of images chained."""
        if all(isinstance(x, torch.Tensor) for x in inputs):
            return torch.cat(list(inputs))
        return [img for x in inputs for img in x]

    def split_outputs(self, output: Any, sizes: Sequence[int]) -> list[Any]:
        """The output of a joined batch (:meth:`join_inputs`) split back into one output per input batch of
        ``sizes`` items, each as the model gives it for that batch alone: tensors are split along the batch,
        mappings key by key, lists (one entry per item, as a detector's) into consecutive runs."""
        return _split_batch(output, list(sizes))

    # -- profiling --------------------------------------------------------------------------------------------------

    def profile_parts(self, model: nn.Module) -> tuple[str, ...] | None:
        """The submodules whose MACs a profile reports separately (``None``: the total only)."""
        return None

    def part_label(self, part: str) -> str:
        """A profile table's column header for one of :meth:`profile_parts`."""
        return part

    def profile_caption(self, model: nn.Module, side: int | None) -> str:
        """What a profile table measured, after the model name (e.g. ``on one 128x128 image, ...``)."""
        return f"at {side}x{side}"

    def profile_inputs(
        self, model: nn.Module, input_size: int | Sequence[int] | None, batch_size: int
    ) -> tuple[Inputs, int | None]:
        """The input a profile times and counts (random, seeded), and the side the model computes at when it
        resizes what it is given (``None``: the input's)."""
        size = self.default_input_size(model) if input_size is None else input_size
        return self.example_inputs(model, input_shape(model, size), batch_size, seed=None), None

    def profiling(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        """A context in which profiling measures the model's worst case (detectors: heads at capacity)."""
        return contextlib.nullcontext()

    # -- serving ----------------------------------------------------------------------------------------------------

    def request_options(self, params: Mapping[str, Any], number: Callable[..., float | None]) -> dict[str, Any]:
        """The task's own request parameters (``number(params, key, zero=...)`` parses one), checked."""
        return {"top_k": number(params, "top_k")}

    def decode_tensor(self, obj: Any, shape: Sequence[int], max_batch: int, max_pixels: int) -> Inputs:
        """A JSON ``tensor`` field as the model's input."""
        from ..serve._decode import decode_tensor

        return decode_tensor(obj, shape, max_batch)

    def decode_image(self, data: bytes, shape: Sequence[int], preprocess: Mapping[str, Any]) -> torch.Tensor:
        """An encoded image as the model's input (``preprocess``: ``mean``, ``std``, ``resize``)."""
        from ..serve._decode import decode_image

        return decode_image(data, shape, preprocess["mean"], preprocess["std"], preprocess["resize"])

    def answer(self, output: Any, options: Mapping[str, Any], labels: Sequence[str] | None, top_k: int) -> list:
        """The JSON answer's :attr:`answer_field` list: one entry per input item."""
        raise NotImplementedError

    def v2_outputs(self, model: nn.Module, output: Any) -> list[tuple[str, str, torch.Tensor]]:
        """The model's output as the named tensors of the Open Inference Protocol (KServe V2, Triton HTTP):
        ``(name, datatype, tensor)`` each, the batch first, ``datatype`` a V2 name (``FP32``, ``INT64``, ...; see
        :data:`slimmable.serve.v2.DATATYPES`). Default: the output itself, named ``output_names(model)[0]`` (a
        classifier's ``logits`` ``(N, num_classes)``).

        Args:
            model: the dense copy that ran.
            output: what it returned for a batch.

        Raises:
            slimmable.serve.BadRequest: the task's models are not served over V2 (the server answers its status).
        """
        return [(self.output_names(model)[0], "FP32", output)]

    # -- export -----------------------------------------------------------------------------------------------------

    def output_names(self, model: nn.Module) -> list[str]:
        """The names of an exported graph's outputs."""
        return ["logits"]

    def export_module(self, dense: nn.Module) -> nn.Module:
        """The module an export writes, from a model's dense form: a tensor in, a tensor out (default: the dense
        model itself). A task whose models return a dict picks the output that deployment needs."""
        return dense


def cost_cells(row: Mapping[str, Any]) -> tuple[str, str, str]:
    """A report row's MACs (M), parameters (M) and latency (ms) cells (``-``: not measured)."""
    return (
        "-" if row.get("macs") is None else f"{row['macs'] / 1e6:.2f}",
        "-" if row.get("params") is None else f"{row['params'] / 1e6:.3f}",
        "-" if row.get("latency_ms") is None else f"{row['latency_ms']:.2f}",
    )


#: the cost columns' headers of a printed report
COST_HEADERS = ["MACs (M)", "params (M)", "latency b1 (ms)"]


def model_kwargs_from_config(cfg: Any, num_classes: int, in_chans: int) -> dict[str, Any]:
    """The ``create_model`` keyword arguments of a run (``None`` model fields take the dataset's values)."""
    mc = cfg.model
    kwargs: dict[str, Any] = {
        "num_classes": mc.num_classes or num_classes,
        "in_chans": mc.in_chans or in_chans,
        "small_input": mc.small_input,
        "drop_rate": mc.drop_rate,
    }
    if mc.stem_stride is not None:
        kwargs["stem_stride"] = mc.stem_stride
    if mc.widths is not None:
        kwargs["widths"] = tuple(mc.widths)
    if mc.width_range is not None:
        kwargs["width_range"] = tuple(mc.width_range)
    if mc.stat_widths is not None:
        kwargs["stat_widths"] = tuple(mc.stat_widths)
    if mc.weights is not None:  # the original's state dict, loaded before conversion (not recorded in checkpoints)
        kwargs["weights"] = mc.weights
    if mc.sort is not None:  # at conversion (not recorded either: a checkpoint's weights are sorted already)
        kwargs["sort"] = mc.sort
    if mc.channels is not None:
        from ..search.autoslim import load_channel_spec

        kwargs["channels"] = load_channel_spec(mc.channels)
    return with_options(kwargs, mc.options)


def with_options(kwargs: dict[str, Any], options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``kwargs`` plus ``model.options``, which may not repeat a key the recipe sets elsewhere."""
    clash = sorted(set(options or {}) & set(kwargs))
    if clash:
        raise ValueError(f"model.options repeats {clash}: set them as model.{clash[0]} instead")
    return {**kwargs, **(options or {})}


def mean_metric(rows: Sequence[Mapping[str, Any]], metric: str) -> float:
    """The mean of ``metric`` over the rows (widths); NaN for none."""
    return sum(float(r[metric]) for r in rows) / len(rows) if rows else math.nan


def _split_batch(output: Any, sizes: list[int]) -> list[Any]:
    """``output`` of a batch of ``sum(sizes)`` items as one output per run of ``sizes`` items (see
    :meth:`Task.split_outputs`)."""
    if isinstance(output, torch.Tensor):
        return list(output.split(sizes))
    if isinstance(output, Mapping):
        parts = {key: _split_batch(value, sizes) for key, value in output.items()}
        return [type(output)((key, parts[key][i]) for key in output) for i in range(len(sizes))]
    if isinstance(output, (list, tuple)) and len(output) == sum(sizes):
        ends = [sum(sizes[: i + 1]) for i in range(len(sizes))]
        return [list(output[end - n : end]) for n, end in zip(sizes, ends)]
    raise TypeError(
        f"cannot split a model output of type {type(output).__name__} into batches of {sizes}; the task must "
        "override split_outputs (or serve without batching requests)"
    )
