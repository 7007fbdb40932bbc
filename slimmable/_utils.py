"""Helpers shared across subpackages (no slimmable imports, so any module may use them)."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import reprlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "atomic_path",
    "example_input",
    "input_channels",
    "input_shape",
    "plain",
    "save_torch",
    "short_repr",
    "unwrap_model",
    "write_json",
    "write_text",
]

#: what :func:`atomic_path` names its temporary files: ``.<name>.<pid>.tmp`` (the run-folder cleanup matches it)
TEMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success rename it onto ``path``, on error delete it.

    Readers never see a half-written file, and a failed or killed write leaves the previous file intact. The
    temporary is ``.<name>.<pid>.tmp`` (one per process; :func:`slimmable.train.outputs.remove_stale_temporaries`
    removes those of dead processes).

    Args:
        path: the file to write.
        fsync: flush the temporary file to disk before the rename (checkpoints: the data survive a power cut).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tid = "" if threading.current_thread() is threading.main_thread() else f"-{threading.get_ident()}"
    tmp = final.with_name(f".{final.name}.{os.getpid()}{tid}{TEMP_SUFFIX}")
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, final)
    except OSError as err:  # full disk, quota: name the file being written, not the temporary (or nothing)
        if err.errno is None or err.filename not in (None, str(tmp)):
            raise
        raise OSError(
            err.errno, f"{err.strerror or err} (the previous {final.name}, if any, is intact)", str(final)
        ) from err
    except RuntimeError as err:  # torch.save(obj, path) on a full disk: "[enforce fail ...] unexpected pos"
        if not _disk_full(final.parent):
            raise
        reason = f"{os.strerror(errno.ENOSPC)} (the previous {final.name}, if any, is intact)"
        raise OSError(errno.ENOSPC, reason, str(final)) from err  # torch's message stays in the chain (-v)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _disk_full(folder: Path, margin: int = 1 << 20) -> bool:
    """Whether the file system of ``folder`` has less than ``margin`` bytes left (for root: its reserve too)."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # no statvfs on Windows
        return False
    blocks = st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail
    return blocks * st.f_frsize < margin


def save_torch(obj: Any, path: str | os.PathLike[str], *, fsync: bool = False) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_path`), through a Python file object.

    A full disk raises ``OSError(ENOSPC)`` naming ``path``: Python's writes raise it, and ``torch.save``'s own
    ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos`` is translated by :func:`atomic_path` when
    the file system is full.
    """
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def plain(obj: Any) -> Any:
    """Mappings as dicts and tuples as lists, recursively: the plain containers of YAML, JSON and checkpoints."""
    if isinstance(obj, Mapping):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def short_repr(value: Any, limit: int = 200) -> str:
    """``repr(value)`` cut to at most ``limit`` characters, for error messages that quote a value from a file.

    Long strings keep their start and end; long or deep containers are elided with ``...``. Only the quoted part
    of a huge value is ever copied (a 1 GiB string costs no more than a short one), and the result is one line.
    """
    short = reprlib.Repr()
    short.maxstring = short.maxlong = short.maxother = limit
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = short.maxfrozenset = 12
    short.maxlevel = 3
    try:
        text = short.repr(value)
    except (RecursionError, ValueError):  # a repr that fails (an int above Python's digit limit)
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def _finite(obj: Any) -> Any:
    """``obj`` with NaN/infinite floats as ``None``: valid JSON (``json.dumps`` would write a bare ``NaN``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON atomically; NaN and infinite numbers are written as ``null``."""
    return write_text(path, json.dumps(_finite(data), indent=2, allow_nan=False) + "\n")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile`` wrappers (nested too).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def input_channels(model: nn.Module) -> int:
    """Input channels of a model: those of its first convolution (or linear layer); 3 if it has neither."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
        if isinstance(m, nn.Linear):
            return int(m.in_features)
    return 3


def example_input(
    model: nn.Module, input_size: int | Sequence[int] | None = 16, batch_size: int = 1, seed: int | None = 0
) -> torch.Tensor:
    """A random input ``(batch_size, C, H, W)`` on the model's device and dtype.

    Args:
        model: the model (its first convolution gives ``C`` when ``input_size`` is an int).
        input_size: a square side ``H = W``, or ``(C, H, W)``; ``None``: the size the model was traced with when
            it records one (``example_input_size``, a converted model), else 16.
        batch_size: ``N``.
        seed: seed of a local generator (``None``: the global RNG).
    """
    if input_size is None:
        input_size = getattr(unwrap_model(model), "example_input_size", None) or 16
    shape = input_shape(model, input_size)
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return torch.randn((batch_size, *shape), generator=gen).to(device=device, dtype=dtype)


def input_shape(model: nn.Module, input_size: int | Sequence[int]) -> tuple[int, int, int]:
    """``(C, H, W)`` of an input: a square side with the model's input channels, or a given ``(C, H, W)``.

    Raises:
        TypeError, ValueError: ``input_size`` is neither a positive int nor a positive ``(C, H, W)`` triple.
    """
    if isinstance(input_size, bool):
        raise TypeError(f"input_size must be an int or (C, H, W), got {input_size!r}")
    if isinstance(input_size, int):
        if input_size < 1:
            raise ValueError(f"input_size {input_size} must be a positive image side such as 224")
        return (input_channels(model), input_size, input_size)
    shape = tuple(int(s) for s in input_size)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_size {tuple(input_size)} must be a side such as 224 or a (C, H, W) triple")
    return shape  # type: ignore[return-value]
