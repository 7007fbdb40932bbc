"""OpenVINO IR export (``model.xml`` + ``model.bin``), checked with OpenVINO's CPU plugin.

The dense module is converted directly from PyTorch with ``openvino.convert_model`` (OpenVINO traces it; no ONNX
file needed), with a dynamic batch dimension and the ONNX export's tensor names (``input``, ``logits``), and saved
with ``openvino.save_model``. (Going through an ONNX file and OpenVINO's ONNX reader instead was tried: in a process
that also runs the ``onnx`` package, a later Python call crashed after a few dozen such conversions.)

OpenVINO sends anonymous usage statistics on import and on conversion unless the user opted out (``opt_in_out
--opt_out``); a library should not do that on its users' behalf, so :func:`import_openvino` imports it with
``CI=true``, OpenVINO's switch that declines for the whole process, conversions included (a user who imported
``openvino`` first keeps the choice they made). Two numerics choices keep the file equal to PyTorch's float32
model, as the other formats are:

* weights are saved in float32 (``compress_to_fp16=False``; OpenVINO's default halves the file but rounds every
  weight to float16);
* :func:`load_openvino` compiles with ``INFERENCE_PRECISION_HINT=f32``: on CPUs with AVX512-BF16 or AMX the CPU
  plugin otherwise computes in bfloat16 (1.5e-3 off on slim_mobilenet_v2, against ~2e-7 in float32).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ._io import INPUT_NAME, OUTPUT_NAME
from .exporter import Exporter

__all__ = ["OPENVINO", "import_openvino", "load_openvino", "write_openvino"]


def import_openvino() -> Any:
    """``import openvino`` with its usage statistics declined for this process (see the module docstring); the
    environment is restored afterwards. An ``openvino`` already imported is returned as it is."""
    if "openvino" in sys.modules:
        return sys.modules["openvino"]
    before = os.environ.get("CI")
    os.environ["CI"] = "true"  # read once, when OpenVINO's telemetry singleton is made at import
    try:
        import openvino
    finally:
        if before is None:
            os.environ.pop("CI", None)
        else:
            os.environ["CI"] = before
    return openvino


def write_openvino(
    dense: nn.Module, path: str | os.PathLike[str], example_input: torch.Tensor, *, compress_to_fp16: bool = False
) -> dict[str, Any]:
    """Convert ``dense`` (eval mode) with ``openvino.convert_model`` and save ``path`` (``.xml``) and its ``.bin``.

    Args:
        compress_to_fp16: store weights as float16 (half the file; no longer equal to PyTorch within 1e-4).
    """
    ov = import_openvino()
    shape = [-1, *example_input.shape[1:]]  # the batch dynamic, the image size as traced
    with torch.no_grad(), warnings.catch_warnings():
        # convert_model traces with torch.jit, whose deprecation notices and tracer warnings say nothing here;
        # the comparison with PyTorch checks the result
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        model = ov.convert_model(dense, example_input=example_input, input=[shape])
    model.inputs[0].get_tensor().set_names({INPUT_NAME})
    model.outputs[0].get_tensor().set_names({OUTPUT_NAME})
    ov.save_model(model, str(path), compress_to_fp16=compress_to_fp16)
    return {}


def load_openvino(
    path: str | os.PathLike[str], threads: int | None = None, precision: str = "f32"
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Compile ``path`` for OpenVINO's CPU plugin (latency mode, ``threads`` threads, default torch's count).

    Args:
        precision: ``INFERENCE_PRECISION_HINT``: ``"f32"`` (equal to PyTorch's float32; see the module docstring),
            or ``"bf16"``/``"f16"`` where the CPU supports them (faster, ~1e-3 off).
    """
    ov = import_openvino()
    config = {
        "INFERENCE_PRECISION_HINT": precision,
        "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
        "PERFORMANCE_HINT": "LATENCY",
    }
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> torch.Tensor:
        out = request.infer({0: x.float().cpu().numpy()})[0]
        return torch.from_numpy(np.array(out, copy=True))  # the request reuses its output buffer

    return run


OPENVINO = Exporter(
    name="openvino",
    suffix=".xml",
    title="OpenVINO",
    runtime="openvino",
    write=write_openvino,
    load=load_openvino,
    requires=("openvino",),
    runtime_requires=("openvino",),
    pip="pip install 'slimmable[openvino]' (or pip install openvino)",
    companions=(".bin",),
    atol=1e-4,
    description="OpenVINO IR (.xml + .bin, float32 weights), checked with OpenVINO's CPU plugin",
)
