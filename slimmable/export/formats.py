"""Write a dense export to a file: ONNX (verified with onnxruntime), TorchScript, or a pickled module.

ONNX exporter choice (PyTorch 2.14): ``torch.onnx.export(..., dynamo=True)`` is PyTorch's default and supported
exporter; it traces with ``torch.export`` and needs the ``onnxscript`` package (in the ``export`` extra). The
TorchScript-based exporter (``dynamo=False``) still works offline without extra packages but is deprecated (it
warns "will be removed"). ``exporter="auto"`` uses the dynamo exporter when ``onnxscript`` is installed and falls
back to the TorchScript one with a warning otherwise. Both give a dynamic batch dimension and match PyTorch to
~1e-7 on the registered models.

TorchScript itself (``torch.jit.trace``) is deprecated since PyTorch 2.9 in favour of ``torch.export``; it is
offered because the issue asks for it and many C++/mobile runtimes still load it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._utils import save_torch
from ..nn import get_width
from ..search.cost import is_detector
from ._io import atomic_path
from .dense import example_input, export_channels, export_width, input_shape, is_dense

__all__ = ["ExportResult", "export_onnx", "export_torchscript", "prepare_dense", "save_dense", "verify_onnx"]

_logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
_EXPORTERS = ("auto", "dynamo", "torchscript")
#: default opsets: what each exporter in PyTorch 2.14 handles best
_DEFAULT_OPSET = {"dynamo": 18, "torchscript": 17}
#: batch sizes the verification runs, to check the dynamic batch dimension
_VERIFY_BATCHES = (1, 3)


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote.

    Attributes:
        path: the file.
        format: ``"onnx"``, ``"torchscript"`` or ``"pt"``.
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


def prepare_dense(
    model: nn.Module,
    *,
    width: float | None = None,
    channels: Mapping[str, int] | None = None,
    fold_bn: bool = False,
) -> nn.Module:
    """The dense module to write: ``model`` itself when it is already dense, else its export.

    Args:
        model: a slimmable model or a dense module (from :func:`export_width`).
        width: export at this width.
        channels: export with this ChannelSpec (exclusive with ``width``).
        fold_bn: fold BN into convolutions when exporting a slimmable model.

    Raises:
        ValueError: both ``width`` and ``channels``, or either given with a dense module.
    """
    if width is not None and channels is not None:
        raise ValueError("give either width or channels, not both")
    if is_dense(model):
        if width is not None or channels is not None:
            raise ValueError(
                f"{type(model).__name__} is already dense (no slimmable layers); drop width/channels, or pass the "
                "slimmable model instead"
            )
        return model
    if channels is not None:
        return export_channels(model, channels, fold_bn=fold_bn)
    if width is None:
        width = get_width(model)
        if width is None:  # per-layer channels were set: export the current state
            return export_channels(model, {}, fold_bn=fold_bn)
    return export_width(model, width, fold_bn=fold_bn)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def missing_onnx_packages(verify: bool = True) -> list[str]:
    """The packages ONNX export needs that are not installed: ``onnx`` (both exporters write with it), and
    ``onnxruntime`` to ``verify``. All are in the ``export`` extra; a plain ``pip install slimmable`` lacks them."""
    wanted = ("onnx", "onnxruntime") if verify else ("onnx",)
    return [m for m in wanted if importlib.util.find_spec(m) is None]


def require_onnx(verify: bool = True) -> None:
    """Refuse ONNX export before any work when its packages are missing, naming the extra to install.

    Raises:
        ImportError: ``onnx`` (or ``onnxruntime`` with ``verify``) is not installed.
    """
    missing = missing_onnx_packages(verify)
    if missing:
        raise ImportError(
            f"ONNX export needs {' and '.join(missing)}, not installed: pip install 'slimmable[export]' "
            "(or export with --format pt / torchscript)"
        )


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


def _output_scale(ref: torch.Tensor) -> float:
    return max(1.0, float(ref.abs().max()))


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
) -> ExportResult:
    """Export ``model`` (at ``width``, with ``channels``, or already dense) to an ONNX file.

    The graph has one input ``input`` of shape ``(N, C, H, W)`` (``N`` dynamic when ``dynamic_batch``) and one
    output ``logits`` ``(N, num_classes)``. The file is written atomically. A torchvision R-CNN detector is
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

    Returns:
        An :class:`ExportResult` with the measured difference.

    Raises:
        ValueError: bad arguments (see :func:`prepare_dense`), or ``exporter`` unknown.
        ImportError: ``onnx`` is not installed, ``exporter="dynamo"`` without onnxscript, or ``verify`` without
            onnxruntime (checked before any work).
        RuntimeError: onnxruntime's output differs from PyTorch's by more than ``atol``.
    """
    require_onnx(verify)
    if is_detector(model):
        return _export_detector(model, path, width, channels, input_size, opset, fold_bn, exporter, verify, atol)
    which = _pick_exporter(exporter)
    dense = prepare_dense(model, width=width, channels=channels, fold_bn=fold_bn)
    shape = input_shape(dense, 224 if input_size is None else input_size)
    opset = opset or _DEFAULT_OPSET[which]
    with _eval_mode(dense), atomic_path(path) as tmp:
        x = example_input(dense, shape, batch_size=2 if dynamic_batch else 1)
        if which == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=1 << 16)
            torch.onnx.export(
                dense,
                (x,),
                tmp,
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
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
                    (x,),
                    tmp,
                    dynamo=False,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    opset_version=opset,
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None,
                )
        diff = None
        if verify:
            batches = _VERIFY_BATCHES if dynamic_batch else (1,)
            diff = verify_onnx(tmp, dense, [example_input(dense, shape, b, seed=10 + b) for b in batches], atol)
    w = (getattr(dense, "export_info", None) or {}).get("width")
    _logger.debug("wrote %s (%s exporter, opset %d, max diff %s)", path, which, opset, diff)
    return ExportResult(Path(path), "onnx", w, diff, which, opset)


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
    from .detection import export_detector_onnx

    if exporter == "dynamo":
        raise ValueError(
            "torchvision's detectors export with the TorchScript-based exporter only (the dynamo exporter does not "
            "handle their data-dependent numbers of proposals and detections); use exporter='torchscript' or 'auto'"
        )
    if channels is not None or fold_bn:
        raise ValueError("detectors export at a width; drop channels= and fold_bn= (BN folding is not offered)")
    return export_detector_onnx(model, path, width=width, input_size=input_size, opset=opset, verify=verify, atol=atol)


def verify_onnx(
    path: str | os.PathLike[str], reference: nn.Module, inputs: Sequence[torch.Tensor], atol: float = 1e-4
) -> float:
    """Run an ONNX file with onnxruntime (CPU) on ``inputs`` and compare with ``reference``.

    Returns:
        The largest absolute difference over all inputs.

    Raises:
        ImportError: onnxruntime is not installed.
        RuntimeError: a difference exceeds ``atol`` (relative to the output's magnitude when that exceeds 1).
    """
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ImportError("verifying ONNX needs onnxruntime: pip install 'slimmable[export]'") from err
    sess = ort_session(path)
    worst = 0.0
    with _eval_mode(reference), torch.no_grad():
        for x in inputs:
            ref = reference(x).float().cpu()
            got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.float().cpu().numpy()})[0])
            if got.shape != ref.shape:
                raise RuntimeError(f"{path}: onnxruntime gave shape {tuple(got.shape)}, PyTorch {tuple(ref.shape)}")
            diff = float((got - ref).abs().max())
            worst = max(worst, diff)
            if diff > atol * _output_scale(ref):
                raise RuntimeError(
                    f"{path}: onnxruntime differs from PyTorch by {diff:.3g} at batch {x.shape[0]} "
                    f"(allowed {atol:g} x output scale {_output_scale(ref):.3g}, onnxruntime {ort.__version__})"
                )
    return worst


def ort_session(path: str | os.PathLike[str], threads: int | None = None) -> Any:
    """An onnxruntime CPU session for ``path`` with ``threads`` intra-op threads (default: torch's count)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


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
    dense = prepare_dense(model, width=width, channels=channels, fold_bn=fold_bn)
    shape = input_shape(dense, input_size)
    with _eval_mode(dense), atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notices (see the module docstring)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(dense, example_input(dense, shape, batch_size=2), check_trace=False)
        with open(tmp, "wb") as f:  # a file object: a full disk raises OSError, not an abort in torch's writer
            torch.jit.save(traced, f)
        diff = None
        if verify:
            loaded = torch.jit.load(str(tmp), map_location="cpu")
            diff = 0.0
            for b in _VERIFY_BATCHES:
                x = example_input(dense, shape, b, seed=20 + b)
                ref = dense(x)
                d = float((loaded(x.cpu()) - ref.cpu()).abs().max())
                diff = max(diff, d)
                if d > atol * _output_scale(ref):
                    raise RuntimeError(f"{path}: the TorchScript module differs from PyTorch by {d:.3g} at batch {b}")
    w = (getattr(dense, "export_info", None) or {}).get("width")
    return ExportResult(Path(path), "torchscript", w, diff)


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
    """
    dense = prepare_dense(model, width=width, channels=channels, fold_bn=fold_bn)
    info = dict(getattr(dense, "export_info", None) or {})
    save_torch({"format_version": 1, "model": dense, "export_info": info}, path)
    return ExportResult(Path(path), "pt", info.get("width"))
