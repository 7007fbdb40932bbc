"""Cost of a slimmable model at a width: MACs (``torch.utils.flop_counter``), active parameters, latency.

MACs are FLOPs / 2 as counted by ``FlopCounterMode`` (convolutions, linear layers and matrix products); this
is the convention of the official tables' ``flop_counter`` column. Attention counts its two products (``QK^T`` and
``AV``) on every device: PyTorch's counter has formulas for the CUDA attention kernels only, so the CPU kernel
that ``F.scaled_dot_product_attention`` (and ``nn.MultiheadAttention``'s fast path) runs gets the same formula here.
Active parameters count only the weights a forward pass at the current width actually uses (the official profiler
reports the full count at every width): each slimmable layer reports its own
(:meth:`slimmable.nn.SlimModule.active_params`), other layers count their parameters.

Detectors (torchvision's R-CNN models, :mod:`slimmable.models.detection`) take a list of ``(C, H, W)`` images;
every function here accepts such a list where it takes an input batch. :func:`detector_images` builds one at the
size the detector's transform resizes to (so the count is the detector's real cost), and
:func:`count_macs_by_part` splits the MACs of one forward pass by submodule (backbone, FPN, RPN, RoI heads). The
heads' MACs depend on the number of proposals and detections, and so on the weights and the image; so
:func:`profile_widths` counts with the heads at capacity (:func:`heads_at_capacity`).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .._utils import unwrap_model
from ..nn import get_widths, slim_modules, use_width
from ..tasks import Inputs, task_of
from ..tasks.detection import DETECTOR_PARTS, detector_image_size, detector_images, heads_at_capacity

__all__ = [
    "DETECTOR_PARTS",
    "WidthProfile",
    "count_active_params",
    "count_macs",
    "count_macs_by_part",
    "detector_image_size",
    "detector_images",
    "heads_at_capacity",
    "measure_latency",
    "profile_widths",
]


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of scaled dot-product attention: ``QK^T`` and ``AV``, each ``2 * N * heads * L_q * L_k * head_dim``
    (grouped key/value heads are broadcast to the query heads, so the query heads count)."""
    n, heads, lq, d = query_shape
    lk, dv = key_shape[-2], value_shape[-1]
    return 2 * n * heads * lq * lk * (d + dv)


#: kernels ``FlopCounterMode`` has no formula for (PyTorch counts the CUDA attention kernels only)
_EXTRA_FLOP_FORMULAS = {
    getattr(torch.ops.aten, op): _sdpa_flops
    for op in ("_scaled_dot_product_flash_attention_for_cpu",)
    if hasattr(torch.ops.aten, op)
}


def _flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts the CPU attention kernel."""
    return FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)


def _is_cuda(x: Inputs) -> bool:
    return (x if isinstance(x, torch.Tensor) else x[0]).is_cuda


@contextlib.contextmanager
def _maybe_eval(model: nn.Module, eval_mode: bool) -> Iterator[None]:
    was_training = model.training
    if eval_mode:
        model.eval()
    try:
        yield
    finally:
        if eval_mode:
            model.train(was_training)


@torch.no_grad()
def count_macs(model: nn.Module, x: Inputs, eval_mode: bool = True) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on ``x`` at its current width (FLOPs / 2).

    Args:
        model: the model, at the width to count.
        x: an input batch (a detector: a list of images).
        eval_mode: run in eval mode (restored after); ``False`` keeps the modes as they are (channel search
            normalises universally slimmable layers with batch statistics).

    Returns:
        MACs for the whole batch ``x``.
    """
    with _maybe_eval(model, eval_mode), _flop_counter() as counter:
        model(x)
    return counter.get_total_flops() // 2


