"""The segmentation study's quick mode runs end to end on real Fashion-MNIST scenes: every run writes its file
through ``train_from_config``, mIoU and pixel accuracy are percentages, each individual run is the slimmable
architecture at its width (the same MACs and parameters), a second invocation resumes (skips every finished run),
and the final table is printed.

It checks that the table holds the runs' own scores and that its verdicts (slimmable >= individual at each width,
and at every width) are the orderings of those scores. It does not assert which way they go: four steps on 16
scenes are far too few for the differences to mean anything; the full study (``benchmarks/segmentation_study.py``
without ``--quick``) is where they are measured.
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
SCRIPT = REPO / "benchmarks" / "segmentation_study.py"
RUNS = ("slimmable", "individual_w0.5", "individual_w1")


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_quick_segmentation_study(tmp_path: Path) -> None:
    if not (Path(FASHION_MNIST_SYSTEM_DIR) / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(
            f"Fashion-MNIST is not installed in {FASHION_MNIST_SYSTEM_DIR} (apt-get install dataset-fashion-mnist)"
        )
    out = tmp_path / "study"
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "3 runs, 0 already done" in text and "estimated wall time" in text
    runs = {}
    for run in RUNS:
        res = json.loads((out / f"{run}_s0.json").read_text())
        runs[run] = res
        widths = ["0.5", "1"] if run == "slimmable" else [run.removeprefix("individual_w")]
        assert sorted(res["metrics"]) == widths and res["machine"]["torch"] and res["machine"]["cpu_capability"]
        assert res["steps"] == 4 and res["epochs"] == 2 and res["test_scenes"] == 8
        assert res["wall_seconds"] > 0 and res["cpu_seconds"] > 0 and res["train_seconds"] > 0
        assert res["numerics"] == "fp32", res["numerics"]
        rc = res["run_config"]  # the recipe with the study's overrides
        assert rc["train"]["time_budget_min"] is None and rc["train"]["epochs"] == 2 and rc["train"]["seed"] == 0
        assert rc["model"]["widths"] == [float(w) for w in widths] and rc["data"]["dataset"] == "fmnist_scenes"
        assert rc["data"]["root"] is None and rc["train"]["amp"] == "off" and rc["train"]["channels_last"] is False
        for w in widths:
            m = res["metrics"][w]
            assert 0.0 <= m["miou"] <= 100.0 and 0.0 <= m["pixel_acc"] <= 100.0
            assert m["macs"] > 0 and m["params"] > 0
            assert len(res["train_loss"][w]) == 2 and all(0 < v < 100 for v in res["train_loss"][w])
        assert (out / "logs" / f"{run}_s0.log").is_file()
    # every run of the seed has the same recipe but for model.widths
    same = [{**r["run_config"], "model": {**r["run_config"]["model"], "widths": None}} for r in runs.values()]
    assert all(c == same[0] for c in same)
    summary = json.loads((out / "summary.json").read_text())
    table = summary["table"]
    assert set(table["widths"]) == {"0.5", "1"}
    for w, entry in table["widths"].items():
        indiv = runs[f"individual_w{w}"]["metrics"][w]
        slim = runs["slimmable"]["metrics"][w]
        # an individual run is the slimmable architecture at its width
        assert (indiv["macs"], indiv["params"]) == (slim["macs"], slim["params"]), w
        for m in ("miou", "pixel_acc"):  # one seed: the mean is the run's score ...
            assert entry["slimmable"][f"{m}_mean"] == slim[m] and entry["individual"][f"{m}_mean"] == indiv[m]
            assert entry[f"{m}_diff"] == pytest.approx(slim[m] - indiv[m])
            # ... and the verdicts are the orderings of the scores
            assert entry[f"{m}_slimmable_ge_individual"] == (slim[m] >= indiv[m])
    for m in ("miou", "pixel_acc"):
        assert table[f"{m}_at_every_width"] == all(e[f"{m}_slimmable_ge_individual"] for e in table["widths"].values())
    assert "slimmable >= individual at every width" in text and "mIoU slim" in text
    again = _run(out)  # resumes: nothing left to train
    assert again.returncode == 0, again.stderr[-3000:]
    assert "3 runs, 3 already done (skipped), 0 to train" in again.stdout and "estimated" not in again.stdout
    assert "slimmable >= individual at every width" in again.stdout
    other = _run(out, "--epochs", "3")
    assert other.returncode != 0 and "another study config (epochs 2 there, 3 now)" in other.stderr, other.stderr
