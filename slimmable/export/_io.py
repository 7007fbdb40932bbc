"""File helpers of the export package: atomic writes and deterministic file names."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping

from torch import nn

from .._utils import atomic_path, write_json

__all__ = ["atomic_path", "model_label", "sha256_file", "spec_tag", "tensor_bytes", "width_tag", "write_json"]


def width_tag(width: float) -> str:
    """File-name tag of a width: ``0.35`` → ``w0.35``, ``1.0`` → ``w1``."""
    return f"w{float(width):g}"


def spec_tag(spec: Mapping[str, int]) -> str:
    """File-name tag of a ChannelSpec: ``c`` + the first 10 hex digits of the SHA-256 of its sorted JSON."""
    blob = json.dumps({str(k): int(v) for k, v in spec.items()}, sort_keys=True).encode()
    return "c" + hashlib.sha256(blob).hexdigest()[:10]


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_label(model: nn.Module) -> str:
    """A short name for file names: the registered name if the model carries one, else its class name."""
    return getattr(model, "model_name", "") or type(model).__name__


def tensor_bytes(module: nn.Module) -> int:
    """Bytes held by the parameters and buffers of ``module``, each storage counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if t is None or t.device.type == "meta":
            continue
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total
