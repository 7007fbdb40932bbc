"""The teacher of ``train.teacher``: the original (unconverted) model, or a slimmable checkpoint, frozen.

The teacher is built from the recipe, never saved with the student: a resumed run (and every process of a
``torchrun`` run) rebuilds it the same way, so each process has its own copy and DDP never wraps it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..nn import get_widths, set_width

__all__ = ["ORIGINAL", "build_teacher", "describe_teacher"]

_logger = logging.getLogger(__name__)

#: ``train.teacher: original``: the model before conversion, with ``model.weights``
ORIGINAL = "original"

_WIDTH_KWARGS = ("widths", "width_range", "stat_widths")


def build_teacher(
    teacher: str, model_name: str, model_kwargs: Mapping[str, Any], device: torch.device | str
) -> nn.Module:
    """The frozen teacher (eval mode, no gradients) on ``device``.

    Args:
        teacher: ``"original"`` or the path of a slimmable checkpoint (read with ``weights_only=True``).
        model_name: the student's model name (``original`` needs ``torchvision/<arch>`` or ``timm/<arch>``).
        model_kwargs: the student's ``create_model`` arguments; ``original`` builds the unconverted model from them
            (its ``weights`` are the original's state dict).
        device: where the student trains.

    Returns:
        The teacher. A slimmable checkpoint's model runs at its widest width (a universally slimmable one at the top
        of its range, which needs BN statistics there).

    Raises:
        ValueError: ``original`` without a zoo model or without ``model.weights``, or a universally slimmable
            checkpoint without statistics at its widest width.
        FileNotFoundError: no checkpoint at ``teacher``.
    """
    model = _original(model_name, model_kwargs) if teacher == ORIGINAL else _from_checkpoint(teacher)
    model.eval().requires_grad_(False)
    return model.to(device)


def describe_teacher(teacher: str, model_name: str, model: nn.Module) -> str:
    """One line for the log: which teacher, how big."""
    n = sum(p.numel() for p in model.parameters())
    what = (
        f"the original {model_name}" if teacher == ORIGINAL else f"{getattr(model, 'model_name', '?')} from {teacher}"
    )
    return f"{what} ({n / 1e6:.2f}M parameters), frozen"


def _original(model_name: str, model_kwargs: Mapping[str, Any]) -> nn.Module:
    from ..convert.zoo import create_original_model, is_zoo_name

    if not is_zoo_name(model_name):
        raise ValueError(
            f"train.teacher: original is the unconverted torchvision/<arch> or timm/<arch> model; {model_name} was "
            "never converted. Give the path of a trained checkpoint as train.teacher instead"
        )
    if model_kwargs.get("weights") is None:
        raise ValueError(
            f"train.teacher: original distils from {model_name} with its trained weights; set model.weights to its "
            "state dict file (torch.save(model.state_dict(), PATH)); random weights teach nothing"
        )
    kwargs = {k: v for k, v in model_kwargs.items() if k not in _WIDTH_KWARGS}
    return create_original_model(model_name, **kwargs)


def _from_checkpoint(path: str | os.PathLike[str]) -> nn.Module:
    from ..checkpoint import build_model_from_checkpoint

    if not Path(path).is_file():
        raise FileNotFoundError(
            f"train.teacher: no checkpoint at {path}; give 'original' or the path of a slimmable checkpoint"
        )
    model = build_model_from_checkpoint(path)
    widths = get_widths(model)
    if widths.is_range:
        assert widths.range is not None
        top = widths.range[1]
        if top not in widths.switches:
            raise ValueError(
                f"train.teacher {path}: the universally slimmable model holds no BN statistics at its widest width "
                f"{top:g} (only {list(widths.switches)}); calibrate it first: slimmable calibrate --widths {top:g}"
            )
    else:
        top = widths.switches[-1]
    set_width(model, top)
    return model
