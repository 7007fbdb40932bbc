"""The ViT study's quick mode runs end to end on a tiny fake Fashion-MNIST: every run writes its file through
``train_from_config``, top-1 is a percentage, each individual run is the slimmable architecture at its width (the
same MACs and parameters), all runs of a seed share the recipe but for ``model.widths``, a second invocation resumes
(skips every finished run; a run recorded before a setting existed resumes when the setting is at its default),
another study config or recipe is refused, and the final table is printed.

It checks that the table holds the runs' own scores and that its verdicts are the orderings of those scores, not
which way they go: four steps on 32 fake images mean nothing; the full study (``benchmarks/vit_study.py`` without
``--quick``) is where they are measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_data import write_fashion_mnist

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "vit_study.py"
RUNS = ("slimmable", "individual_w0.5", "individual_w1")


def _run(out: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--data", str(data), "--out", str(out), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_quick_vit_study(tmp_path: Path) -> None:
    data = write_fashion_mnist(tmp_path / "fm", n_train=32, n_test=16)
    out = tmp_path / "study"
    proc = _run(out, data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "3 runs, 0 already done" in text and "estimated wall time" in text
    runs = {}
    for run in RUNS:
        res = json.loads((out / f"{run}_s0.json").read_text())
        runs[run] = res
        widths = ["0.5", "1"] if run == "slimmable" else [run.removeprefix("individual_w")]
        assert sorted(res["metrics"]) == widths and res["test_images"] == 16
        assert res["machine"]["torch"] and res["machine"]["cpu_capability"] and res["machine"]["threads"] == 1
        assert res["steps"] == 4 and res["epochs"] == 2 and res["numerics"] == "fp32"
        rc = res["run_config"]  # the recipe with the study's overrides
        assert rc["model"]["name"] == "slim_vit_tiny" and rc["model"]["options"]["depth"] == 1
        assert rc["train"]["time_budget_min"] is None and rc["train"]["epochs"] == 2 and rc["data"]["val_size"] == 0
        assert rc["model"]["widths"] == [float(w) for w in widths] and rc["data"]["root"] == str(data)
        for w in widths:
            m = res["metrics"][w]
            assert 0.0 <= m["top1"] <= m["top5"] <= 100.0 and m["macs"] > 0 and m["params"] > 0
            assert len(res["train_loss"][w]) == 2 and all(0 < v < 100 for v in res["train_loss"][w])
        assert (out / "logs" / f"{run}_s0.log").is_file()
    same = [{**r["run_config"], "model": {**r["run_config"]["model"], "widths": None}} for r in runs.values()]
    assert all(c == same[0] for c in same)
    table = json.loads((out / "summary.json").read_text())["table"]
    assert set(table["widths"]) == {"0.5", "1"}
    for w, entry in table["widths"].items():
        indiv, slim = runs[f"individual_w{w}"]["metrics"][w], runs["slimmable"]["metrics"][w]
        assert (indiv["macs"], indiv["params"]) == (slim["macs"], slim["params"]), w
        assert entry["slimmable"]["top1_mean"] == slim["top1"] and entry["individual"]["top1_mean"] == indiv["top1"]
        assert entry["top1_diff"] == pytest.approx(slim["top1"] - indiv["top1"])
        assert entry["top1_slimmable_ge_individual"] == (slim["top1"] >= indiv["top1"])
    assert table["top1_at_every_width"] == all(e["top1_slimmable_ge_individual"] for e in table["widths"].values())
    assert "slimmable >= individual at every width" in text and "top-1 slim" in text
    again = _run(out, data)  # resumes: nothing left to train
    assert again.returncode == 0, again.stderr[-3000:]
    assert "3 runs, 3 already done (skipped), 0 to train" in again.stdout and "estimated" not in again.stdout
    # a run recorded before a setting existed (absent from its record) resumes when the setting is at its default,
    # and is refused when the record says another value
    path = out / "slimmable_s0.json"
    record = json.loads(path.read_text())
    del record["run_config"]["train"]["teacher_weight"]
    path.write_text(json.dumps(record))
    assert _run(out, data).returncode == 0
    record["run_config"]["train"]["teacher_weight"] = 0.9
    path.write_text(json.dumps(record))
    changed = _run(out, data)
    assert changed.returncode != 0 and "another recipe (train.teacher_weight differ)" in changed.stderr, changed.stderr
    del record["run_config"]["train"]["teacher_weight"]
    path.write_text(json.dumps(record))
    other = _run(out, data, "--epochs", "3")
    assert other.returncode != 0 and "another study config (epochs 2 there, 3 now)" in other.stderr, other.stderr
