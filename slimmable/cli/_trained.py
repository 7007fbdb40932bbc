"""Loading a checkpoint written by ``slimmable train`` together with the data of its saved recipe."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn

from ..config import RunConfig


def load_trained(path: str | os.PathLike[str], device: torch.device) -> tuple[dict[str, Any], nn.Module, RunConfig]:
    """The checkpoint dict, its model (eval mode, on ``device``) and its saved recipe.

    Raises:
        CheckpointError: not a slimmable training checkpoint (an official one: the message names the loader).
        ValueError: the checkpoint holds no recipe.
    """
    from ..checkpoint import CheckpointError, load_model

    loaded = load_model(path, device=device)
    ckpt = loaded.checkpoint
    if ckpt is None:
        raise CheckpointError(
            f"{path} is not a slimmable training checkpoint (no format_version); this command needs one written by "
            "`slimmable train`"
        )
    if not ckpt.get("config"):
        raise ValueError(
            f"{path} holds no recipe (config), so the training data cannot be rebuilt; use a checkpoint written by "
            "`slimmable train`"
        )
    cfg = RunConfig.from_dict(ckpt["config"], source=f"recipe saved in {path}")
    return ckpt, loaded.model, cfg


def training_splits(cfg: RunConfig, root: str | None = None, cache_dir: str | os.PathLike[str] | None = None) -> Any:
    """The recipe's data as its task builds it, every split without augmentation (training images as the
    evaluation sees them).

    The held-out ``val`` split is the one the run held out (same ``data.val_size`` and ``data.split_seed``), so it
    holds no image the model trained on.
    """
    from ..tasks import create_task

    dc = dataclasses.replace(cfg.data, root=root or cfg.data.root, augment="none", hflip=False)
    return create_task(cfg).load_data(dataclasses.replace(cfg, data=dc), cache_dir)


def require_classifier(model: nn.Module, command: str) -> None:
    """``command`` (BN calibration, channel search) scores widths by held-out top-1: classification only.

    Raises:
        ValueError: the model serves another task.
    """
    from ..tasks import task_of

    task = task_of(model)
    if task.name != "classification":
        raise ValueError(
            f"slimmable {command} scores widths by held-out top-1 and takes classification checkpoints; this one is "
            f"a {task.name} model (evaluate it with `slimmable eval`)"
        )
