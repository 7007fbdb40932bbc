"""Helpers shared by the export modules: atomic writes, file names, what an export wrote, and comparisons of an
exported file's outputs with PyTorch's.

The format modules (:mod:`.formats`, :mod:`.openvino_ir`), :mod:`.detection` and :mod:`.exporter` import from
here and :mod:`.dense`, never from each other's siblings in a circle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._utils import TEMP_SUFFIX, atomic_path, write_json

__all__ = [
    "ExportResult",
    "atomic_files",
    "atomic_path",
    "compare_outputs",
    "eval_mode",
    "model_label",
    "ort_session",
    "output_scale",
    "sha256_file",
    "spec_tag",
    "tensor_bytes",
    "width_tag",
    "write_json",
]

#: ONNX and OpenVINO graph input/output names of a classification export
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote.

    Attributes:
        path: the file (for a format with companion files, e.g. OpenVINO's ``.bin``, the one to open).
        format: the registered format name: ``"onnx"``, ``"torchscript"``, ``"pt2"``, ``"openvino"`` or ``"pt"``.
        width: the exported width (``None`` for a ChannelSpec or an already dense module).
        max_abs_diff: largest difference to the PyTorch module over the verification batches (``None``: not
            verified).
        exporter: ONNX only: ``"dynamo"`` or ``"torchscript"``.
        opset: ONNX only: the opset version.
    """

    path: Path
    format: str
    width: float | None
    max_abs_diff: float | None = None
    exporter: str | None = None
    opset: int | None = None


def _is_detection(model: nn.Module) -> bool:
    """Whether ``model``'s task is detection (list-of-images input, ONNX through :mod:`.detection`): the export
    package asks only here."""
    from ..tasks import task_of

    return task_of(model).name == "detection"


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


@contextlib.contextmanager
def atomic_files(path: str | os.PathLike[str], companions: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a temporary path to write ``path`` (and its companion files) to; on success move them into place.

    Without companions this is :func:`~slimmable._utils.atomic_path`. With companion suffixes (OpenVINO writes
    ``model.xml`` and ``model.bin``) the files are written into a temporary folder beside ``path`` under their
    final names (a writer may derive one name from the other), then each is renamed into place, the companions
    first and ``path`` last: a reader opening ``path`` finds its companions already there. On error nothing is
    moved and the temporary folder is removed.
    """
    if not companions:
        with atomic_path(path) as tmp:
            yield tmp
        return
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=final.parent))
    try:
        staged = stage / final.name
        yield staged
        for suffix in companions:
            os.replace(staged.with_suffix(suffix), final.with_suffix(suffix))
        os.replace(staged, final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the block; its training flag is restored after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def output_scale(ref: torch.Tensor) -> float:
    """The scale tolerances are relative to: the output's largest magnitude, at least 1."""
    return max(1.0, float(ref.abs().max()))


def compare_outputs(
    run: Callable[[torch.Tensor], torch.Tensor],
    reference: nn.Module,
    inputs: Sequence[torch.Tensor],
    atol: float,
    *,
    where: str,
    runtime: str,
) -> float:
    """Run ``run`` (an exported file, loaded) and ``reference`` on each input and compare the outputs.

    Args:
        run: the loaded file: a float32 CPU tensor in, its output out.
        reference: the PyTorch module (run in eval mode without gradients).
        inputs: the inputs; batch sizes may differ (a dynamic batch dimension).
        atol: largest allowed difference, relative to the output's magnitude when that exceeds 1.
        where: the file, for messages.
        runtime: what ran the file (``"onnxruntime 1.17"``), for messages.

    Returns:
        The largest absolute difference over all inputs.

    Raises:
        RuntimeError: a shape differs, or a difference exceeds the tolerance.
    """
    worst = 0.0
    with eval_mode(reference), torch.no_grad():
        for x in inputs:
            ref = reference(x).float().cpu()
            got = run(x.float().cpu()).float()
            if got.shape != ref.shape:
                raise RuntimeError(f"{where}: {runtime} gave shape {tuple(got.shape)}, PyTorch {tuple(ref.shape)}")
            diff = float((got - ref).abs().max())
            worst = max(worst, diff)
            if not diff <= atol * output_scale(ref):  # `not <=`: a NaN fails too
                raise RuntimeError(
                    f"{where}: {runtime} differs from PyTorch by {diff:.3g} at batch {x.shape[0]} "
                    f"(allowed {atol:g} x output scale {output_scale(ref):.3g})"
                )
    return worst


def ort_session(path: str | os.PathLike[str], threads: int | None = None) -> Any:
    """An onnxruntime CPU session for ``path`` with ``threads`` intra-op threads (default: torch's count)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
