"""Cost of a slimmable model at a width: MACs (``torch.utils.flop_counter``), active parameters, latency.

MACs are FLOPs / 2 as counted by ``FlopCounterMode`` (convolutions, linear layers and matrix products); this
is the convention of the official tables' ``flop_counter`` column. Active parameters count only the weights a
forward pass at the current width actually uses (the official profiler reports the full count at every width):
each slimmable layer reports its own (:meth:`slimmable.nn.SlimModule.active_params`), other layers count their
parameters.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .._utils import example_input
from ..nn import get_widths, slim_modules, use_width

__all__ = ["WidthProfile", "count_active_params", "count_macs", "measure_latency", "profile_widths"]


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
def count_macs(model: nn.Module, x: torch.Tensor, eval_mode: bool = True) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on ``x`` at its current width (FLOPs / 2).

    Args:
        model: the model, at the width to count.
        x: an input batch.
        eval_mode: run in eval mode (restored after); ``False`` keeps the modes as they are (channel search
            normalises universally slimmable layers with batch statistics).

    Returns:
        MACs for the whole batch ``x``.
    """
    with _maybe_eval(model, eval_mode), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


@torch.no_grad()
def count_active_params(model: nn.Module, x: torch.Tensor, eval_mode: bool = True) -> int:
    """Learnable parameters used by a forward pass at the current width (other switches' BNs excluded).

    ``x`` is an input batch (only its first two images are used); ``eval_mode`` as in :func:`count_macs`.
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
def measure_latency(
    model: nn.Module, x: torch.Tensor, runs: int = 30, warmup: int = 5, eval_mode: bool = True
) -> float:
    """Median wall time of one forward pass on ``x`` (eval mode unless ``eval_mode=False``), in milliseconds."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
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
    """Cost of one width: MACs and active parameters per image, latency at ``batch_size``."""

    width: float
    macs: int
    params: int
    latency_ms: float | None
    batch_size: int

    def to_dict(self) -> dict:
        return asdict(self)


def profile_widths(
    model: nn.Module,
    input_size: int | Sequence[int] = 224,
    widths: Sequence[float] | None = None,
    batch_size: int = 1,
    latency_runs: int = 30,
) -> list[WidthProfile]:
    """Profile ``model`` at each width: MACs, active parameters, and (if ``latency_runs`` > 0) latency.

    Args:
        model: a slimmable model (its width is restored afterwards).
        input_size: image side (square, the model's input channels) or a full ``(C, H, W)``.
        widths: widths to profile; default the model's switches (for a US model: its stored-statistics widths).
        batch_size: batch size for the latency measurement (MACs and params are per image).
        latency_runs: timed runs per width; 0 skips latency.

    Returns:
        One :class:`WidthProfile` per width, in the order given.
    """
    if widths is None:
        widths = get_widths(model).switches
    x1 = example_input(model, input_size, 1, seed=None)
    xb = example_input(model, input_size, batch_size, seed=None)
    out = []
    for w in widths:
        with use_width(model, w):
            macs = count_macs(model, x1)
            params = count_active_params(model, x1)
            lat = measure_latency(model, xb, runs=latency_runs) if latency_runs > 0 else None
        out.append(WidthProfile(float(w), int(macs), int(params), lat, batch_size))
    return out
