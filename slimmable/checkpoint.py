"""Checkpoints: the one module that reads and writes them, slimmable's own format and the official one.

Every command and library function that takes a checkpoint goes through here: :func:`load_model` reads a file
once (``torch.load(weights_only=True)`` on the CPU), recognises slimmable's own format (a mapping with
``format_version``) or an official slimmable_networks checkpoint (``{'model': state_dict}``, which does not record
its model, so the caller names it), and builds the model. :func:`save_checkpoint` writes atomically;
:func:`model_checkpoint` starts the dict of a model so that no caller builds the required keys by hand.

slimmable's checkpoint format, a dict of tensors and plain containers:

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._checkpoint_files import (
    CheckpointError,
    load_official_checkpoint,
    official_state_dict,
    read_checkpoint_file,
)
from ._utils import plain, save_torch, unwrap_model
from .models import OFFICIAL_CHECKPOINTS, create_model
from .nn import get_widths

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "OFFICIAL_MODELS",
    "CheckpointError",
    "LoadedModel",
    "build_model_from_checkpoint",
    "builds_same_model",
    "check_model_kwargs",
    "is_slimmable_checkpoint",
    "load_checkpoint",
    "load_model",
    "load_official_checkpoint",
    "model_build_kwargs",
    "model_checkpoint",
    "official_state_dict",
    "read_checkpoint_file",
    "save_checkpoint",
]

CHECKPOINT_FORMAT_VERSION = 1
_REQUIRED = ("format_version", "model", "model_name", "model_kwargs", "widths")
_WIDTH_KWARGS = ("widths", "width_range", "stat_widths")

#: official model file -> (our registered name, kwargs): the families declare them
#: (``register_model(official=...)``); this is the registry's read-only view,
#: :data:`slimmable.models.OFFICIAL_CHECKPOINTS`
OFFICIAL_MODELS: Mapping[str, tuple[str, dict[str, Any]]] = OFFICIAL_CHECKPOINTS

# -- slimmable's own format ---------------------------------------------------------------------------------------


def is_slimmable_checkpoint(obj: Any) -> bool:
    """Whether ``obj`` (what :func:`read_checkpoint_file` returned) is in slimmable's own format."""
    return isinstance(obj, Mapping) and "format_version" in obj


def model_build_kwargs(model: nn.Module) -> dict[str, Any]:
    """The ``create_model`` kwargs that rebuild ``model`` as it is now, so that its state dict loads.

    They are the kwargs it was built with, except that a universally slimmable model's ``stat_widths`` are read
    off its layers (BN calibration may have added widths).

    Raises:
        ValueError: the model does not record how it was built (not made by :func:`slimmable.create_model`).
    """
    m = unwrap_model(model)
    name, kwargs = getattr(m, "model_name", ""), getattr(m, "model_kwargs", None)
    if not name or kwargs is None:
        raise ValueError(
            f"{type(m).__name__} does not record its registered name and kwargs; build it with "
            "slimmable.create_model so that a checkpoint can rebuild it"
        )
    kwargs = dict(kwargs)
    widths = get_widths(m)
    if widths.is_range:
        kwargs["stat_widths"] = widths.switches
    return kwargs


def builds_same_model(checkpoint: Mapping[str, Any], model: nn.Module) -> bool:
    """Whether ``checkpoint`` records the name and kwargs that build ``model`` (tuples and lists alike)."""
    m = unwrap_model(model)
    same_name = checkpoint.get("model_name") == getattr(m, "model_name", None)
    return same_name and plain(checkpoint.get("model_kwargs")) == plain(model_build_kwargs(m))


