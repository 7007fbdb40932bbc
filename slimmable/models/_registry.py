"""Model registry: ``register_model`` decorates one-line builder functions; ``create_model`` looks them up.

Each family file declares what it knows next to its builders: the task of each model, and the official
slimmable_networks checkpoints a builder loads (:data:`OFFICIAL_CHECKPOINTS`).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from torch import nn

__all__ = ["OFFICIAL_CHECKPOINTS", "TASKS", "create_model", "list_models", "model_task", "register_model"]

_MODEL_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}
_MODEL_TASKS: dict[str, str] = {}
_OFFICIAL: dict[str, tuple[str, dict[str, Any]]] = {}
#: what a registered model does: ``classification`` (logits), ``detection`` (torchvision's R-CNN detectors) or
#: ``segmentation`` (torchvision's FCN, DeepLabV3 and LR-ASPP: per-pixel logits); each is a
#: :class:`slimmable.tasks.Task`
TASKS = ("classification", "detection", "segmentation")
#: official slimmable_networks checkpoint name (``s_resnet``, ``us_mobilenet_v2``, ...) → ``(registered model,
#: create_model kwargs)`` that the checkpoint loads into, as the family files declare them with
#: ``register_model(official=...)``; a read-only view that follows later registrations
OFFICIAL_CHECKPOINTS: Mapping[str, tuple[str, dict[str, Any]]] = MappingProxyType(_OFFICIAL)
#: create_model arguments that make a features-only backbone of a classification model (not passed to builders)
_FEATURE_KWARGS = ("out_indices", "out_names")


def register_model(
    fn: Callable[..., nn.Module] | None = None,
    *,
    task: str = "classification",
    official: str | Mapping[str, Mapping[str, Any]] | None = None,
) -> Callable[..., nn.Module] | Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register ``fn`` under its ``__name__``; a duplicate name is an error.

    Used bare (``@register_model``) for classification models, or with arguments, e.g.
    ``@register_model(task="detection")`` or ``@register_model(official="s_resnet")``.

    Args:
        fn: the builder (``**kwargs -> nn.Module``).
        task: one of :data:`TASKS`.
        official: the official slimmable_networks checkpoint(s) this builder's model loads: a name (built with the
            defaults) or ``{name: create_model kwargs}``; listed in :data:`OFFICIAL_CHECKPOINTS`.

    Raises:
        ValueError: unknown task, or a model or official checkpoint name registered twice.
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {TASKS}")
    checkpoints = {official: {}} if isinstance(official, str) else dict(official or {})

    def add(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = f.__name__
        if name in _MODEL_ENTRYPOINTS:
            raise ValueError(f"model {name!r} is already registered")
        taken = [c for c in checkpoints if c in _OFFICIAL]
        if taken:
            raise ValueError(f"official checkpoint {taken[0]!r} is already registered for {_OFFICIAL[taken[0]][0]}")
        _MODEL_ENTRYPOINTS[name] = f
        _MODEL_TASKS[name] = task
        for checkpoint, kwargs in checkpoints.items():
            _OFFICIAL[checkpoint] = (name, dict(kwargs))
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
    """The task of a registered model (one of :data:`TASKS`).

    Raises:
        ValueError: unknown name.
    """
    if _is_zoo_name(name):  # a torchvision or timm classifier, converted (see create_model)
        return "classification"
    if name not in _MODEL_TASKS:
        raise ValueError(f"unknown model {name!r}; see slimmable.list_models()")
    return _MODEL_TASKS[name]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models`, e.g. ``"slim_mobilenet_v2"``, or ``"torchvision/<arch>"`` /
            ``"timm/<arch>"``: a torchvision or timm model with random weights (or ``weights=``, a state dict
            of the original architecture, loaded before conversion and not recorded in ``model_kwargs``), converted
            by :func:`slimmable.convert` (see :func:`slimmable.convert.zoo.create_torchvision_model` and
            :func:`~slimmable.convert.zoo.create_timm_model` for their arguments; timm needs ``slimmable[timm]``).
        **kwargs: passed to the model (``widths``, ``num_classes``, ``in_chans``, ``small_input``, ...);
            ``None`` values are dropped so that unset CLI/config fields keep the model's defaults. Three are
            create_model's own, for classification models (as timm's):

            * ``features_only=True``: the model without its classifier, whose forward returns the stage maps
              (:meth:`~slimmable.models.SlimNet.as_features_only`), as a detection or segmentation backbone;
            * ``out_indices``: with ``features_only``, positions in the model's ``feature_info`` to return
              (default all);
            * ``out_names``: with ``features_only``, the keys of the returned maps (default the stage names).

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: unknown name (the message suggests close matches), ``widths`` given as a string,
            ``num_classes`` / ``in_chans`` below 1, or ``features_only`` for a model that is not a classification
            network of this package.
    """
    _check_arguments(name, kwargs)
    if not _is_zoo_name(name) and name not in _MODEL_ENTRYPOINTS:
        near = difflib.get_close_matches(name, list(_MODEL_ENTRYPOINTS), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(near)}?" if near else ""
        raise ValueError(f"unknown model {name!r}.{hint} Available: {', '.join(list_models())}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    features_only = bool(kwargs.pop("features_only", False))
    backbone = model_task(name) == "classification"
    feature_kwargs = {k: kwargs.pop(k) for k in _FEATURE_KWARGS if k in kwargs} if backbone else {}
    if features_only and not backbone:
        raise ValueError(
            f"features_only=True makes a backbone of one of this package's classification networks; {name} is not "
            "one (see slimmable.list_models(task='classification'))"
        )
    if feature_kwargs and not features_only:
        raise ValueError(f"{', '.join(feature_kwargs)} select(s) the maps of a backbone: add features_only=True")
    if _is_zoo_name(name):  # a torchvision or timm model, converted
        from ..convert.zoo import TIMM_PREFIX, create_timm_model, create_torchvision_model

        build = create_timm_model if name.startswith(TIMM_PREFIX) else create_torchvision_model
        model = build(name, **kwargs)
        if features_only:
            model.as_features_only(**feature_kwargs)
            kwargs = {**kwargs, "features_only": True, **feature_kwargs}
        model.model_name = name
        # ``weights`` (the original's state dict) is not recorded: the converted state dict holds them
        # the original's weights and the sort are applied once, at conversion: a checkpoint holds their result
        model.model_kwargs = {k: v for k, v in kwargs.items() if k not in ("weights", "sort")}
        model.slimmable_task = "classification"
        return model
    model = _MODEL_ENTRYPOINTS[name](**kwargs)
    if features_only:
        model.as_features_only(**feature_kwargs)
        kwargs = {**kwargs, "features_only": True, **feature_kwargs}
    # Recorded so that checkpoints can rebuild the same architecture: create_model(model_name, **model_kwargs).
    model.model_name = name
    model.model_kwargs = dict(kwargs)
    # the task, read back by slimmable.tasks.task_of (TASK_ATTR): every caller asks the model, none checks types
    model.slimmable_task = _MODEL_TASKS[name]
    return model


def _is_zoo_name(name: str) -> bool:
    """``torchvision/<arch>`` or ``timm/<arch>``: built from the other zoo and converted (no torch.fx import here)."""
    return name.startswith(("torchvision/", "timm/"))


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
