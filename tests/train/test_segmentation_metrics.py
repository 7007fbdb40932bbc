"""Segmentation metrics against hand computations and a brute-force loop; evaluation at each width of a segmenter
whose output is a known function of its input; the loss as torchvision's reference computes it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from slimmable.nn import SlimConv2d, WidthTable, get_width
from slimmable.train.segmentation import (
    confusion_matrix,
    evaluate_segmenter,
    segmentation_loss,
    segmentation_scores,
)

# ------------------------------------------------------------------------------------------ confusion and scores


def test_confusion_and_scores_of_a_hand_computed_example() -> None:
    target = torch.tensor([[0, 1, 1], [2, 255, 2]])
    pred = torch.tensor([[0, 1, 2], [2, 0, 1]])
    c = confusion_matrix(pred, target, 4)
    # pixels (true, predicted): (0, 0), (1, 1), (1, 2), (2, 2), (2, 1); the 255 pixel is not counted
    assert c.tolist() == [[1, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]] and c.dtype == torch.int64
    scores = segmentation_scores(c)
    # IoU: class 0: 1 / 1; classes 1 and 2: 1 / (2 + 2 - 1); class 3 is in neither: left out of the mean
    assert scores["per_class_iou"] == [100.0, pytest.approx(100 / 3), pytest.approx(100 / 3), None]
    assert scores["miou"] == pytest.approx((100 + 200 / 3) / 3)  # 55.56
    assert scores["pixel_acc"] == pytest.approx(60.0)  # 3 of 5
    # logits give their argmax
    logits = F.one_hot(pred, 4).permute(2, 0, 1)[None].float()
    assert torch.equal(confusion_matrix(logits, target[None], 4), c)
    # a class only predicted has a non-empty union: IoU 0, counted in the mean
    c2 = confusion_matrix(torch.tensor([3, 0]), torch.tensor([0, 0]), 4)
    assert segmentation_scores(c2)["per_class_iou"] == [50.0, None, None, 0.0]
    assert segmentation_scores(c2)["miou"] == 25.0
    assert segmentation_scores(torch.zeros(3, 3, dtype=torch.int64)) == {
        "miou": 0.0,
        "pixel_acc": 0.0,
        "per_class_iou": [None, None, None],
    }


def test_confusion_and_scores_match_a_brute_force_loop() -> None:
    g = torch.Generator().manual_seed(0)
    k = 6
    target = torch.randint(0, k, (3, 17, 19), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.1] = 255
    target[target == 4] = 5  # class 4 never true ...
    pred = torch.randint(0, k, target.shape, generator=g)
    pred[pred == 4] = 0  # ... nor predicted: left out
    pred[(target == 2) & (torch.rand(target.shape, generator=g) < 0.7)] = 2  # class 2 mostly right
    want = np.zeros((k, k), np.int64)
    for t, p in zip(target.flatten().tolist(), pred.flatten().tolist()):
        if t != 255:
            want[t, p] += 1
    c = confusion_matrix(pred, target, k)
    assert np.array_equal(c.numpy(), want)
    ious = []
    for i in range(k):
        inter, union = want[i, i], want[i, :].sum() + want[:, i].sum() - want[i, i]
        ious.append(100.0 * inter / union if union else None)
    scores = segmentation_scores(c)
    assert scores["per_class_iou"] == pytest.approx(ious) and ious[4] is None
    assert scores["miou"] == pytest.approx(np.mean([v for v in ious if v is not None]))
    assert scores["pixel_acc"] == pytest.approx(100.0 * np.trace(want) / want.sum())


def test_confusion_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match=r"predictions of shape \(2, 3\) do not match targets of shape \(3, 2\)"):
        confusion_matrix(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"target class index 7 is outside 0\.\.2 \(num_classes 3; 255 is ignored"):
        confusion_matrix(torch.zeros(4, dtype=torch.long), torch.tensor([0, 7, 255, 1]), 3)
    with pytest.raises(ValueError, match=r"prediction class index -1 is outside"):
        confusion_matrix(torch.tensor([0, -1]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match=r"logits of shape \(1, 5, 2, 2\) have 5 classes, not num_classes 3"):
        confusion_matrix(torch.zeros(1, 5, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"square"):
        segmentation_scores(torch.zeros(2, 3))


# ------------------------------------------------------------------------------------------------- evaluation

WIDTHS = (0.5, 1.0)
K = 4


class CodedMasks(Dataset):
    """Images whose pixel value codes the class, ``x = k / 10``; ignored pixels are 0.9."""

    def __init__(self, n: int = 5, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.masks = torch.randint(0, K, (n, 6, 7), generator=g)
        self.masks[:, 0, :2] = 255
        self.masks[0, 1, 1:4] = 3

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.masks[i]
        return torch.where(m == 255, 0.9, m / 10).float()[None], m.clone()


class CodeReader(nn.Module):
    """A slimmable "segmenter" (one slimmable layer makes it one): at full width it reads the class from the pixel
    value; narrower it predicts class 1 everywhere. Counts the images it runs and records how it is called."""

    def __init__(self) -> None:
        super().__init__()
        self.probe = SlimConv2d(1, 2, 1, out_rule=WidthTable.build(WIDTHS, [1, 2]))
        self.images = 0
        self.calls: list[tuple[bool, bool, float | None]] = []

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        width = get_width(self)
        self.images += len(x)
        self.calls.append((self.training, torch.is_inference_mode_enabled(), width))
        cls = (x[:, 0] * 10).round().long().clamp(0, K - 1) if width == 1.0 else torch.ones_like(x[:, 0]).long()
        return {"out": F.one_hot(cls, K).permute(0, 3, 1, 2).float() * 5.0}


def _expected(masks: torch.Tensor) -> dict[float, dict]:
    valid = masks[masks != 255]
    n = len(valid)
    counts = [int((valid == k).sum()) for k in range(K)]
    full = {"miou": 100.0, "pixel_acc": 100.0, "per_class_iou": [100.0 if c else None for c in counts]}
    # everything predicted 1: class 1's IoU is its share of the pixels; the other present classes 0
    ious = [100.0 * counts[1] / n if k == 1 else 0.0 if counts[k] else None for k in range(K)]
    narrow = {
        "miou": float(np.mean([v for v in ious if v is not None])),
        "pixel_acc": 100.0 * counts[1] / n,
        "per_class_iou": ious,
    }
    return {0.5: narrow, 1.0: full}


def _approx(scores: dict) -> dict:
    return {w: {k: pytest.approx(v) for k, v in s.items()} for w, s in scores.items()}


def test_evaluate_segmenter_scores_each_width() -> None:
    data = CodedMasks()
    model = CodeReader().train()
    width = get_width(model)
    scores = evaluate_segmenter(model, data, batch_size=2)
    assert scores == _approx(_expected(data.masks))
    assert 0 < scores[0.5]["miou"] < 50
    assert model.images == 2 * len(data) and model.training and get_width(model) == width  # mode, width restored
    assert {c[:2] for c in model.calls} == {(False, True)}  # eval mode, inference mode
    assert [c[2] for c in model.calls] == [0.5] * 3 + [1.0] * 3  # batches of 2, 2, 1 at each width
    # a loader is run as given; one width only
    loader = DataLoader(data, batch_size=3)
    assert evaluate_segmenter(model, loader, widths=[0.5]) == _approx({0.5: _expected(data.masks)[0.5]})


def test_evaluate_segmenter_dense_model_and_bad_output() -> None:
    class Dense(nn.Module):
        def __init__(self, out: str = "out", scale: int = 1) -> None:
            super().__init__()
            self.key, self.scale = out, scale

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            cls = (x[:, 0] * 10).round().long().clamp(0, K - 1)
            logits = F.one_hot(cls, K).permute(0, 3, 1, 2).float()
            return {self.key: logits[..., :: self.scale, :: self.scale]}

    data = CodedMasks(3)
    assert evaluate_segmenter(Dense(), data) == _approx({None: _expected(data.masks)[1.0]})
    with pytest.raises(ValueError, match=r"logits have shape \(3, 4, 3, 4\) for masks \(3, 6, 7\); a segmenter"):
        evaluate_segmenter(Dense(scale=2), data)
    with pytest.raises(ValueError, match=r"output is a dict with 'out' logits .* got dict with keys \['logits'\]"):
        evaluate_segmenter(Dense("logits"), data)
    with pytest.raises(ValueError, match=r"no images to evaluate"):
        evaluate_segmenter(Dense(), torch.utils.data.Subset(data, []))


def test_evaluate_segmenter_on_segmentation_data(tmp_path: Path) -> None:
    """A SegmentationDataset of folder data, stacked into batches; a perfect oracle scores 100."""
    from fake_data import write_segmentation_folder

    from slimmable.data import create_segmentation_datasets

    root = write_segmentation_folder(tmp_path / "seg", num_classes=K, n_train=2, n_test=3)
    test = create_segmentation_datasets("folder", root, load_train=False).test
    masks = torch.stack([test[i][1] for i in range(len(test))])

    class Oracle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.i = 0

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            m = masks[self.i : self.i + len(x)].clamp(max=K - 1)
            self.i += len(x)
            return {"out": F.one_hot(m, K).permute(0, 3, 1, 2).float()}

    scores = evaluate_segmenter(Oracle(), test, batch_size=2)[None]
    assert scores["miou"] == 100.0 and scores["pixel_acc"] == 100.0


HARNESS = textwrap.dedent(
    """
    import json, sys
    sys.path[:0] = sys.argv[1:3]
    import torch.distributed as dist
    from slimmable.train import init_distributed, shutdown_distributed
    from test_segmentation_metrics import CodedMasks, CodeReader
    from slimmable.train.segmentation import evaluate_segmenter

    info = init_distributed("cpu")
    model = CodeReader()
    scores = evaluate_segmenter(model, CodedMasks(7), batch_size=2)
    mine = {"images": model.images, "scores": {str(w): s for w, s in scores.items()}}
    if info.world_size > 1:
        everyone = [None] * info.world_size
        dist.all_gather_object(everyone, mine)
        shutdown_distributed()
    else:
        everyone = [mine]
    if info.rank == 0:
        print(json.dumps(everyone))
    """
)


@pytest.mark.slow
def test_evaluate_segmenter_shards_images_and_all_reduces(tmp_path: Path) -> None:
    """torchrun, 2 Gloo processes: each runs its shard of 7 images (4 and 3) at each width, and both return the
    scores of all 7."""
    script = tmp_path / "harness.py"
    script.write_text(HARNESS)
    here = Path(__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(script), str(here), str(here.parent)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = json.loads(proc.stdout.splitlines()[-1])
    assert [r["images"] for r in two] == [8, 6]  # 4 and 3 images, at 2 widths
    want = {str(w): s for w, s in _expected(CodedMasks(7).masks).items()}
    for r in two:
        assert r["scores"] == {w: {k: pytest.approx(v) for k, v in s.items()} for w, s in want.items()}


# ------------------------------------------------------------------------------------------------------- loss


def test_loss_with_aux_is_the_hand_computation() -> None:
    # one image, 2 classes, 1x3 pixels; the third pixel is ignored
    target = torch.tensor([[[0, 1, 255]]])
    out = torch.tensor([[[[0.0, 1.0, 0.0]], [[0.0, 0.0, 2.0]]]], requires_grad=True)  # (1, 2, 1, 3)
    aux = torch.tensor([[[[2.0, 0.0, 5.0]], [[0.0, 0.0, 5.0]]]])
    # pixel 1: logits (0, 0), true 0: log 2; pixel 2: logits (1, 0), true 1: log(1 + e)
    ce_out = (math.log(2) + math.log(1 + math.e)) / 2
    # pixel 1: logits (2, 0), true 0: log(1 + e^-2); pixel 2: logits (0, 0), true 1: log 2
    ce_aux = (math.log(1 + math.exp(-2)) + math.log(2)) / 2
    loss = segmentation_loss({"out": out, "aux": aux}, target)
    assert loss.item() == pytest.approx(ce_out + 0.5 * ce_aux)
    assert segmentation_loss({"out": out, "aux": aux}, target, aux_weight=0.2).item() == pytest.approx(
        ce_out + 0.2 * ce_aux
    )
    assert segmentation_loss({"out": out}, target).item() == pytest.approx(ce_out)
    assert segmentation_loss(out, target).item() == pytest.approx(ce_out)
    # torchvision's reference criterion
    ref = F.cross_entropy(out, target, ignore_index=255) + 0.5 * F.cross_entropy(aux, target, ignore_index=255)
    assert loss.item() == pytest.approx(ref.item())
    loss.backward()
    assert out.grad is not None and float(out.grad[..., 2].abs().sum()) == 0.0  # the ignored pixel: no gradient
    # every pixel ignored: 0, not NaN
    assert segmentation_loss({"out": out}, torch.full((1, 1, 3), 255)).item() == 0.0
    with pytest.raises(ValueError, match=r"out logits of shape \(1, 2, 1, 3\) do not match targets of shape"):
        segmentation_loss({"out": out}, torch.zeros(1, 2, 3, dtype=torch.long))