@torch.no_grad()
def count_macs_by_part(
    model: nn.Module, x: Inputs, parts: Sequence[str] | None = None, eval_mode: bool = True
) -> dict[str, int]:
    """MACs of one forward pass of ``model`` on ``x``, split by submodule.

    Args:
        model: the model, at the width to count.
        x: an input batch (a detector: a list of images).
        parts: qualified submodule names (``model.get_submodule`` names); default :data:`DETECTOR_PARTS` for a
            detector.
        eval_mode: as in :func:`count_macs`.

    Returns:
        ``{part: MACs}`` for each part, plus ``"total"`` (everything, including what no part covers).

    Raises:
        ValueError: a part is not a submodule of ``model``, or no default parts exist for this model.
    """
    model = unwrap_model(model)
    if parts is None:
        parts = task_of(model).profile_parts(model)
        if parts is None:
            raise ValueError(f"{type(model).__name__} has no default parts; pass parts=['features', ...]")
    for name in parts:
        try:
            model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"{name!r} is not a submodule of {type(model).__name__}: {err}") from err
    with _maybe_eval(model, eval_mode), _flop_counter() as counter:
        model(x)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    out = {name: _subtree_flops(counts, f"{root}.{name}") // 2 for name in parts}
    out["total"] = counter.get_total_flops() // 2
    return out


def _subtree_flops(counts: Mapping[str, Mapping[object, int]], key: str) -> int:
    """FLOPs under the module ``key``: its own count when it was called, else the sum over its outermost called
    descendants (a slimmable backbone runs its stages without calling itself; FlopCounterMode counts a FLOP at
    every called module above it, so only the outermost ones are summed)."""
    if key in counts:
        return sum(counts[key].values())
    total = 0
    for k, per_op in counts.items():
        if not k.startswith(key + "."):
            continue
        rest = k[len(key) + 1 :].split(".")
        if not any(f"{key}.{'.'.join(rest[:i])}" in counts for i in range(1, len(rest))):
            total += sum(per_op.values())
    return total


@torch.no_grad()
def count_active_params(model: nn.Module, x: Inputs, eval_mode: bool = True) -> int:
    """Learnable parameters used by a forward pass at the current width (other switches' BNs excluded).

    ``x`` is an input batch or a detector's list of images (only the first two are used); ``eval_mode`` as in
    :func:`count_macs`.
    """
    total = 0
    seen: set[int] = set()

    def slim_hook(module: nn.Module, inputs: tuple) -> None:
        nonlocal total
        if id(module) not in seen:  # a module called twice (shared) counts once
            seen.add(id(module))
            total += module.active_params(int(inputs[0].shape[module.channel_dim]))

    def plain_hook(module: nn.Module, inputs: tuple) -> None:
        nonlocal total
        if id(module) not in seen:
            seen.add(id(module))
            total += sum(p.numel() for p in module.parameters(recurse=False))

    # A slimmable layer speaks for everything inside it (a switchable BN's switches run without a module call).
    slim = [m for _, m in slim_modules(model, outermost=True)]
    inside = {id(c) for m in slim for c in m.modules()}
    plain = [m for m in model.modules() if id(m) not in inside and any(True for _ in m.parameters(recurse=False))]
    handles = [m.register_forward_pre_hook(slim_hook) for m in slim]
    handles += [m.register_forward_pre_hook(plain_hook) for m in plain]
    try:
        with _maybe_eval(model, eval_mode):
            model(x[:2])
    finally:
        for h in handles:
            h.remove()
    return total


@torch.no_grad()
def measure_latency(model: nn.Module, x: Inputs, runs: int = 30, warmup: int = 5, eval_mode: bool = True) -> float:
    """Median wall time of one forward pass on ``x`` (eval mode unless ``eval_mode=False``), in milliseconds."""
    sync = torch.cuda.synchronize if _is_cuda(x) else (lambda: None)
    with _maybe_eval(model, eval_mode):
        for _ in range(warmup):
            model(x)
        sync()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            model(x)
            sync()
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


@dataclass(frozen=True)
class WidthProfile:
    """Cost of one width: MACs and active parameters per image, latency at ``batch_size``.

    ``parts`` (detectors only): MACs per image of each of :data:`DETECTOR_PARTS`, and the input side profiled.
    """

    width: float
    macs: int
    params: int
    latency_ms: float | None
    batch_size: int
    parts: Mapping[str, int] | None = field(default=None)
    input_size: int | None = field(default=None)

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("parts", "input_size"):  # classification profiles keep their keys
            if d[key] is None:
                del d[key]
        return d


def profile_widths(
    model: nn.Module,
    input_size: int | Sequence[int] | None = None,
    widths: Sequence[float] | None = None,
    batch_size: int = 1,
    latency_runs: int = 30,
) -> list[WidthProfile]:
    """Profile ``model`` at each width: MACs, active parameters, and (if ``latency_runs`` > 0) latency.

    Args:
        model: a slimmable model (its width is restored afterwards), or a slimmable detector.
        input_size: image side (square, the model's input channels) or a full ``(C, H, W)``; default 224, for a
            detector the side its transform resizes to (:func:`detector_image_size`). A detector resizes every
            square image to that side, so to profile it at another size build it with ``min_size=max_size=S``.
        widths: widths to profile; default the model's switches (for a US model: its stored-statistics widths).
        batch_size: batch size for the latency measurement (MACs and params are per image).
        latency_runs: timed runs per width; 0 skips latency.

    Returns:
        One :class:`WidthProfile` per width, in the order given; a detector's carries MACs per part.

    A detector is profiled with its RoI heads at capacity: its score threshold is set to 0 for the duration, so
    every width keeps ``box_detections_per_img`` detections and runs its mask or keypoint head on all of them.
    Otherwise the heads' cost would follow what the random image happens to make the weights detect (a trained
    detector finds little in noise, and each width finds a different amount).
    """
    if widths is None:
        widths = get_widths(model).switches
    task = task_of(model)
    xb, size = task.profile_inputs(model, input_size, batch_size)
    x1 = xb[:1]
    counted = task.profile_parts(model) is not None
    out = []
    for w in widths:
        with use_width(model, w), task.profiling(model):
            parts = count_macs_by_part(model, x1) if counted else None
            macs = parts.pop("total") if parts is not None else count_macs(model, x1)
            params = count_active_params(model, x1)
            lat = measure_latency(model, xb, runs=latency_runs) if latency_runs > 0 else None
        out.append(WidthProfile(float(w), int(macs), int(params), lat, batch_size, parts, size))
    return out
