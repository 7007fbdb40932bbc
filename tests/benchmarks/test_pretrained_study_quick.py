"""The pretrained-model study's quick mode runs end to end on real Fashion-MNIST: every stage of both networks writes
its file (pretrain with its weights, convert with unsorted and sorted rows before and after BN calibration,
finetune, the individual networks of each width), the summary holds every row and the cost ratios, the final table
is printed, and a second invocation resumes (skips every finished run).

It does not assert which way the accuracies go: four steps on 256 images teach nothing; the full study
(``benchmarks/pretrained_study.py`` without ``--quick``) is where they are measured.
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
SCRIPT = REPO / "benchmarks" / "pretrained_study.py"
NETS = ("resnet18", "mnv3s050")
WIDTHS = ("0.25", "0.5", "0.75", "1")


def _run(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_quick_pretrained_study(tmp_path: Path) -> None:
    if not (Path(FASHION_MNIST_SYSTEM_DIR) / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST is not installed in {FASHION_MNIST_SYSTEM_DIR}")
    out = tmp_path / "study"
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "10 jobs" in text and "0 done (skipped), 10 to run" in text and "estimated wall time" in text
    for net in NETS:
        pre = json.loads((out / f"pretrain_{net}_s0.json").read_text())
        assert (out / pre["weights"]).is_file() and pre["steps"] == 4 and pre["cost"]["train_macs"] > 0
        assert pre["machine"]["torch"] and pre["study"]["steps"] == 4 and pre["wall_seconds"] > 0
        conv = json.loads((out / f"convert_{net}_s0.json").read_text())
        assert set(conv["rows"]) == {"none", "magnitude", "bn"} and conv["chosen_sort"] in ("magnitude", "bn")
        for row in conv["rows"].values():
            assert set(row["calibrated"]) == set(WIDTHS) and set(row["uncalibrated"]) == set(WIDTHS)
            assert all(0 <= v["test"] <= 100 and 0 <= v["val"] <= 100 for v in row["calibrated"].values())
        ft = json.loads((out / f"finetune_{net}_s0.json").read_text())
        assert ft["steps"] == 1 and ft["sort"] == conv["chosen_sort"] and set(ft["scores"]) == set(WIDTHS)
        assert ft["teacher_macs"] > 0 and ft["cost"]["train_macs"] > 0
        for w in WIDTHS:
            ind = json.loads((out / f"individual_{net}_w{w}_s0.json").read_text())
            assert ind["steps"] == 4 and list(ind["scores"]) == [w]
            # the individual network is the converted model's architecture at that width
            assert ind["macs"]["1"] == ft["macs"][w]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["machine"]["cpu_capability"] and summary["estimate"]["wall_minutes"] > 0 and summary["scale_reason"]
    for net in NETS:
        entry = summary["table"][net]
        assert entry["complete"] and set(entry["widths"]) == set(WIDTHS)
        for w, e in entry["widths"].items():
            for row in ("converted_none", "converted_magnitude", "converted_bn", "finetuned", "individual"):
                assert e[row]["mean"] is not None and len(e[row]["per_seed"]) == 1, (net, w, row)
            assert e["diff_finetuned_minus_individual"]["mean"] == pytest.approx(
                e["finetuned"]["mean"] - e["individual"]["mean"]
            )
            ratio = e["cost_ratio"]
            assert ratio["steps"] == pytest.approx(0.25)
            assert all(v is not None and v > 0 for v in ratio.values()), ratio
            assert ratio["macs_with_pretrain_vs_all_individuals"] > ratio["macs_vs_all_individuals"]
            assert e["goal_met"] == (e["diff_finetuned_minus_individual"]["mean"] >= 0)
    assert "unsorted sort-mag  sort-bn" in text and text.count("goal ") == 8
    again = _run(out)  # resumes: nothing left to run
    assert again.returncode == 0, again.stderr[-3000:]
    assert "10 done (skipped), 0 to run" in again.stdout and "estimated" not in again.stdout
    assert again.stdout.count("goal ") == 8
