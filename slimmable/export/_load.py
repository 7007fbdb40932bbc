"""Build the model that ``slimmable export`` and ``slimmable serve`` deploy: the one place that loads checkpoints.

Three sources, in this order:

1. a checkpoint written by slimmable's own trainer (a mapping with ``format_version``): handed to
   ``slimmable.train.build_model_from_checkpoint`` (the training engine owns that format);
2. an official slimmable_networks checkpoint (``{'model': state_dict}``): needs the model name, loaded with
   :func:`slimmable.models.official.load_official_checkpoint`;
3. no checkpoint: the named model with random weights (demos and benchmarks only; ``random_weights`` says so).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from ..models import create_model
from ..models.official import OFFICIAL_MODELS, load_official_checkpoint, read_checkpoint_file

__all__ = ["LoadedModel", "load_model"]


@dataclass
class LoadedModel:
    """A model ready to deploy (eval mode) and where it came from.

    Attributes:
        model: the slimmable model.
        name: registered model name (used for file names and latency-cache keys).
        source: ``"slimmable checkpoint PATH"``, ``"official checkpoint PATH"`` or ``"random weights"``.
        random_weights: ``True`` when no checkpoint was loaded.
        preprocess: how images were preprocessed in training (``image_size``, ``eval_resize``, ``mean``, ``std``,
            ...), from slimmable checkpoints; ``None`` otherwise.
    """

    model: nn.Module
    name: str
    source: str
    random_weights: bool
    preprocess: dict | None = None


def load_model(
    checkpoint: str | os.PathLike[str] | None = None,
    model_name: str | None = None,
    *,
    widths: Sequence[float] | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    small_input: bool | None = None,
) -> LoadedModel:
    """Load a checkpoint (slimmable's own or official) or build ``model_name`` with random weights.

    Args:
        checkpoint: path of a checkpoint file, or ``None`` for random weights.
        model_name: registered model name; required for official checkpoints and for random weights.
        widths, num_classes, in_chans, small_input: model arguments for official checkpoints and random weights
            (``None`` keeps the model's defaults; official ImageNet checkpoints need the defaults).

    Returns:
        A :class:`LoadedModel` in eval mode.

    Raises:
        ValueError: neither argument given, unknown model name, or an official checkpoint without a model name.
        FileNotFoundError: the checkpoint does not exist.
        slimmable.models.official.CheckpointError: unreadable checkpoint or one that does not fit the model.
    """
    kwargs = {"widths": widths, "num_classes": num_classes, "in_chans": in_chans, "small_input": small_input}
    if checkpoint is None:
        if not model_name:
            raise ValueError(
                "nothing to load: give --checkpoint PATH (with --model NAME for an official checkpoint), or --model "
                "NAME alone for random weights (demo)"
            )
        model = create_model(model_name, **kwargs)
        _set_name(model, model_name)
        return LoadedModel(model.eval(), model_name, "random weights", True)
    obj = read_checkpoint_file(checkpoint)
    if isinstance(obj, Mapping) and "format_version" in obj:
        model = _build_from_own_checkpoint(checkpoint)
        name = str(obj.get("model_name") or getattr(model, "model_name", "") or type(model).__name__)
        if model_name and model_name != name:
            raise ValueError(
                f"{checkpoint} holds a {name} but --model {model_name} was given; drop --model (slimmable checkpoints "
                "record their model)"
            )
        _set_name(model, name)
        pre = obj.get("preprocess")
        pre = dict(pre) if isinstance(pre, Mapping) else None
        return LoadedModel(model.eval(), name, f"slimmable checkpoint {checkpoint}", False, pre)
    if not model_name:
        known = ", ".join(f"{k} → {v[0]}" for k, v in OFFICIAL_MODELS.items())
        raise ValueError(
            f"{checkpoint} looks like an official slimmable_networks checkpoint, which does not record its model; "
            f"add --model NAME (official files map as {known})"
        )
    model = create_model(model_name, **kwargs)
    load_official_checkpoint(obj, model)
    _set_name(model, model_name)
    return LoadedModel(model.eval(), model_name, f"official checkpoint {checkpoint}", False)


def _build_from_own_checkpoint(checkpoint: str | os.PathLike[str]) -> nn.Module:
    builder = None
    for module_name in ("slimmable.train", "slimmable.train.checkpoint"):
        try:
            builder = getattr(importlib.import_module(module_name), "build_model_from_checkpoint", None)
        except ImportError:
            continue
        if builder is not None:
            break
    if builder is None:
        raise ValueError(
            f"{checkpoint} is a checkpoint written by slimmable's trainer, but this install has no "
            "slimmable.train.build_model_from_checkpoint to rebuild its model; update slimmable, or pass an official "
            "checkpoint with --model NAME"
        )
    built = builder(checkpoint)
    model = built[0] if isinstance(built, tuple) else built
    if not isinstance(model, nn.Module):
        raise TypeError(f"build_model_from_checkpoint returned {type(model).__name__}, expected an nn.Module")
    return model


def _set_name(model: nn.Module, name: str) -> None:
    # SlimNet declares ``model_name``; the registry leaves it empty, so record the name used to build it.
    if not getattr(model, "model_name", ""):
        model.model_name = name
