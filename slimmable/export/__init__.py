"""Deployment export: a width or ChannelSpec as a plain dense ``nn.Module``; ONNX, TorchScript, all-width bundles.

``export_width(model, 0.5)`` returns an ordinary PyTorch module (``nn.Conv2d``/``nn.BatchNorm2d``/``nn.Linear``)
equal to the slimmable model at width 0.5; ``export_onnx`` writes it to ONNX (checked with onnxruntime) and
``export_bundle`` writes every width plus a manifest with MACs and latency. Slimmable detectors export the same
way (``export_width`` gives a plain torchvision detector; ``export_onnx`` dispatches to
:func:`export_detector_onnx`).
"""

from ..checkpoint import LoadedModel, load_model
from .bundle import MANIFEST_NAME, export_bundle
from .dense import default_widths, example_input, export_channels, export_width, fold_batchnorm, is_dense
from .detection import export_detector_onnx, verify_detector_onnx
from .formats import ExportResult, export_onnx, export_torchscript, prepare_dense, save_dense, verify_onnx

__all__ = [
    "MANIFEST_NAME",
    "ExportResult",
    "LoadedModel",
    "default_widths",
    "example_input",
    "export_bundle",
    "export_channels",
    "export_detector_onnx",
    "export_onnx",
    "export_torchscript",
    "export_width",
    "fold_batchnorm",
    "is_dense",
    "load_model",
    "prepare_dense",
    "save_dense",
    "verify_detector_onnx",
    "verify_onnx",
]
