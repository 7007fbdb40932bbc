"""Deployment export: a width or ChannelSpec as a plain dense ``nn.Module``; ONNX, TorchScript, ``torch.export``,
OpenVINO and pickled files; all-width bundles.

``export_width(model, 0.5)`` returns an ordinary PyTorch module (``nn.Conv2d``/``nn.BatchNorm2d``/``nn.Linear``)
equal to the slimmable model at width 0.5. Each file format is an :class:`Exporter` in a registry
(``get_exporter("openvino").export(model, "m.xml", width=0.5)``, :func:`list_exporters`): it writes the file and
checks it against PyTorch with the format's runtime. ``export_onnx`` writes ONNX (checked with onnxruntime) and
``export_bundle`` writes every width in any registered format plus a manifest with MACs and latency;
``export_triton`` writes an NVIDIA Triton model repository (a version per width and a router model). Slimmable
detectors export the same way (``export_width`` gives a plain torchvision detector; ``export_onnx`` dispatches to
:func:`export_detector_onnx`).
"""

from ..checkpoint import LoadedModel, load_model
from ._io import ExportResult
from .bundle import MANIFEST_NAME, export_bundle
from .dense import (
    default_widths,
    example_input,
    export_channels,
    export_width,
    fold_batchnorm,
    is_dense,
    prepare_dense,
)
from .detection import export_detector_onnx, verify_detector_onnx
from .exporter import Exporter
from .formats import export_onnx, export_torchscript, save_dense, verify_onnx
from .registry import get_exporter, list_exporters, register_exporter
from .triton_repo import TritonRepository, export_triton

__all__ = [
    "MANIFEST_NAME",
    "ExportResult",
    "Exporter",
    "LoadedModel",
    "TritonRepository",
    "default_widths",
    "example_input",
    "export_bundle",
    "export_channels",
    "export_detector_onnx",
    "export_onnx",
    "export_torchscript",
    "export_triton",
    "export_width",
    "fold_batchnorm",
    "get_exporter",
    "is_dense",
    "list_exporters",
    "load_model",
    "prepare_dense",
    "register_exporter",
    "save_dense",
    "verify_detector_onnx",
    "verify_onnx",
]
