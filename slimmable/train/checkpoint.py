"""Training checkpoints: written atomically, read safely (``weights_only``), validated before use.

A checkpoint is a dict of tensors and plain containers:

=====================  ==========================================================================================
``format_version``     :data:`CHECKPOINT_FORMAT_VERSION`
``model``              state dict of the unwrapped model (no ``module.`` / ``_orig_mod.`` prefixes)
``model_name``         registered name, e.g. ``slim_mobilenet_v2``
``model_kwargs``       the ``create_model`` keyword arguments (widths, num_classes, in_chans, ...)
``widths``             the switches, ascending
``preprocess``         image size, normalisation, classes (for evaluation, export and serving)
``config``             the resolved recipe (``RunConfig.to_dict()``)
``optimizer``, ``scheduler``, ``scaler``   their state dicts (``scaler`` may be ``None``)
``epoch``              completed epochs; ``batch_in_epoch`` batches done of the next one (interrupted runs)
``step``               optimizer steps so far
``rng``                random states (python, torch, cuda)
``best``, ``history``  best mean validation top-1 so far and per-epoch metrics
=====================  ==========================================================================================
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._utils import unwrap_model
from ..models import create_model
from ..models.official import CheckpointError, read_checkpoint_file

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "build_model_from_checkpoint",
    "get_rng_state",
    "load_checkpoint",
    "save_checkpoint",
    "set_rng_state",
    "unwrap_model",
]

CHECKPOINT_FORMAT_VERSION = 1
_REQUIRED = ("format_version", "model", "model_name", "model_kwargs", "widths")


def get_rng_state() -> dict[str, Any]:
    """Python and torch (CPU and CUDA) random states, storable with ``weights_only`` loading."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def save_checkpoint(path: str | os.PathLike[str], checkpoint: Mapping[str, Any]) -> Path:
    """Write ``checkpoint`` to ``path`` atomically: a temporary file in the same folder, fsync, then rename.

    A crash (even SIGKILL) during the write leaves the previous file intact.

    Raises:
        ValueError: ``checkpoint`` lacks a required key.
        OSError: the write failed (full disk, read-only folder); the message names ``path``, whose previous
            content is intact.
    """
    missing = [k for k in _REQUIRED if k not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint to save lacks {missing}; build it with the Trainer")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(checkpoint), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except OSError as err:  # full disk, read-only folder: name the checkpoint (the previous one is intact)
        raise OSError(err.errno, f"{err.strerror or err} (the previous {p.name}, if any, is intact)", str(p)) from err
    finally:
        tmp.unlink(missing_ok=True)
    return p


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (on the CPU, ``weights_only=True``) and validate it.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: unreadable, not a slimmable training checkpoint (an official one names the loader to
            use), or written by a newer format version.
    """
    obj = read_checkpoint_file(path)
    if not isinstance(obj, Mapping) or "format_version" not in obj:
        hint = ""
        if isinstance(obj, Mapping) and ("model" in obj or all(isinstance(v, torch.Tensor) for v in obj.values())):
            hint = (
                " It looks like an official slimmable_networks checkpoint or a bare state dict: evaluate it with "
                "`slimmable eval --checkpoint PATH --model NAME --widths W1,W2,...` or load it with "
                "slimmable.models.official.load_official_checkpoint"
            )
        raise CheckpointError(f"{path} is not a slimmable training checkpoint (no format_version).{hint}")
    version = obj["format_version"]
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version!r}; this slimmable reads up to {CHECKPOINT_FORMAT_VERSION}. "
            "Upgrade slimmable"
        )
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}; it is truncated or not written by slimmable")
    return dict(obj)


def build_model_from_checkpoint(
    checkpoint: str | os.PathLike[str] | Mapping[str, Any], device: torch.device | str | None = None
) -> nn.Module:
    """Rebuild the model a checkpoint was trained as and load its weights, in eval mode.

    Args:
        checkpoint: a path, or the dict :func:`load_checkpoint` returned.
        device: where to put the model (default CPU).

    Returns:
        The model (a :class:`slimmable.models.SlimNet`), at its widest width.

    Raises:
        CheckpointError: the weights do not fit the recorded model.
    """
    ckpt = load_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    kwargs = dict(ckpt["model_kwargs"])
    if "widths" in kwargs and kwargs["widths"] is not None:
        kwargs["widths"] = tuple(kwargs["widths"])
    model = create_model(ckpt["model_name"], **kwargs)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint weights do not fit {ckpt['model_name']}({kwargs}): {str(err)[:500]}"
        ) from err
    return model.to(device if device is not None else "cpu").eval()
