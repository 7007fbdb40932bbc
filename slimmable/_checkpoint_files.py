"""Reading checkpoint files and loading the official slimmable_networks checkpoints: the part of
:mod:`slimmable.checkpoint` that builds no model, so that model code (:mod:`slimmable.models.detection`) can load
official weights without importing the module that imports every model. :mod:`slimmable.checkpoint` re-exports
everything here; import it from there.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CheckpointError", "load_official_checkpoint", "official_state_dict", "read_checkpoint_file"]

_BN_SWITCH = re.compile(r"^(.*)\.bn\.(\d+)\.(weight|running_mean)$")


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message says why and what to do."""


def read_checkpoint_file(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with errors that name the problem.

    Raises:
        FileNotFoundError: the path does not exist.
        CheckpointError: the file is a folder, empty, truncated, corrupt, or holds arbitrary pickled objects.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist; check the path")
    if p.is_dir():
        raise CheckpointError(f"checkpoint path {p} is a folder; give the checkpoint file inside it")
    if p.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {p} is empty (0 bytes); the save was probably interrupted")
    with open(p, "rb") as f:
        data = f.read()
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as err:  # any unpickling failure of a file that is not a (complete) checkpoint: one line
        raise _load_error(p, data, err) from err


def _load_error(p: Path, data: bytes, err: Exception) -> CheckpointError:
    """Why ``torch.load`` refused ``p``, in one line, without torch's advice to load with ``weights_only=False``."""
    msg = str(err)
    if isinstance(err, pickle.UnpicklingError) and ("Unsupported global" in msg or "GLOBAL" in msg):
        return CheckpointError(
            f"checkpoint {p} holds Python objects beyond tensors and plain containers, which are not loaded "
            "for safety (weights_only=True). Re-save it as a plain state_dict"
        )
    head = data[:64]
    if not head.startswith(b"PK") and head[:1] != b"\x80":  # neither torch's zip format nor a binary pickle
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        desc = f"a text file starting with {text.splitlines()[0][:40]!r}" if text else "neither zip nor pickle data"
        return CheckpointError(f"{p} is not a PyTorch checkpoint ({desc}); give a .pt file written by torch.save")
    if "WeightsUnpickler error:" in msg:  # keep the reason, drop the suggestion around it
        msg = msg.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    reason = " ".join(msg.split())[:200] or type(err).__name__
    return CheckpointError(
        f"checkpoint {p} could not be read as tensors and plain containers ({type(err).__name__}: {reason}); "
        "it is truncated, damaged or not a PyTorch checkpoint: re-download it, or re-save it with "
        "torch.save(model.state_dict(), path)"
    )


# -- official checkpoints ---------------------------------------------------------------------------------------------


def official_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Extract the state dict of an official checkpoint and strip the ``module.`` prefix."""
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        sd = obj["model"]
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
    else:
        keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        hint = ""
        if isinstance(obj, Mapping) and "format_version" in obj:
            hint = " It is a checkpoint written by slimmable itself: load it with slimmable.checkpoint.load_model."
        raise CheckpointError(
            f"{source} is not an official slimmable_networks checkpoint: expected {{'model': state_dict}} or a "
            f"state_dict, found {keys}.{hint}"
        )
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{source}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k[len("module.") :] if k.startswith("module.") else k] = v
    return out


def _switch_channels(sd: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
    """Per switchable-BN layer, the channel count of each stored switch (ordered by switch index)."""
    found: dict[str, dict[int, int]] = {}
    for k, v in sd.items():
        m = _BN_SWITCH.match(k)
        if m and v.dim() == 1:
            found.setdefault(m.group(1), {})[int(m.group(2))] = v.shape[0]
    return {layer: [d[i] for i in sorted(d)] for layer, d in found.items()}


def _describe_mismatch(
    own: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], model: nn.Module, source: str
) -> str:
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    lines = [f"{source} does not fit {type(model).__name__}:"]
    ck_sw, own_sw = _switch_channels(sd), _switch_channels(own)
    common = [layer for layer in own_sw if layer in ck_sw]
    if common:
        layer = common[0]
        if len(ck_sw[layer]) != len(own_sw[layer]) or ck_sw[layer] != own_sw[layer]:
            widths = getattr(model, "widths", "?")
            lines.append(
                f"  widths differ: at {layer} the checkpoint's switches have channels {ck_sw[layer]} "
                f"({len(ck_sw[layer])} switches), the model's widths {widths} give {own_sw[layer]}. "
                "Build the model with the widths the checkpoint was trained with"
            )
    if missing:
        lines.append(f"  {len(missing)} keys missing from the checkpoint, e.g. {missing[:5]}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected keys in the checkpoint, e.g. {unexpected[:5]}")
    if shape:
        ex = [f"{k}: model {tuple(own[k].shape)} vs checkpoint {tuple(sd[k].shape)}" for k in shape[:5]]
        lines.append(f"  {len(shape)} keys with other shapes, e.g. " + "; ".join(ex))
    if (missing or unexpected) and not common:
        lines.append("  the layouts share no layers: is this checkpoint for another model family?")
    return "\n".join(lines)


def load_official_checkpoint(checkpoint: str | os.PathLike[str] | Mapping[str, Any], model: nn.Module) -> nn.Module:
    """Load an official slimmable_networks checkpoint into ``model``, all or nothing.

    Args:
        checkpoint: a path, or the object ``torch.load`` returned (``{'model': state_dict}`` or a state dict).
        model: the matching model, e.g. ``create_model("slim_mobilenet_v2")`` for ``s_mobilenet_v2``, built with
            the checkpoint's widths. Floating tensors are cast to the model's dtype (the official fp16 fixtures
            are upcast).

    Returns:
        ``model``, with the weights loaded.

    Raises:
        FileNotFoundError: no file at the path.
        CheckpointError: unreadable file, not an official checkpoint, or keys/shapes/widths that do not match; the
            model is left unchanged.
    """
    source = str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "checkpoint"
    obj = read_checkpoint_file(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    sd = official_state_dict(obj, source)
    own = model.state_dict()
    if set(own) != set(sd) or any(own[k].shape != sd[k].shape for k in own):
        raise CheckpointError(_describe_mismatch(own, sd, model, source))
    converted = {k: (v.to(own[k].dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    model.load_state_dict(converted, strict=True)
    return model
