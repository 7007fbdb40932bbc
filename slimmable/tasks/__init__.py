"""Tasks: what differs between classification, detection and segmentation, behind one seam.

Every model built by :func:`slimmable.create_model` records its task (the registry's tag) as
``model.slimmable_task``; :func:`task_of` reads it back (or, for a model built elsewhere, asks each task whether
it claims the model) and returns the :class:`Task` that knows its data, objective, metrics, inputs, server
answers, export outputs and profiled parts. Adding a task means writing one :class:`Task` subclass and registering
it with :func:`register_task` (see README, "Adding a task").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from .._utils import unwrap_model
from .base import Inputs, Task, mean_metric, model_kwargs_from_config, with_options
from .classification import ClassificationTask
from .detection import DetectionTask
from .segmentation import SegmentationTask

__all__ = [
    "TASK_ATTR",
    "ClassificationTask",
    "DetectionTask",
    "Inputs",
    "SegmentationTask",
    "Task",
    "create_task",
    "get_task",
    "list_tasks",
    "mean_metric",
    "model_kwargs_from_config",
    "register_task",
    "set_task",
    "task_for_rows",
    "task_of",
    "tasks_for_dataset",
    "with_options",
]

#: the attribute on a model that names its task
TASK_ATTR = "slimmable_task"

_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Make ``task`` known under ``task.name`` (a duplicate name is an error)."""
    if not task.name:
        raise ValueError(f"{type(task).__name__} has no name; set the class attribute `name`")
    if task.name in _TASKS:
        raise ValueError(f"a task named {task.name!r} is already registered ({_TASKS[task.name]!r})")
    _TASKS[task.name] = task
    return task


def list_tasks() -> list[str]:
    """The registered task names."""
    return list(_TASKS)


def get_task(name: str) -> Task:
    """The registered task called ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(_TASKS)}")
    return _TASKS[name]


def set_task(model: nn.Module, name: str) -> nn.Module:
    """Record on ``model`` that it serves task ``name`` (``create_model`` does this for every model it builds)."""
    get_task(name)
    setattr(model, TASK_ATTR, name)
    return model


def task_of(model: nn.Module) -> Task:
    """The task of a model: the one recorded at ``create_model`` (kept by ``copy.deepcopy``, dense exports and
    checkpoints, which rebuild through ``create_model``); for a model built elsewhere, the task that claims it
    (a torchvision detector, ...), else classification. Wrappers (DDP, ``torch.compile``) are looked through."""
    inner = unwrap_model(model)
    name = getattr(inner, TASK_ATTR, None) or getattr(model, TASK_ATTR, None)
    if name is not None:
        return get_task(name)
    for task in _TASKS.values():
        if task.claims(inner):
            return task
    return _TASKS["classification"]


def tasks_for_dataset(dataset: str) -> list[str]:
    """The names of the tasks that train on ``data.dataset`` ``dataset``."""
    return [t.name for t in _TASKS.values() if dataset in t.datasets]


def task_for_rows(rows: Sequence[Mapping[str, Any]]) -> Task:
    """The task whose report a list of rows is (by :attr:`Task.row_key`: ``top1``: classification, ``bbox_AP``:
    detection, ...).

    Raises:
        ValueError: no rows, or rows that carry no task's metric.
    """
    for task in _TASKS.values():
        if rows and task.row_key in rows[0]:
            return task
    keys = sorted(rows[0]) if rows else []
    raise ValueError(f"report rows with keys {keys} carry none of the tasks' keys "
                     f"({', '.join(t.row_key for t in _TASKS.values())})")  # fmt: skip


def create_task(cfg: Any) -> Task:
    """The task of a recipe, from its model's registry tag; its data must be one the task trains on.

    Raises:
        ValueError: the model's task does not train on ``data.dataset``, or an unknown model name.
    """
    from ..models import create_model
    from ..models._registry import model_task

    try:
        name = model_task(cfg.model.name)
    except ValueError:
        create_model(cfg.model.name)  # raises the registry's error, with close names
        raise
    task = get_task(name)
    if cfg.data.dataset not in task.datasets:
        others = ", ".join(tasks_for_dataset(cfg.data.dataset)) or "no task"
        raise ValueError(
            f"model.name {cfg.model.name} is a {name} model but data.dataset {cfg.data.dataset} is data for "
            f"{others}; {name} models train on {' or '.join(task.datasets)}"
        )
    return task


register_task(ClassificationTask())
register_task(DetectionTask())
register_task(SegmentationTask())
