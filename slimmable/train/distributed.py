"""Processes and devices: ``torchrun`` set-up, DDP wrapping, BatchNorm synchronisation across processes.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every process trains a shard of each batch with
``DistributedDataParallel``. Algorithm 1 runs one forward/backward per width before a single optimizer step; the
backward passes of all but the last width run under ``no_sync()``, so gradients are all-reduced once per step,
by the last backward. Each width uses its own switchable-BN parameters, so DDP is built with
``find_unused_parameters=True``: parameters unused by the last width but used by an earlier one keep their
locally accumulated gradient in the reduction (checked by the 2-process test against a single process).
"""

from __future__ import annotations

import gc
import inspect
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..nn import USBatchNorm2d

__all__ = [
    "DistInfo",
    "SyncBatchNorm2d",
    "average_bn_statistics",
    "convert_sync_batchnorm",
    "init_distributed",
    "resolve_device",
    "shutdown_distributed",
    "wrap_ddp",
]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, writes checkpoints and TensorBoard."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str | None = None, local_rank: int = 0) -> torch.device:
    """``name`` (``cpu``, ``cuda``, ``cuda:1``, ...), or CUDA when available, else CPU.

    Raises:
        ValueError: CUDA asked for but not available, or a malformed name.
    """
    if name is None or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device {name!r} is not a device name such as cpu, cuda or cuda:1") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, or run as a single process.

    The backend is NCCL for CUDA devices and Gloo otherwise. Each process uses ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend)
        _logger.debug("process %d of %d on %s", rank, world, dev)
    return DistInfo(rank, world, local_rank, dev)


def shutdown_distributed() -> None:
    """Leave the process group and join its worker threads while the interpreter is still fully alive.

    ``destroy_process_group`` only drops the registry's reference: the group (and Gloo's worker threads) lives
    on while anything else refers to it, e.g. a ``DistributedDataParallel`` wrapper caught in a reference cycle.
    Such a group is then freed during interpreter shutdown, where a worker thread that releases the last reference
    to a finished collective's tensors cannot take the GIL and the process aborts ("terminate called without an
    active exception"; measured on about one run in six). Collecting the cycles here frees the group now, and its
    destructor joins the threads (PyTorch releases the GIL for it).
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel`` for Algorithm 1: unused parameters allowed, buffers not re-broadcast per forward.

    BatchNorm statistics stay per process during an epoch (or are synchronised by :class:`SyncBatchNorm2d`) and are
    averaged by :func:`average_bn_statistics` at the end of the epoch.
    """
    kwargs: dict = {"find_unused_parameters": True}
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" in params:
        kwargs["forward_sync_buffers"] = False
    else:
        kwargs["broadcast_buffers"] = False
    if info.device.type == "cuda":
        kwargs["device_ids"] = [info.device.index]
    return nn.parallel.DistributedDataParallel(model, **kwargs)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics cover the whole global batch (all processes).

    The per-channel mean and variance are all-reduced (two passes, for accuracy) with a differentiable
    collective, so the backward pass is exact too; this runs on every backend, Gloo on CPU included. Outside
    training or a process group it is a plain ``BatchNorm2d``. State-dict keys are those of ``BatchNorm2d``.

    Args:
        process_group: the group to synchronise over (default: the world).
    """

    def __init__(self, *args, process_group: dist.ProcessGroup | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1):
            return super().forward(x)
        c = x.shape[1]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in at least fp32
        count = torch.full((1,), float(x.numel() // c), device=x.device, dtype=xf.dtype)
        # two passes (mean, then squared deviations) avoid the cancellation of E[x^2] - E[x]^2
        first = _AllReduceSum.apply(torch.cat([xf.sum((0, 2, 3)), count]), group)
        n = first[-1]
        mean = first[:c] / n
        centered = xf - mean.view(1, c, 1, 1)
        var = _AllReduceSum.apply(centered.square().sum((0, 2, 3)), group) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                unbiased = var.detach() * (n.detach() / (n.detach() - 1).clamp_min(1.0))
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            weight, bias = self.weight.to(xf.dtype), self.bias.to(xf.dtype)
            out = centered * (scale * weight).view(1, c, 1, 1) + bias.view(1, c, 1, 1)
        else:
            out = centered * scale.view(1, c, 1, 1)
        return out.to(x.dtype)


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of a sum over processes is the sum of the gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def convert_sync_batchnorm(model: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replace every plain ``BatchNorm2d`` (each switch of a switchable BN included) by :class:`SyncBatchNorm2d`.

    Parameters and buffers are moved over, so the state dict is unchanged.

    Raises:
        ValueError: the model has universally slimmable BN, which this does not synchronise yet.
    """
    if any(isinstance(m, USBatchNorm2d) for m in model.modules()):
        raise ValueError(
            "train.sync_bn does not support universally slimmable BN (USBatchNorm2d) yet; set train.sync_bn=false"
        )
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                new = SyncBatchNorm2d(
                    child.num_features,
                    child.eps,
                    child.momentum,
                    child.affine,
                    child.track_running_stats,
                    process_group=process_group,
                )
                if child.affine:
                    new.weight, new.bias = child.weight, child.bias
                if child.track_running_stats:
                    new.running_mean, new.running_var = child.running_mean, child.running_var
                    new.num_batches_tracked = child.num_batches_tracked
                new.train(child.training)
                setattr(parent, name, new)
    return model


@torch.no_grad()
def average_bn_statistics(model: nn.Module, world_size: int) -> None:
    """Average BatchNorm running statistics over all processes (one all-reduce), so every rank holds the same."""
    buffers = [
        b
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase)
        for name, b in m.named_buffers(recurse=False)
        if b is not None and b.is_floating_point() and name in ("running_mean", "running_var")
    ]
    if not buffers or world_size <= 1:
        return
    flat = _flatten_dense_tensors(buffers)
    dist.all_reduce(flat)
    flat /= world_size
    for b, avg in zip(buffers, _unflatten_dense_tensors(flat, buffers)):
        b.copy_(avg)
