"""One width of a slimmable model as a Triton Python-backend model (``slimmable export --format triton
--triton-backend python``).

This file is ``<name>/<version>/model.py``: it runs ``model.onnx`` beside it with onnxruntime, for Triton builds
without the ONNX Runtime backend (such as the one in ``nvidia-pytriton``). The input and output names come from the
model's ``config.pbtxt``; the requests of a dynamic batch run as one onnxruntime call. A GPU instance runs on
onnxruntime's CUDA provider when the installed onnxruntime has it, else on the CPU; the config parameter
``intra_op_thread_count`` (as for Triton's ONNX Runtime backend) sets onnxruntime's threads.

Triton's Python environment needs ``numpy`` and ``onnxruntime``; outside Triton the file imports without
``triton_python_backend_utils``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # outside Triton: importable, for tests
    pb_utils = None

#: the ONNX file beside this one
MODEL_FILE = "model.onnx"


def model_path(args: Mapping[str, str]) -> str:
    """``model.onnx`` of this model version: in the repository Triton names, else beside this file."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), MODEL_FILE)
    repo, version = args.get("model_repository"), args.get("model_version")
    if repo and version:
        named = os.path.join(repo, str(version), MODEL_FILE)
        if os.path.isfile(named):
            return named
    return here


def config_int(config: Mapping[str, Any], key: str) -> int | None:
    """The integer config parameter ``key`` (``parameters { key: ... value { string_value: "4" } }``), or ``None``.

    Raises:
        ValueError: the value is not a non-negative integer.
    """
    value = (config.get("parameters") or {}).get(key, {}).get("string_value")
    if value in (None, ""):
        return None
    if not str(value).strip().isdigit():
        raise ValueError(f"config parameter {key} must be a non-negative integer, got {value!r}")
    return int(value)


def split_batch(outputs: list, sizes: list) -> list:
    """The rows of each output array for each request: ``sizes[i]`` rows for request ``i``, in order."""
    parts = []
    start = 0
    for n in sizes:
        parts.append([np.ascontiguousarray(o[start : start + n]) for o in outputs])
        start += n
    return parts


class TritonPythonModel:
    """``model.onnx`` in an onnxruntime session; a dynamic batch runs as one call."""

    def initialize(self, args: Mapping[str, str]) -> None:
        if pb_utils is None:
            raise RuntimeError("this file is a Triton Python-backend model: serve its repository with tritonserver")
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_names = [o["name"] for o in config["output"]]
        self.path = model_path(args)
        opts = ort.SessionOptions()
        threads = config_int(config, "intra_op_thread_count")
        if threads:
            opts.intra_op_num_threads = threads
        providers: list = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            device = int(args.get("model_instance_device_id") or 0)
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device}))
        self.session = ort.InferenceSession(self.path, sess_options=opts, providers=providers)

    def execute(self, requests: list) -> list:
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        try:
            outputs = self.session.run(self.output_names, {self.input_name: batch})
        except Exception as err:  # onnxruntime's own errors: answer each request with the message
            error = pb_utils.TritonError(f"onnxruntime failed on {self.path}: {err}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, a) for n, a in zip(self.output_names, part)])
            for part in split_batch(outputs, [a.shape[0] for a in arrays])
        ]
