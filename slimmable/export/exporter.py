"""One export target as one value: :class:`Exporter` says how to write a dense module to a file, load the file
back, and check it against PyTorch; :mod:`slimmable.export.registry` lists the targets by name.

An exporter's ``write`` and ``load`` are plain functions; :meth:`Exporter.export` does the rest the same way for
every target: it builds the dense module at the requested width (or ChannelSpec), writes it atomically (the file
and its companions appear only once written and verified), runs the file on inputs of batch 1 and 3 and compares
with PyTorch.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..nn import use_width
from ._io import ExportResult, _is_detection, atomic_files, compare_outputs, eval_mode
from .dense import example_input, input_shape, prepare_dense

__all__ = ["EXPORT_PIP", "VERIFY_BATCHES", "Exporter"]

#: the install command of the ``export`` extra, which holds every optional export dependency
EXPORT_PIP = "pip install 'slimmable[export]'"
#: batch sizes a verification runs: a batch other than the traced one checks the dynamic batch dimension
VERIFY_BATCHES = (1, 3)

#: ``write(dense, path, example_input, **opts)``: writes ``path`` (and companions); returns facts for the result
WriteFn = Callable[..., Mapping[str, Any] | None]
#: ``load(path, threads=None)``: the file, ready to run: a float32 CPU batch in, the output tensor out
LoadFn = Callable[..., Callable[[torch.Tensor], torch.Tensor]]


@dataclass(frozen=True)
class Exporter:
    """An export target.

    Attributes:
        name: the registered name (``slimmable export --format NAME``, a bundle manifest's ``format``).
        suffix: the file suffix, with the dot (``".onnx"``).
        title: the name in messages (``"ONNX"``).
        runtime: what runs the file (``"onnxruntime"``), in messages and bundle latency keys.
        write: ``write(dense, path, example_input, **opts)`` writes the dense module (eval mode) to ``path``,
            traced at ``example_input`` (batch 2; ``None`` for a detector); returns extra :class:`ExportResult`
            fields (``exporter``, ``opset``) or ``None``.
        load: ``load(path, threads=None)`` returns a callable running the file on a float32 CPU tensor.
        requires: modules needed to write.
        runtime_requires: modules needed to load (and so to verify).
        pip: the install command naming the extra that provides ``requires``.
        companions: suffixes of files written beside ``path`` (OpenVINO: ``(".bin",)``).
        atol: default verification tolerance, relative to the output's magnitude when that exceeds 1.
        detection: whether the target takes torchvision detectors (written with ``example_input=None``; only an
            ``export_fn`` verifies detections).
        export_fn: replaces the generic :meth:`export` (ONNX: :func:`~slimmable.export.formats.export_onnx`, which
            dispatches detectors and has its own options); same keywords as :meth:`export`.
        description: one line for listings.
    """

    name: str
    suffix: str
    title: str
    runtime: str
    write: WriteFn
    load: LoadFn
    requires: tuple[str, ...] = ()
    runtime_requires: tuple[str, ...] = ()
    pip: str = EXPORT_PIP
    companions: tuple[str, ...] = ()
    atol: float = 1e-4
    detection: bool = False
    export_fn: Callable[..., ExportResult] | None = None
    description: str = ""

    def missing(self, verify: bool = True) -> list[str]:
        """The modules this target needs that are not installed (with ``verify``: to run the file too)."""
        wanted = dict.fromkeys(self.requires + (self.runtime_requires if verify else ()))  # once each, in order
        return [m for m in wanted if importlib.util.find_spec(m) is None]

    def available(self, verify: bool = True) -> bool:
        """Whether this target's optional dependencies are installed (with ``verify``: those to run it too)."""
        return not self.missing(verify)

    def require(self, verify: bool = True) -> None:
        """Refuse before any work when a dependency is missing.

        Raises:
            ImportError: naming the missing modules and the pip command that installs them.
        """
        missing = self.missing(verify)
        if missing:
            raise ImportError(f"{self.title} export needs {' and '.join(missing)}, not installed: {self.pip}")

    def files(self, path: str | os.PathLike[str]) -> list[Path]:
        """Every file an export to ``path`` writes: ``path`` first, then its companions."""
        p = Path(path)
        return [p, *(p.with_suffix(s) for s in self.companions)]

    def verify(
        self,
        path: str | os.PathLike[str],
        model: nn.Module,
        example_input: torch.Tensor | Sequence[torch.Tensor],
        *,
        width: float | None = None,
        atol: float | None = None,
        threads: int | None = None,
    ) -> float:
        """Run the file at ``path`` and compare its outputs with ``model``'s (eval mode, no gradients).

        Args:
            path: the exported file.
            model: the reference: a dense module, or a slimmable model (with ``width``: run at that width).
            example_input: one input or several (batch sizes may differ).
            width: switch a slimmable ``model`` to this width for the comparison (restored after).
            atol: tolerance (default: the target's), relative to the output's magnitude when that exceeds 1.
            threads: threads of the runtime (default: torch's count).

        Returns:
            The largest absolute difference.

        Raises:
            ImportError: the runtime is not installed.
            RuntimeError: a shape or a difference is off, naming the file, the batch and the difference.
        """
        self.require(verify=True)
        inputs = [example_input] if isinstance(example_input, torch.Tensor) else list(example_input)
        tol = self.atol if atol is None else atol
        run = self.load(path, threads=threads)
        if width is None:
            return compare_outputs(run, model, inputs, tol, where=str(path), runtime=self.runtime)
        with use_width(model, width):
            return compare_outputs(run, model, inputs, tol, where=str(path), runtime=self.runtime)

    def export(
        self,
        model: nn.Module,
        path: str | os.PathLike[str],
        *,
        width: float | None = None,
        channels: Mapping[str, int] | None = None,
        input_size: int | Sequence[int] | None = None,
        fold_bn: bool = False,
        verify: bool = True,
        atol: float | None = None,
        **opts: Any,
    ) -> ExportResult:
        """Export ``model`` (at ``width``, with ``channels``, or already dense) to ``path``.

        The dense module is traced on a batch of 2 (the batch dimension stays dynamic), written atomically, and
        with ``verify`` run from the file at batches 1 and 3 before it is moved into place.

        Args:
            model: a slimmable model or a dense module.
            path: the file to write (its companions go beside it).
            width: export this width of a slimmable model (default: its current width).
            channels: export this ChannelSpec instead.
            input_size: image side, or ``(C, H, W)`` (default 224).
            fold_bn: fold BN into convolutions first.
            verify: check the file against PyTorch.
            atol: tolerance of the check (default: the target's).
            **opts: options of the target's ``write`` (ONNX: ``exporter``, ``opset``, ``dynamic_batch``;
                OpenVINO: ``compress_to_fp16``).

        Returns:
            An :class:`ExportResult` with the measured difference.

        Raises:
            ImportError: a dependency is missing (checked before any work).
            ValueError: bad arguments, or a detector for a target that does not take detectors.
            RuntimeError: the file's outputs differ from PyTorch's.
        """
        self.require(verify)
        if self.export_fn is not None:
            tol = {} if atol is None else {"atol": atol}
            return self.export_fn(
                model,
                path,
                width=width,
                channels=channels,
                input_size=input_size,
                fold_bn=fold_bn,
                verify=verify,
                **tol,
                **opts,
            )
        detector = _is_detection(model)
        if detector and not self.detection:
            raise ValueError(
                f"{self.title} export does not take detectors; export them to ONNX (format 'onnx') or as a pickled "
                "module ('pt')"
            )
        dense = prepare_dense(model, width=width, channels=channels, fold_bn=fold_bn)
        shape = None if detector else input_shape(dense, 224 if input_size is None else input_size)
        with eval_mode(dense), atomic_files(path, self.companions) as tmp:
            example = None if detector else example_input(dense, shape, batch_size=2)
            info = dict(self.write(dense, tmp, example, **opts) or {})
            diff = None
            if verify and not detector:
                inputs = [example_input(dense, shape, b, seed=10 + b) for b in VERIFY_BATCHES]
                tol = self.atol if atol is None else atol
                diff = compare_outputs(self.load(tmp), dense, inputs, tol, where=str(path), runtime=self.runtime)
        w = (getattr(dense, "export_info", None) or {}).get("width")
        return ExportResult(Path(path), self.name, w, diff, **info)
