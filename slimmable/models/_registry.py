"""Model registry: ``register_model`` decorates one-line builder functions; ``create_model`` looks them up."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["TASKS", "create_model", "list_models", "model_task", "register_model"]

_MODEL_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}
_MODEL_TASKS: dict[str, str] = {}
#: what a registered model does: ``classification`` (logits), ``detection`` (torchvision detectors) or
#: ``segmentation`` (torchvision segmenters); each is a :class:`slimmable.tasks.Task`
TASKS = ("classification", "detection", "segmentation")


def register_model(
    fn: Callable[..., nn.Module] | None = None, *, task: str = "classification"
) -> Callable[..., nn.Module] | Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register ``fn`` under its ``__name__``; a duplicate name is an error.

    Used bare (``@register_model``) for classification models, or as ``@register_model(task="detection")``.
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {TASKS}")

    def add(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = f.__name__
        if name in _MODEL_ENTRYPOINTS:
            raise ValueError(f"model {name!r} is already registered")
        _MODEL_ENTRYPOINTS[name] = f
        _MODEL_TASKS[name] = task
        return f

    return add if fn is None else add(fn)


def list_models(pattern: str = "*", task: str | None = None) -> list[str]:
    """Sorted names of registered models matching a shell-style ``pattern`` (and ``task``, if given)."""
    if task is not None and task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {TASKS}")
    return sorted(
        n for n in _MODEL_ENTRYPOINTS if fnmatch.fnmatch(n, pattern) and (task is None or _MODEL_TASKS[n] == task)
    )


def model_task(name: str) -> str:
    """The task of a registered model (``classification`` or ``detection``).

    Raises:
        ValueError: unknown name.
    """
    if name.startswith("torchvision/"):  # a torchvision classifier, converted (see create_model)
        return "classification"
    if name not in _MODEL_TASKS:
        raise ValueError(f"unknown model {name!r}; see slimmable.list_models()")
    return _MODEL_TASKS[name]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models`, e.g. ``"slim_mobilenet_v2"``, or ``"torchvision/<arch>"``: a
            torchvision model with random weights, converted by :func:`slimmable.convert` (see
            :func:`slimmable.convert.zoo.create_torchvision_model` for its arguments).
        **kwargs: passed to the model (``widths``, ``num_classes``, ``in_chans``, ``small_input``, ...);
            ``None`` values are dropped so that unset CLI/config fields keep the model's defaults.

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: unknown name (the message suggests close matches), ``widths`` given as a string, or
            ``num_classes`` / ``in_chans`` below 1.
    """
    _check_arguments(name, kwargs)
    if isinstance(name, str) and name.startswith("torchvision/"):  # a torchvision model, converted
        from ..convert.zoo import create_torchvision_model

        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        model = create_torchvision_model(name, **kwargs)
        model.model_name = name
        model.model_kwargs = dict(kwargs)
        model.slimmable_task = "classification"
        return model
    if name not in _MODEL_ENTRYPOINTS:
        near = difflib.get_close_matches(name, list(_MODEL_ENTRYPOINTS), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(near)}?" if near else ""
        raise ValueError(f"unknown model {name!r}.{hint} Available: {', '.join(list_models())}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    model = _MODEL_ENTRYPOINTS[name](**kwargs)
    # Recorded so that checkpoints can rebuild the same architecture: create_model(model_name, **model_kwargs).
    model.model_name = name
    model.model_kwargs = dict(kwargs)
    # the task, read back by slimmable.tasks.task_of (TASK_ATTR): every caller asks the model, none checks types
    model.slimmable_task = _MODEL_TASKS[name]
    return model


def _check_arguments(name: Any, kwargs: dict[str, Any]) -> None:
    """Catch the arguments that would otherwise fail deep inside a model, or build a broken one silently."""
    if not isinstance(name, str):
        raise TypeError(
            f"create_model needs a model name such as 'slim_mobilenet_v2', got {name!r}; see slimmable.list_models()"
        )
    widths = kwargs.get("widths")
    if isinstance(widths, (str, bytes)):
        raise ValueError(
            f"widths {widths!r} is a string; give a sequence of numbers such as (0.5, 1.0) "
            "(the command line's --widths 0.5,1.0 is parsed for you)"
        )
    for key in ("num_classes", "in_chans"):
        value = kwargs.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key} must be an int >= 1, got {value!r}; a model with {key}={value!r} cannot work")
