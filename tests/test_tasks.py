"""The task seam: every model knows its task (recorded at ``create_model``, kept by copies, dense exports and
checkpoints; claimed by type for models built elsewhere), and no module outside ``slimmable/tasks`` and
``slimmable/models`` checks model types to tell tasks apart."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torchvision

import slimmable
from slimmable.checkpoint import build_model_from_checkpoint, model_checkpoint
from slimmable.export import export_width
from slimmable.models import model_task
from slimmable.tasks import (
    ClassificationTask,
    get_task,
    list_tasks,
    register_task,
    task_for_rows,
    task_of,
)

PACKAGE = Path(slimmable.__file__).parent


@pytest.mark.parametrize(
    ("name", "kwargs", "task"),
    [
        ("slim_mobilenet_v1", {"num_classes": 10, "small_input": True}, "classification"),
        ("torchvision/mobilenet_v3_small", {"num_classes": 10}, "classification"),
        ("slim_fasterrcnn_resnet18_fpn", {"widths": (0.5, 1.0)}, "detection"),
        ("slim_lraspp_mobilenet_v2", {"widths": (0.5, 1.0), "num_classes": 4}, "segmentation"),
    ],
)
def test_the_task_is_recorded_at_create_model_and_kept(name: str, kwargs: dict, task: str) -> None:
    model = slimmable.create_model(name, **kwargs).eval()
    assert task_of(model).name == task == model_task(name)
    assert task_of(copy.deepcopy(model)).name == task
    assert task_of(build_model_from_checkpoint(model_checkpoint(model))).name == task
    if not name.startswith("torchvision/"):
        assert task_of(export_width(model, max(model.widths))).name == task  # the dense form serves the same task


def test_models_built_elsewhere_are_claimed_by_their_task() -> None:
    det = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    seg = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)
    assert task_of(det).name == "detection" and task_of(seg).name == "segmentation"
    assert task_of(torchvision.models.resnet18()).name == "classification"
    assert task_of(torch.compile(det)).name == "detection"  # wrappers are looked through


def test_the_registry_names_its_tasks_and_refuses_duplicates() -> None:
    assert list_tasks() == ["classification", "detection", "segmentation"]
    with pytest.raises(ValueError, match="unknown task 'depth'; the tasks are classification, detection"):
        get_task("depth")
    with pytest.raises(ValueError, match="a task named 'classification' is already registered"):
        register_task(ClassificationTask())


def test_a_saved_report_names_its_task() -> None:
    assert task_for_rows([{"width": 1.0, "top1": 90.0}]).name == "classification"
    assert task_for_rows([{"width": 1.0, "bbox_AP": 1.0}]).name == "detection"
    assert task_for_rows([{"width": 1.0, "miou": 50.0}]).name == "segmentation"
    with pytest.raises(ValueError, match="carry none of the tasks' keys"):
        task_for_rows([{"width": 1.0, "loss": 2.0}])


def test_no_model_type_checks_outside_the_task_and_model_modules() -> None:
    """The deploy stack, training, search and the CLI ask a model's task; only ``slimmable/tasks`` and
    ``slimmable/models`` may look at model classes to tell tasks apart."""
    pattern = re.compile(
        r"GeneralizedRCNN|is_detector\(|is_segmenter\(|_SimpleSegmentationModel|LRASPP\b|isinstance\([^)]*(FasterRCNN"
        r"|MaskRCNN|KeypointRCNN|FCN|DeepLabV3)"
    )
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in ("tasks", "models"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{rel}:{i}: {line.strip()}")
    assert not offenders, "ask slimmable.tasks.task_of(model) instead:\n" + "\n".join(offenders)
