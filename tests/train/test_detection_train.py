"""Algorithm 1 for detectors: every width's summed losses, one step, clipping; evaluation per width with COCOeval."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import slimmable
from slimmable.data import FASHION_MNIST_SYSTEM_DIR
from slimmable.data.coco import CocoDetectionDataset, collate_detection
from slimmable.data.scenes import make_scenes
from slimmable.train.detection import detection_iou_types, detection_train_step, evaluate_detector

pytestmark = pytest.mark.skipif(
    not Path(FASHION_MNIST_SYSTEM_DIR).is_dir(), reason=f"Fashion-MNIST not installed at {FASHION_MNIST_SYSTEM_DIR}"
)
SMALL = {"rpn_batch_size_per_image": 32, "box_batch_size_per_image": 32, "rpn_post_nms_top_n_train": 100}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> CocoDetectionDataset:
    root = tmp_path_factory.mktemp("scenes")
    return CocoDetectionDataset(root, make_scenes(root, "train", 3, seed=1))


def _losses(model: nn.Module, images, targets) -> dict[float, float]:
    out = {}
    for w in model.widths:
        torch.manual_seed(0)  # the same RPN and RoI samples each time
        with torch.no_grad(), slimmable.use_width(model, w):
            out[w] = float(sum(model(images, targets).values()))
    return out


def test_a_few_steps_reduce_the_loss_at_every_width(scenes) -> None:
    torch.manual_seed(0)
    model = slimmable.create_model("slim_fasterrcnn_resnet18_fpn", **SMALL).train()
    images, targets = collate_detection([scenes[0], scenes[1]])
    assert "masks" in targets[0] and targets[0]["boxes"].shape[1] == 4
    before = _losses(model, images, targets)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(5):
        step = detection_train_step(model, images, targets, opt, max_grad_norm=35.0)
    assert list(step) == [0.25, 0.5, 0.75, 1.0]
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} < set(step[1.0])
    after = _losses(model, images, targets)
    for w in model.widths:
        assert after[w] < 0.9 * before[w], (w, before[w], after[w])  # 15-40% lower after 5 steps, AVX2 and AVX512


def test_gradient_clipping_bounds_the_step_and_nonfinite_losses_stop(scenes) -> None:
    images, targets = collate_detection([scenes[2]])
    torch.manual_seed(0)
    model = slimmable.create_model("slim_fasterrcnn_resnet18_fpn", widths=(0.5, 1.0), **SMALL).train()
    start = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    detection_train_step(model, images, targets, opt, max_grad_norm=1e-3)
    moved = torch.sqrt(sum(((p.detach() - s) ** 2).sum() for p, s in zip(model.parameters(), start)))
    assert 0 < moved <= 1e-3 * 1.001
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight[0, 0] = float("nan")
    start = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="non-finite detection loss at width 0.5"):
        detection_train_step(model, images, targets, opt)
    assert all(torch.equal(p, s) or torch.isnan(s).any() for p, s in zip(model.parameters(), start))
    with pytest.raises(ValueError, match="training mode"):
        detection_train_step(model.eval(), images, targets, opt)


class _Oracle(nn.Module):
    """A dense 'detector' that returns the ground truth of a dataset: COCOeval must give AP 1."""

    def __init__(self, dataset: CocoDetectionDataset) -> None:
        super().__init__()
        self.truth = {int(t["image_id"]): t for t in (dataset[i][1] for i in range(len(dataset)))}
        self.roi_heads = nn.Module()
        self.roi_heads.mask_predictor = nn.Identity()
        self.roi_heads.keypoint_predictor = nn.Identity()
        self.ids = iter(dataset.ids)

    def forward(self, images):
        out = []
        for _ in images:
            t = self.truth[next(self.ids)]
            n = len(t["boxes"])
            out.append({"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(n),
                        "masks": t["masks"][:, None].float(), "keypoints": t["keypoints"]})  # fmt: skip
        return out


def test_evaluate_detector_per_width_and_task(scenes) -> None:
    oracle = _Oracle(scenes)
    assert detection_iou_types(oracle) == ("bbox", "segm", "keypoints")
    ap = evaluate_detector(oracle, scenes, batch_size=2)
    assert list(ap) == [None]
    for task in ("bbox", "segm", "keypoints"):
        assert ap[None][task] == {"AP": 1.0, "AP50": 1.0, "AP75": 1.0}, task
    torch.manual_seed(0)
    model = slimmable.create_model("slim_maskrcnn_mobilenet_v2_fpn", widths=(0.5, 1.0)).train()
    ap = evaluate_detector(model, scenes, batch_size=3)
    assert model.training  # restored
    assert list(ap) == [0.5, 1.0] and set(ap[1.0]) == {"bbox", "segm"}
    assert all(0.0 <= v <= 1.0 for per in ap.values() for t in per.values() for v in t.values())
