"""Write a dense export to a file: ONNX (verified with onnxruntime), TorchScript, ``torch.export`` (``.pt2``), or
a pickled module; each is an :class:`~slimmable.export.exporter.Exporter` registered in
:mod:`slimmable.export.registry` (OpenVINO is in :mod:`slimmable.export.openvino_ir`).

ONNX exporter choice (PyTorch 2.14): ``torch.onnx.export(..., dynamo=True)`` is PyTorch's default and supported
exporter; it traces with ``torch.export`` and needs the ``onnxscript`` package (in the ``export`` extra). The
TorchScript-based exporter (``dynamo=False``) still works offline without extra packages but is deprecated (it
warns "will be removed"). ``exporter="auto"`` uses the dynamo exporter when ``onnxscript`` is installed and falls
back to the TorchScript one with a warning otherwise. Both give a dynamic batch dimension and match PyTorch to
~1e-7 on the registered models.

TorchScript itself (``torch.jit.trace``) is deprecated since PyTorch 2.9 in favour of ``torch.export``; it is
offered because many C++/mobile runtimes still load it. ``torch.export`` files (``torch.export.save``) load with
``torch.export.load(path).module()`` and no slimmable import; the batch dimension is dynamic.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import (
    INPUT_NAME,
    OUTPUT_NAME,
    ExportResult,
    _is_detection,
    atomic_path,
    compare_outputs,
    eval_mode,
    ort_session,
)
from .dense import example_input, input_shape, prepare_dense
from .detection import export_detector_onnx
from .exporter import VERIFY_BATCHES, Exporter

__all__ = [
    "ONNX",
    "PICKLE",
    "TORCHSCRIPT",
    "TORCH_EXPORT",
    "ExportResult",
    "export_onnx",
    "export_torchscript",
    "prepare_dense",
    "save_dense",
    "verify_onnx",
]

_logger = logging.getLogger(__name__)

_EXPORTERS = ("auto", "dynamo", "torchscript")
#: default opsets: what each exporter in PyTorch 2.14 handles best
_DEFAULT_OPSET = {"dynamo": 18, "torchscript": 17}
#: the largest batch the dynamic batch dimension of ONNX and torch.export graphs admits
_MAX_BATCH = 1 << 16

# ---------------------------------------------------------------------------------------------------- ONNX


def missing_onnx_packages(verify: bool = True) -> list[str]:
    """The packages ONNX export needs that are not installed: ``onnx`` (both exporters write with it), and
    ``onnxruntime`` to ``verify``. All are in the ``export`` extra; a plain ``pip install slimmable`` lacks them."""
    return ONNX.missing(verify)


def require_onnx(verify: bool = True) -> None:
    """Refuse ONNX export before any work when its packages are missing, naming the extra to install.

    Raises:
        ImportError: ``onnx`` (or ``onnxruntime`` with ``verify``) is not installed.
    """
    ONNX.require(verify)


def _pick_exporter(exporter: str) -> str:
    if exporter not in _EXPORTERS:
        raise ValueError(f"exporter {exporter!r} is not one of {_EXPORTERS}")
    if exporter == "torchscript":
        return exporter
    has_onnxscript = importlib.util.find_spec("onnxscript") is not None
    if exporter == "dynamo" and not has_onnxscript:
        raise ImportError(
            "the dynamo ONNX exporter needs the onnxscript package: pip install 'slimmable[export]' (or onnxscript), "
            "or pass exporter='torchscript'"
        )
    if not has_onnxscript:
        warnings.warn(
            "onnxscript is not installed, so ONNX export falls back to PyTorch's deprecated TorchScript-based "
            "exporter; pip install 'slimmable[export]' to use the default dynamo exporter",
            stacklevel=3,
        )
        return "torchscript"
    return "dynamo"


def write_onnx(
    dense: nn.Module,
    path: str | os.PathLike[str],
    example_input: torch.Tensor,
    *,
    exporter: str = "auto",
    opset: int | None = None,
    dynamic_batch: bool = True,
    output_name: str = OUTPUT_NAME,
) -> dict[str, Any]:
    """Write a dense classification module (eval mode) to ONNX, traced at ``example_input``.

    One input ``input`` ``(N, C, H, W)`` (``N`` dynamic when ``dynamic_batch``), one output ``output_name``
    (default ``logits``).

    Returns:
        ``{"exporter": "dynamo" | "torchscript", "opset": int}``.
    """
    which = _pick_exporter(exporter)
    opset = opset or _DEFAULT_OPSET[which]
    if which == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
        torch.onnx.export(
            dense,
            (example_input,),
            path,
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[output_name],
            opset_version=opset,
            dynamic_shapes=({0: batch},) if dynamic_batch else None,
            external_data=False,
            verbose=False,
        )
    else:
        with warnings.catch_warnings():
            # The deprecation is documented above; the tracer warns about ShuffleNet's split-by-channels, whose
            # channel count is static, so the trace is exact.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                dense,
                (example_input,),
                path,
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[output_name],
                opset_version=opset,
                dynamic_axes={INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None,
            )
    return {"exporter": which, "opset": opset}


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    width: float | None = None,
    channels: Mapping[str, int] | None = None,
    input_size: int | Sequence[int] | None = None,
    opset: int | None = None,
    dynamic_batch: bool = True,
    fold_bn: bool = False,
    exporter: str = "auto",
    verify: bool = True,
    atol: float = 1e-4,
    output_name: str = OUTPUT_NAME,
) -> ExportResult:
    """Export ``model`` (at ``width``, with ``channels``, or already dense) to an ONNX file.

    The graph has one input ``input`` of shape ``(N, C, H, W)`` (``N`` dynamic when ``dynamic_batch``) and one
    output ``logits`` ``(N, num_classes)`` (a segmenter's: its ``out`` logits ``(N, K, H, W)``, also named
    ``logits`` unless ``output_name`` says otherwise). The file is written atomically. A torchvision R-CNN detector is
    exported by :func:`slimmable.export.detection.export_detector_onnx` (one image in; boxes, labels, scores,
    masks or keypoints out; the TorchScript-based exporter).

    Args:
        model: a slimmable model or a dense module.
        path: the ``.onnx`` file to write.
        width: export this width of a slimmable model (default: its current width).
        channels: export this ChannelSpec instead.
        input_size: image side, or ``(C, H, W)`` (default 224; a detector: the side it resizes images to).
        opset: ONNX opset (default 18 for the dynamo exporter, 17 for the TorchScript one).
        dynamic_batch: make the batch dimension dynamic.
        fold_bn: fold BN into convolutions first.
        exporter: ``"auto"``, ``"dynamo"`` or ``"torchscript"`` (see the module docstring).
        verify: run the file with onnxruntime on batches of 1 and 3 (1 only for a static batch) and compare with
            PyTorch.
        atol: largest allowed difference, relative to the output's magnitude when that exceeds 1.
        output_name: the name of the graph's output (a Triton repository names a segmenter's ``out``); not for
            detectors, whose outputs are named by :func:`~slimmable.export.detection.detector_output_names`.

    Returns:
        An :class:`ExportResult` with the measured difference.

    Raises:
        ValueError: bad arguments (see :func:`prepare_dense`), ``exporter`` unknown, or ``output_name`` for a
            detector.
        ImportError: ``onnx`` is not installed, ``exporter="dynamo"`` without onnxscript, or ``verify`` without
            onnxruntime (checked before any work).
        RuntimeError: onnxruntime's output differs from PyTorch's by more than ``atol``.
    """
    require_onnx(verify)
    if _is_detection(model):
        if output_name != OUTPUT_NAME:
            raise ValueError(
                f"output_name={output_name!r} is for single-output graphs; a detector's outputs are named by its kind "
                "(boxes, labels, scores, ...): drop output_name"
            )
        return _export_detector(model, path, width, channels, input_size, opset, fold_bn, exporter, verify, atol)
    which = _pick_exporter(exporter)
    dense = prepare_dense(model, width=width, channels=channels, fold_bn=fold_bn)
    shape = input_shape(dense, 224 if input_size is None else input_size)
    with eval_mode(dense), atomic_path(path) as tmp:
        x = example_input(dense, shape, batch_size=2 if dynamic_batch else 1)
        info = write_onnx(
            dense, tmp, x, exporter=which, opset=opset, dynamic_batch=dynamic_batch, output_name=output_name
        )
        diff = None
        if verify:
            batches = VERIFY_BATCHES if dynamic_batch else (1,)
            inputs = [example_input(dense, shape, b, seed=10 + b) for b in batches]
            diff = verify_onnx(tmp, dense, inputs, atol, where=path)
    w = (getattr(dense, "export_info", None) or {}).get("width")
    _logger.debug("wrote %s (%s exporter, opset %d, max diff %s)", path, info["exporter"], info["opset"], diff)
    return ExportResult(Path(path), "onnx", w, diff, info["exporter"], info["opset"])


def _export_detector(
    model: nn.Module,
    path: str | os.PathLike[str],
    width: float | None,
    channels: Mapping[str, int] | None,
    input_size: int | Sequence[int] | None,
    opset: int | None,
    fold_bn: bool,
    exporter: str,
    verify: bool,
    atol: float,
) -> ExportResult:
    if exporter == "dynamo":
        raise ValueError(
            "torchvision's detectors export with the TorchScript-based exporter only (the dynamo exporter does not "
            "handle their data-dependent numbers of proposals and detections); use exporter='torchscript' or 'auto'"
        )
    if channels is not None or fold_bn:
        raise ValueError("detectors export at a width; drop channels= and fold_bn= (BN folding is not offered)")
    return export_detector_onnx(model, path, width=width, input_size=input_size, opset=opset, verify=verify, atol=atol)


def load_onnx(path: str | os.PathLike[str], threads: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """An onnxruntime CPU session for ``path`` as a function: a batch in, the first output out."""
    sess = ort_session(path, threads)
    name = sess.get_inputs()[0].name
    return lambda x: torch.from_numpy(sess.run(None, {name: x.float().cpu().numpy()})[0])


def verify_onnx(
    path: str | os.PathLike[str],
    reference: nn.Module,
    inputs: Sequence[torch.Tensor],
    atol: float = 1e-4,
    *,
    where: str | os.PathLike[str] | None = None,
) -> float:
    """Run an ONNX file with onnxruntime (CPU) on ``inputs`` and compare with ``reference``.

    Args:
        where: the file to name in messages (default ``path``; an export verifies its temporary file).

    Returns:
        The largest absolute difference over all inputs.

    Raises:
        ImportError: onnxruntime is not installed.
        RuntimeError: a difference exceeds ``atol`` (relative to the output's magnitude when that exceeds 1).
    """
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ImportError(f"verifying ONNX needs onnxruntime: {ONNX.pip}") from err
    return compare_outputs(
        load_onnx(path), reference, inputs, atol, where=str(where or path), runtime=f"onnxruntime {ort.__version__}"
    )


ONNX = Exporter(
    name="onnx",
    suffix=".onnx",
    title="ONNX",
    runtime="onnxruntime",
    write=write_onnx,
    load=load_onnx,
    requires=("onnx",),
    runtime_requires=("onnxruntime",),
    atol=1e-4,
    detection=True,
    export_fn=export_onnx,  # detectors, the exporter choice and a static batch: export_onnx's own path
    description="ONNX graph (torch.onnx, dynamo exporter), checked with onnxruntime; detectors too",
)

# ---------------------------------------------------------------------------------------------------- TorchScript


def write_torchscript(dense: nn.Module, path: str | os.PathLike[str], example_input: torch.Tensor) -> None:
    """Trace ``dense`` with ``torch.jit.trace`` and save it (the traced ``size`` ops keep the batch dynamic)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notices (see the module docstring)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(dense, example_input, check_trace=False)
        with open(path, "wb") as f:  # a file object: a full disk raises OSError, not an abort in torch's writer
            torch.jit.save(traced, f)


def load_torchscript(
    path: str | os.PathLike[str], threads: int | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.jit.load`` on CPU, run without gradients (``threads``: ignored, torch's count applies)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    return _no_grad(module)


TORCHSCRIPT = Exporter(
    name="torchscript",
    suffix=".ts",
    title="TorchScript",
    runtime="torch.jit",
    write=write_torchscript,
    load=load_torchscript,
    atol=1e-5,
    description="torch.jit.trace (deprecated by PyTorch; C++/mobile runtimes still load it)",
)


def export_torchscript(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    width: float | None = None,
    channels: Mapping[str, int] | None = None,
    input_size: int | Sequence[int] = 224,
    fold_bn: bool = False,
    verify: bool = True,
    atol: float = 1e-5,
) -> ExportResult:
    """Trace the dense module with ``torch.jit.trace`` and save it (deprecated format; see the module docstring).

    The trace keeps the batch dimension dynamic (sizes are read with traced ``size`` ops). Load it with
    ``torch.jit.load(path)``; no slimmable import is needed.

    Raises:
        RuntimeError: the reloaded file differs from the module by more than ``atol`` at batch 1 or 3.
    """
    return TORCHSCRIPT.export(
        model, path, width=width, channels=channels, input_size=input_size, fold_bn=fold_bn, verify=verify, atol=atol
    )


# ---------------------------------------------------------------------------------------------------- torch.export


def write_torch_export(dense: nn.Module, path: str | os.PathLike[str], example_input: torch.Tensor) -> None:
    """``torch.export.export`` with a dynamic batch dimension, saved with ``torch.export.save``."""
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    program = torch.export.export(dense, (example_input,), dynamic_shapes=({0: batch},))
    with open(path, "wb") as f:
        torch.export.save(program, f)


def load_torch_export(
    path: str | os.PathLike[str], threads: int | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.export.load(path).module()``, run without gradients (``threads``: ignored, torch's count applies)."""
    with open(path, "rb") as f:  # a file object: torch.export.load wants a .pt2 name, an export checks a temporary
        program = torch.export.load(f)
    return _no_grad(program.module())


TORCH_EXPORT = Exporter(
    name="pt2",
    suffix=".pt2",
    title="torch.export",
    runtime="torch.export",
    write=write_torch_export,
    load=load_torch_export,
    atol=1e-5,
    description="torch.export ExportedProgram (torch.export.save), PyTorch's successor to TorchScript",
)

# ---------------------------------------------------------------------------------------------------- pickled module


def write_pickle(dense: nn.Module, path: str | os.PathLike[str], example_input: torch.Tensor | None = None) -> None:
    """``torch.save({"format_version": 1, "model": dense, "export_info": ...})`` (``example_input``: unused)."""
    info = dict(getattr(dense, "export_info", None) or {})
    with open(path, "wb") as f:  # a file object: a full disk raises OSError naming the file (see atomic_path)
        torch.save({"format_version": 1, "model": dense, "export_info": info}, f)


def load_pickle(path: str | os.PathLike[str], threads: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Unpickle the module (only files you trust) and run it without gradients."""
    return _no_grad(torch.load(path, map_location="cpu", weights_only=False)["model"].eval())


PICKLE = Exporter(
    name="pt",
    suffix=".pt",
    title="pickled module",
    runtime="torch.load",
    write=write_pickle,
    load=load_pickle,
    atol=1e-5,
    detection=True,
    description="the dense nn.Module pickled with torch.save (loads where slimmable is importable); detectors too",
)


def save_dense(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    width: float | None = None,
    channels: Mapping[str, int] | None = None,
    fold_bn: bool = False,
) -> ExportResult:
    """Save the dense module with ``torch.save`` as ``{"format_version": 1, "model": module, "export_info": ...}``.

    The file is a pickle of the module: load it with ``torch.load(path, weights_only=False)`` (only for files
    you trust) in an environment where ``slimmable`` is importable (the module keeps its model family's class).
    Not verified (unpickling gives the same module); ``PICKLE.export(..., verify=True)`` runs it back.
    """
    return PICKLE.export(model, path, width=width, channels=channels, fold_bn=fold_bn, verify=False)


def _no_grad(module: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return run
