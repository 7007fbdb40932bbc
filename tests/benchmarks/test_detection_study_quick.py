"""The detection study's quick mode runs end to end on real Fashion-MNIST scenes: every run writes its file, AP
values are valid COCO APs, the Mask R-CNN runs' training loss falls, a second invocation resumes (skips every
finished run), and the final table is printed.

It checks that the table's verdicts (slimmable >= individual at each width, and at every width) are the orderings
of the runs' APs. It does not assert which way those orderings go (slimmable >= individual, wider >= narrower): six
steps on one batch of two training scenes are far too few for such differences to mean anything (every AP is about
0 after them); the full study (``benchmarks/detection_study.py`` without ``--quick``, results in
``benchmarks/RESULTS.md``) is where they are measured. Nor does it assert that Keypoint R-CNN's loss falls within
six steps: its keypoint term (a softmax over 56x56 heatmap positions) jumps by up to 2x from step to step at the
start (measured: 10.8 -> 19.8 -> 10.6 -> 17.2 on one batch), so only its finiteness is checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slimmable.data import FASHION_MNIST_SYSTEM_DIR

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "detection_study.py"
RUNS = ("slimmable", "slim_heads", "individual_w0.5", "individual_w1")


def _run(out: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_quick_detection_study(tmp_path: Path) -> None:
    if not (Path(FASHION_MNIST_SYSTEM_DIR) / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(
            f"Fashion-MNIST is not installed in {FASHION_MNIST_SYSTEM_DIR} (apt-get install dataset-fashion-mnist)"
        )
    out = tmp_path / "study"
    text = _run(out)
    first_two: list[float] = []
    last_two: list[float] = []
    assert "estimated wall time" in text and "8 runs, 0 already done" in text
    for task, types in (("maskrcnn", ("bbox", "segm")), ("keypointrcnn", ("bbox", "keypoints"))):
        for run in RUNS:
            res = json.loads((out / task / f"{run}_s0.json").read_text())
            widths = ["0.5", "1"] if not run.startswith("individual") else [run.removeprefix("individual_w")]
            assert sorted(res["ap"]) == widths and res["train_seconds"] > 0 and res["machine"]["torch"]
            for w in widths:
                for iou in types:
                    assert 0.0 <= res["ap"][w][iou]["AP"] <= 1.0
                losses = [step[w] for step in res["losses"]]
                assert len(losses) == 6 and all(0 < v < 1e3 for v in losses), (task, run, w, losses)
                if task == "maskrcnn":  # the same batch of two scenes six times: the last two below the first two
                    first_two.append(sum(losses[:2]))
                    last_two.append(sum(losses[-2:]))
    # summed over the six Mask R-CNN (run, width) pairs: one pair may rise in so few steps, the sum falls
    assert sum(last_two) < 0.9 * sum(first_two), (first_two, last_two)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["table"]) == {"maskrcnn/bbox", "maskrcnn/segm", "keypointrcnn/bbox", "keypointrcnn/keypoints"}
    for key, entry in summary["table"].items():
        task, iou = key.split("/")
        ap = entry["ap"]
        assert set(ap["slimmable"]) == {"0.5", "1"}
        for w in ("0.5", "1"):  # the table holds the runs' own APs (1 seed: the mean is the value) ...
            for run, name in (
                ("slimmable", "slimmable"),
                ("slim_heads", "slim_heads"),
                ("individual", f"individual_w{w}"),
            ):
                res = json.loads((out / task / f"{name}_s0.json").read_text())
                assert ap[run][w] == res["ap"][w][iou]["AP"], (key, run, w)
            # ... and its verdicts are the orderings of those APs
            assert entry["slimmable_ge_individual"][w] == (ap["slimmable"][w] >= ap["individual"][w])
        assert entry["at_every_width"] == all(entry["slimmable_ge_individual"].values())
    assert "slimmable >= individual" in text and "maskrcnn/segm" in text
    again = _run(out)  # resumes: nothing left to train
    assert "8 runs, 8 already done (skipped), 0 to train" in again and "estimated" not in again
    other = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--steps", "5", "--out", str(out)],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert other.returncode != 0 and "another study config (steps 6 there, 5 now)" in other.stderr, other.stderr