def _as_tuples(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The recorded kwargs with the width sequences as tuples again, as ``create_model`` takes them."""
    return {k: tuple(v) if k in _WIDTH_KWARGS and isinstance(v, list) else v for k, v in kwargs.items()}


def model_checkpoint(model: nn.Module, **extra: Any) -> dict[str, Any]:
    """The checkpoint entries that describe ``model`` (weights, name, kwargs, widths), plus ``extra``.

    Args:
        model: a model built by :func:`slimmable.create_model` (possibly wrapped by DDP or ``torch.compile``).
        **extra: further entries (``preprocess``, ``config``, training state, ...).

    Raises:
        ValueError: the model does not record how it was built (not made by ``create_model``).
    """
    kwargs = model_build_kwargs(model)
    m = unwrap_model(model)
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "model": m.state_dict(),
        "model_name": m.model_name,
        "model_kwargs": plain(kwargs),
        "widths": list(get_widths(m).switches),
        **extra,
    }


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
    # a full disk or read-only folder raises OSError naming the checkpoint (the previous one is intact)
    return save_torch(dict(checkpoint), path, fsync=True)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (on the CPU, ``weights_only=True``) and validate it.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: unreadable, not a slimmable training checkpoint (an official one names the loader to
            use), or written by a newer format version.
    """
    return _validate(read_checkpoint_file(path), path)


def _validate(obj: Any, path: str | os.PathLike[str]) -> dict[str, Any]:
    if not isinstance(obj, Mapping) or "format_version" not in obj:
        hint = ""
        if isinstance(obj, Mapping) and ("model" in obj or all(isinstance(v, torch.Tensor) for v in obj.values())):
            hint = (
                " It looks like an official slimmable_networks checkpoint or a bare state dict: evaluate it with "
                "`slimmable eval --checkpoint PATH --model NAME --widths W1,W2,...` or load it with "
                "slimmable.checkpoint.load_official_checkpoint"
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


#: bounds on what a checkpoint (a file from anyone) may ask the model it describes to allocate
MAX_NUM_CLASSES = 100_000
MAX_IN_CHANS = 16
MAX_WIDTHS = 64
MAX_STAT_WIDTHS = 1024  # a universally slimmable model's BN statistics (calibration may add widths)
MAX_WIDTH = 4.0
_MAX_NUMBER = 1_000_000  # any other number in model_kwargs (sizes, counts)


def check_model_kwargs(name: Any, kwargs: Any) -> dict[str, Any]:
    """Bound the ``model_name`` / ``model_kwargs`` of a checkpoint before they size a model.

    ``weights_only`` stops a checkpoint from running code, but its kwargs decide what is allocated: ``num_classes``
    must be in [1, :data:`MAX_NUM_CLASSES`], ``in_chans`` in [1, :data:`MAX_IN_CHANS`], width lists at most
    :data:`MAX_WIDTHS` numbers in (0, :data:`MAX_WIDTH`] (``stat_widths``: :data:`MAX_STAT_WIDTHS`), any other
    number at most 1e6 in magnitude.

    Raises:
        CheckpointError: a value out of bounds or of the wrong type; the message names the key.
    """

    def bad(key: str, value: Any, what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint model_kwargs[{key!r}] = {str(value)[:80]} is not {what}; refusing to build")

    if not isinstance(name, str) or not name:
        raise CheckpointError(f"checkpoint model_name {str(name)[:80]!r} is not a model name")
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise CheckpointError(f"checkpoint model_kwargs is a {type(kwargs).__name__}, not a mapping of names")
    for key, value in kwargs.items():
        if value is None:
            continue
        if key in ("num_classes", "in_chans"):
            high = MAX_NUM_CLASSES if key == "num_classes" else MAX_IN_CHANS
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                raise bad(key, value, f"an int in [1, {high}]")
        elif key in _WIDTH_KWARGS:
            most = MAX_STAT_WIDTHS if key == "stat_widths" else MAX_WIDTHS
            ok = isinstance(value, (list, tuple)) and 0 < len(value) <= most
            ok = ok and all(_number(w) and 0 < w <= MAX_WIDTH for w in value)
            if not ok or (key == "width_range" and len(value) != 2):
                raise bad(key, value, f"a list of at most {most} widths in (0, {MAX_WIDTH:g}]")
        else:
            _check_plain_value(key, value, bad)
    return dict(kwargs)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def _check_plain_value(key: str, value: Any, bad: Any, depth: int = 0) -> None:
    if isinstance(value, (bool, str)) or value is None:
        return
    if isinstance(value, (int, float)):
        if not _number(value) or abs(value) > _MAX_NUMBER:
            raise bad(key, value, f"a finite number of magnitude at most {_MAX_NUMBER:g}")
        return
    if isinstance(value, (list, tuple)) and depth < 3 and len(value) <= 1024:
        for v in value:
            _check_plain_value(key, v, bad, depth + 1)
        return
    if isinstance(value, Mapping) and depth < 3 and len(value) <= 100_000:  # e.g. a ChannelSpec: layer -> channels
        for k, v in value.items():
            if not isinstance(k, str):
                raise bad(key, value, "a mapping with string keys")
            _check_plain_value(key, v, bad, depth + 1)
        return
    raise bad(key, value, "a plain value (number, string, short list or mapping)")


def _check_shapes_on_meta(name: str, kwargs: Mapping[str, Any], sd: Any) -> None:
    """Build the model on the ``meta`` device (no memory) and compare the state dict's keys and shapes with it.

    Raises:
        CheckpointError: the weights do not fit (keys or shapes); names the first differing key.
    """
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError("checkpoint 'model' is not a state dict of tensors")
    if name.startswith(("torchvision/", "timm/")):  # converted by tracing, which needs real tensors; kwargs bounded
        return
    try:
        with torch.device("meta"):
            meta = create_model(name, **kwargs)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint model {name}({dict(kwargs)}) cannot be built: {str(err)[:300]}") from err
    except Exception:  # a model that cannot be built on meta: the real build below checks instead
        return
    own = meta.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or shape:
        if shape:
            k = shape[0]
            what = f"{k!r} has shape {tuple(sd[k].shape)}, the model's is {tuple(own[k].shape)}"
        elif missing:
            what = f"{len(missing)} keys are missing, e.g. {missing[0]!r}"
        else:
            what = f"{len(unexpected)} keys are unexpected, e.g. {unexpected[0]!r}"
        raise CheckpointError(
            f"checkpoint weights do not fit {name}({dict(kwargs)}): {what} ({len(shape)} shapes differ, "
            f"{len(missing)} keys missing, {len(unexpected)} unexpected)"
        )


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
        CheckpointError: the recorded model arguments are out of bounds (:func:`check_model_kwargs`), or the weights
            do not fit the recorded model (checked on the ``meta`` device first, before allocating the model).
    """
    ckpt = load_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    kwargs = _as_tuples(check_model_kwargs(ckpt["model_name"], ckpt["model_kwargs"]))
    _check_shapes_on_meta(ckpt["model_name"], kwargs, ckpt["model"])  # before anything is allocated
    model = create_model(ckpt["model_name"], **kwargs)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint weights do not fit {ckpt['model_name']}({kwargs}): {str(err)[:500]}"
        ) from err
    return model.to(device if device is not None else "cpu").eval()


# -- one entry point -------------------------------------------------------------------------------------------------


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
        checkpoint: the validated dict of a slimmable checkpoint (recipe, history, ...); ``None`` otherwise.
    """

    model: nn.Module
    name: str
    source: str
    random_weights: bool
    preprocess: dict | None = None
    checkpoint: dict[str, Any] | None = None


def load_model(
    checkpoint: str | os.PathLike[str] | None = None,
    model_name: str | None = None,
    *,
    widths: Sequence[float] | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    small_input: bool | None = None,
    device: torch.device | str | None = None,
) -> LoadedModel:
    """Load a checkpoint (slimmable's own or official), reading the file once, or build ``model_name`` with random
    weights.

    Args:
        checkpoint: path of a checkpoint file, or ``None`` for random weights.
        model_name: registered model name; required for official checkpoints and for random weights. With one of
            slimmable's checkpoints it may only repeat the recorded name.
        widths, num_classes, in_chans, small_input: model arguments for official checkpoints and random weights
            (``None`` keeps the model's defaults; official ImageNet checkpoints need the defaults). Not used
            with slimmable's own checkpoints, which record theirs (``slimmable eval --widths`` then picks the widths
            to evaluate).
        device: where to put the model (default CPU).

    Returns:
        A :class:`LoadedModel` in eval mode; ``checkpoint`` holds the validated dict of slimmable's own checkpoints
        (its recipe, history, preprocessing), so callers never read the file again.

    Raises:
        ValueError: neither argument given, unknown model name, an official checkpoint without a model name, or
            a model name that contradicts the one a slimmable checkpoint records.
        FileNotFoundError: the checkpoint does not exist.
        CheckpointError: unreadable checkpoint or one that does not fit the model.
    """
    kwargs = {"widths": widths, "num_classes": num_classes, "in_chans": in_chans, "small_input": small_input}
    target = torch.device(device) if device is not None else torch.device("cpu")
    if checkpoint is None:
        if not model_name:
            raise ValueError(
                "nothing to load: give --checkpoint PATH (with --model NAME for an official checkpoint), or --model "
                "NAME alone for random weights (demo)"
            )
        model = create_model(model_name, **kwargs)
        return LoadedModel(model.to(target).eval(), model_name, "random weights", True)
    obj = read_checkpoint_file(checkpoint)
    if is_slimmable_checkpoint(obj):
        ckpt = _validate(obj, checkpoint)
        name = str(ckpt["model_name"])
        if model_name and model_name != name:
            raise ValueError(
                f"{checkpoint} holds a {name} but --model {model_name} was given; drop --model (slimmable checkpoints "
                "record their model)"
            )
        model = build_model_from_checkpoint(ckpt, target)
        pre = ckpt.get("preprocess")
        pre = dict(pre) if isinstance(pre, Mapping) else None
        return LoadedModel(model, name, f"slimmable checkpoint {checkpoint}", False, pre, ckpt)
    if not model_name:
        known = ", ".join(f"{k} → {v[0]}" for k, v in OFFICIAL_MODELS.items())
        raise ValueError(
            f"{checkpoint} is not a slimmable training checkpoint; if it is an official slimmable_networks checkpoint "
            "(which does not record its model), add --model NAME --widths W1,W2,... (e.g. --model slim_mobilenet_v2 "
            f"--widths 0.35,0.5,0.75,1.0; official files map as {known})"
        )
    model = create_model(model_name, **kwargs)
    load_official_checkpoint(obj, model)
    return LoadedModel(model.to(target).eval(), model_name, f"official checkpoint {checkpoint}", False)
