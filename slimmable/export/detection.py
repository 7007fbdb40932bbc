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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..search.cost import detector_image_size, detector_images
from ._io import ExportResult, _is_detection, atomic_path, ort_session
from .dense import is_dense, prepare_dense

__all__ = [
    "DETECTOR_INPUT_NAME",
    "DetectionMatch",
    "detector_output_names",
    "export_detector_onnx",
    "match_detections",
    "verify_detector_onnx",
]

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
    if not _is_detection(model):
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


@dataclass
class DetectionMatch:
    """Two detectors' outputs on one image, matched order-insensitively (see :func:`match_detections`).

    Attributes:
        pairs: ``(i, j)``: detection ``i`` of the reference matches detection ``j`` of the other.
        unmatched_ref, unmatched_got: indices of the detections without a match on each side.
        worst: the largest difference per output over the matched pairs (boxes and keypoints relative to ``side``).
    """

    pairs: list[tuple[int, int]]
    unmatched_ref: list[int]
    unmatched_got: list[int]
    worst: dict[str, float]

    def describe(self, n_ref: int, n_got: int) -> str:
        diffs = ", ".join(f"{k} by {v:.3g}" for k, v in self.worst.items()) or "nothing to compare"
        return (
            f"{len(self.unmatched_ref)} of {n_ref} PyTorch detections and {len(self.unmatched_got)} of {n_got} "
            f"onnxruntime detections unmatched; the {len(self.pairs)} matched differ in {diffs}"
        )


def _box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_iou

    return box_iou(a.double(), b.double()) if len(a) and len(b) else torch.zeros(len(a), len(b), dtype=torch.float64)


def match_detections(
    ref: dict[str, torch.Tensor],
    got: dict[str, torch.Tensor],
    *,
    side: float = 1.0,
    iou: float = 0.9,
    score_atol: float = 1e-3,
) -> DetectionMatch:
    """Match two sets of detections regardless of their order: NMS may order (and, at a tie, keep) near-tied
    boxes differently in two runtimes, so comparing row by row fails on random weights.

    Detections match greedily, highest reference score first: the other side's unmatched detection with the same
    label, a box IoU >= ``iou`` and a score within ``score_atol``, the highest IoU first. The matched pairs are then
    compared output by output.

    Args:
        ref, got: ``boxes`` ``(K, 4)``, ``labels``, ``scores`` and optionally ``masks``, ``keypoints``,
            ``keypoints_scores``, one row per detection.
        side: the image side; box and keypoint differences are divided by it.
    """
    rb, gb = ref["boxes"].float(), got["boxes"].float()
    ious = _box_iou(rb, gb)
    taken: set[int] = set()
    pairs: list[tuple[int, int]] = []
    for i in sorted(range(len(rb)), key=lambda k: -float(ref["scores"][k])):
        best, best_iou = None, iou
        for j in range(len(gb)):
            if j in taken or int(ref["labels"][i]) != int(got["labels"][j]):
                continue
            if abs(float(ref["scores"][i]) - float(got["scores"][j])) > score_atol:
                continue
            if float(ious[i, j]) >= best_iou:
                best, best_iou = j, float(ious[i, j])
        if best is not None:
            taken.add(best)
            pairs.append((i, best))
    worst: dict[str, float] = {}
    if pairs:
        ri = torch.tensor([p[0] for p in pairs])
        gi = torch.tensor([p[1] for p in pairs])
        for name in ref:
            if name == "labels" or name not in got:
                continue
            scale = side if name in ("boxes", "keypoints") else 1.0
            worst[name] = float((ref[name][ri].float() - got[name][gi].float()).abs().max()) / scale
    matched_ref = {p[0] for p in pairs}
    return DetectionMatch(
        pairs,
        [i for i in range(len(rb)) if i not in matched_ref],
        [j for j in range(len(gb)) if j not in taken],
        worst,
    )


def verify_detector_onnx(
    path: str | os.PathLike[str], reference: nn.Module, images: Sequence[torch.Tensor], atol: float = 1e-4
) -> float:
    """Run a detector's ONNX file with onnxruntime on each image and compare with ``reference`` (eval mode).

    Detections are compared order-insensitively (:func:`match_detections`: same label, IoU >= 0.9, scores within
    ``max(10 * atol, 1e-3)``): NMS orders near-tied boxes of random weights differently in the two runtimes.
    A detection without a match is allowed only at the edge of what is kept (its score within that tolerance of
    the lowest score kept by both runtimes, where the top-k cut or the score threshold falls between near ties),
    and at most 2 or a tenth of the detections.

    Returns:
        The largest difference over the matched detections' outputs and all images (boxes and keypoints relative
        to the image side).

    Raises:
        ImportError: onnxruntime is not installed.
        RuntimeError: unmatched detections or a difference above ``atol``; one line naming what differs.
    """
    try:
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise ImportError("verifying ONNX needs onnxruntime: pip install 'slimmable[export]'") from err
    sess = ort_session(path)
    names = [o.name for o in sess.get_outputs()]
    score_atol = max(10 * atol, 1e-3)
    worst = 0.0
    was_training = reference.training
    reference.eval()
    try:
        for image in images:
            with torch.no_grad():
                (ref,) = reference([image])
            out = dict(zip(names, sess.run(None, {DETECTOR_INPUT_NAME: image.float().cpu().numpy()})))
            ref = {k: ref[k].cpu() for k in names}
            got = {k: torch.from_numpy(out[k]) for k in names}
            m = match_detections(ref, got, side=float(max(image.shape[-2:])), score_atol=score_atol)
            where = f"{path}: on a {tuple(image.shape)} image onnxruntime's detections differ from PyTorch's"
            if not _only_at_the_edge(m, ref["scores"], got["scores"], score_atol):
                raise RuntimeError(f"{where}: {m.describe(len(ref['boxes']), len(got['boxes']))}")
            for name, d in m.worst.items():
                worst = max(worst, d)
                if d > atol:
                    counts = m.describe(len(ref["boxes"]), len(got["boxes"]))
                    raise RuntimeError(f"{where} in {name} by {d:.3g} (allowed {atol:g}): {counts}")
    finally:
        reference.train(was_training)
    return worst


def _only_at_the_edge(m: DetectionMatch, ref_scores: torch.Tensor, got_scores: torch.Tensor, tol: float) -> bool:
    """Whether every unmatched detection scores within ``tol`` of the lowest score kept on both sides (a near tie at
    the top-k cut or the score threshold), so that the other runtime may have kept its neighbour instead."""
    for idx, own, other in ((m.unmatched_ref, ref_scores, got_scores), (m.unmatched_got, got_scores, ref_scores)):
        for i in idx:
            score = float(own[i])
            if score > float(own.min()) + tol or not len(other) or abs(score - float(other.min())) > tol:
                return False
    return len(m.unmatched_ref) + len(m.unmatched_got) <= max(2, (len(ref_scores) + len(got_scores)) // 10)
