"""One width of a slimmable detector as an ONNX file, checked with onnxruntime.

torchvision's R-CNN detectors (Faster, Mask, Keypoint R-CNN) export to ONNX with PyTorch's TorchScript-based
exporter (``torch.onnx.export(..., dynamo=False)``, opset >= 11), as torchvision's own ONNX tests do: the model is
traced on one image, with the image's height and width dynamic; the graph includes the detector's transform
(normalisation and resize), the RPN, NMS and RoI heads. The dynamo exporter does not handle their data-dependent
shapes (the number of proposals and detections), so it is not offered for detectors.

The graph takes one image ``image`` ``(C, H, W)`` in [0, 1] (a list of one image, as the detector takes) and
returns ``boxes`` ``(K, 4)`` (``xyxy`` in input pixels), ``labels`` ``(K,)``, ``scores`` ``(K,)``, plus ``masks``
``(K, 1, H, W)`` (Mask R-CNN) or ``keypoints`` ``(K, J, 3)`` and ``keypoints_scores`` ``(K, J)`` (Keypoint
R-CNN), ``K`` varying with the image.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..search.cost import detector_image_size, detector_images, is_detector
from ._io import atomic_path
from .dense import is_dense
from .formats import ExportResult, ort_session, prepare_dense

__all__ = ["DETECTOR_INPUT_NAME", "detector_output_names", "export_detector_onnx", "verify_detector_onnx"]

_logger = logging.getLogger(__name__)

DETECTOR_INPUT_NAME = "image"
#: the TorchScript exporter's default opset in this project (torchvision's detectors need >= 11)
DETECTOR_OPSET = 17
_MIN_OPSET = 11


def detector_output_names(model: nn.Module) -> list[str]:
    """The ONNX outputs of a detector, in the order of its result dict: boxes, labels, scores, then masks or
    keypoints and keypoint scores."""
    heads = model.roi_heads
    names = ["boxes", "labels", "scores"]
    if getattr(heads, "mask_predictor", None) is not None:
        names.append("masks")
    if getattr(heads, "keypoint_predictor", None) is not None:
        names += ["keypoints", "keypoints_scores"]
    return names


def export_detector_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    width: float | None = None,
    input_size: int | Sequence[int] | None = None,
    opset: int | None = None,
    verify: bool = True,
    atol: float = 1e-4,
) -> ExportResult:
    """Export one width of a slimmable detector (or a dense detector) to ONNX; the file is written atomically.

    Args:
        model: a slimmable torchvision detector (``create_model("slim_maskrcnn_resnet18_fpn")``) or its dense
            export (:func:`~slimmable.export.export_width`).
        path: the ``.onnx`` file to write.
        width: the width to export (default: the model's current width).
        input_size: side (or ``(C, H, W)``) of the image traced and verified; default the side the detector
            resizes to. Height and width stay dynamic in the graph.
        opset: ONNX opset, at least 11 (default 17).
        verify: run the file with onnxruntime on two images (the traced size and a non-square one) and compare
            with the dense PyTorch detector.
        atol: largest allowed difference of boxes (relative to the image side), scores, keypoints (relative to the
            side) and mask probabilities; labels and the number of detections must be equal.

    Returns:
        An :class:`~slimmable.export.ExportResult` (``exporter="torchscript"``) with the largest difference.

    Raises:
        TypeError: ``model`` is not a torchvision R-CNN detector.
        ValueError: ``opset`` below 11, or a width the model does not have.
        RuntimeError: onnxruntime's detections differ from PyTorch's (see ``atol``).
    """
    if not is_detector(model):
        raise TypeError(
            f"{type(model).__name__} is not a torchvision R-CNN detector; export classification models with "
            "slimmable.export.export_onnx"
        )
    opset = DETECTOR_OPSET if opset is None else int(opset)
    if opset < _MIN_OPSET:
        raise ValueError(f"opset {opset} is too old for torchvision's detectors (RoIAlign, NMS); use 11 or newer")
    dense = model if is_dense(model) and width is None else prepare_dense(model, width=width)
    dense.eval()
    side = input_size if input_size is not None else detector_image_size(dense)
    (image,) = detector_images(dense, side, 1, seed=0)
    names = detector_output_names(dense)
    dynamic = {DETECTOR_INPUT_NAME: {1: "height", 2: "width"}} | {n: {0: "detections"} for n in names}
    with atomic_path(path) as tmp:
        with torch.no_grad(), warnings.catch_warnings():
            # The exporter's deprecation notice (see the module docstring) and torchvision's tracer warnings about
            # Python values in its detection code; the comparison with onnxruntime below checks the graph.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", UserWarning)
            torch.onnx.export(
                dense,
                ([image],),
                tmp,
                dynamo=False,
                opset_version=opset,
                input_names=[DETECTOR_INPUT_NAME],
                output_names=names,
                dynamic_axes=dynamic,
                do_constant_folding=True,
            )
        diff = None
        if verify:
            c, h = image.shape[0], image.shape[1]
            checks = [image, detector_images(dense, (c, h, max(8, (3 * h) // 4)), 1, seed=1)[0]]
            diff = verify_detector_onnx(tmp, dense, checks, atol)
    w = (getattr(dense, "export_info", None) or {}).get("width")
    _logger.debug("wrote %s (opset %d, max diff %s)", path, opset, diff)
    return ExportResult(Path(path), "onnx", w, diff, "torchscript", opset)


def verify_detector_onnx(
    path: str | os.PathLike[str], reference: nn.Module, images: Sequence[torch.Tensor], atol: float = 1e-4
) -> float:
    """Run a detector's ONNX file with onnxruntime on each image and compare with ``reference`` (eval mode).

    Returns:
        The largest difference over all outputs and images (boxes and keypoints relative to the image side).

    Raises:
        ImportError: onnxruntime is not installed.
        RuntimeError: a different number of detections or labels, or a difference above ``atol``.
    """
    try:
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise ImportError("verifying ONNX needs onnxruntime: pip install 'slimmable[export]'") from err
    sess = ort_session(path)
    names = [o.name for o in sess.get_outputs()]
    worst = 0.0
    was_training = reference.training
    reference.eval()
    try:
        for image in images:
            with torch.no_grad():
                (ref,) = reference([image])
            got = dict(zip(names, sess.run(None, {DETECTOR_INPUT_NAME: image.float().cpu().numpy()})))
            side = float(max(image.shape[-2:]))
            for name in names:
                r = ref[name].float().cpu()
                g = torch.from_numpy(got[name]).to(r.dtype) if name != "labels" else torch.from_numpy(got[name])
                where = f"{path}: {name} on a {tuple(image.shape)} image"
                if tuple(g.shape) != tuple(r.shape):
                    raise RuntimeError(
                        f"{where}: onnxruntime gave shape {tuple(g.shape)}, PyTorch {tuple(r.shape)} (a different "
                        "number of detections: scores near the threshold or NMS ties; try another image)"
                    )
                if name == "labels":
                    if not torch.equal(g, r.to(g.dtype)):
                        raise RuntimeError(f"{where}: onnxruntime's labels differ from PyTorch's")
                    continue
                scale = side if name in ("boxes", "keypoints") else 1.0
                d = float((g - r).abs().max()) / scale if r.numel() else 0.0
                worst = max(worst, d)
                if d > atol:
                    raise RuntimeError(f"{where}: onnxruntime differs from PyTorch by {d:.3g} (allowed {atol:g})")
    finally:
        reference.train(was_training)
    return worst
