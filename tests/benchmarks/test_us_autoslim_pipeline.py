"""benchmarks/us_autoslim_fmnist.py end to end on a tiny US checkpoint and fake data: every stage runs, budgets
hold, and a second invocation reuses what the first finished (the real run takes an hour of CPU)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from pathlib import Path

import pytest
import torch
from fake_data import tiny_recipe, write_fashion_mnist

import slimmable
from slimmable.config import RunConfig
from slimmable.train import CHECKPOINT_FORMAT_VERSION, save_checkpoint

REPO = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("us_autoslim_fmnist", REPO / "benchmarks" / "us_autoslim_fmnist.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_us_autoslim_pipeline_runs_every_stage_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_fashion_mnist(tmp_path / "fm", n_train=96, n_test=48)
    model_cfg = {"name": "us_mobilenet_v1", "widths": None, "width_range": [0.25, 1.0], "stat_widths": [0.25, 1.0]}
    cfg = RunConfig.from_dict(tiny_recipe(root, model=model_cfg))
    torch.manual_seed(0)
    us = slimmable.create_model("us_mobilenet_v1", num_classes=10, in_chans=1, small_input=True,
                                width_range=[0.25, 1.0], stat_widths=[0.25, 1.0])  # fmt: skip
    ck = save_checkpoint(tmp_path / "us.pt", {
        "format_version": CHECKPOINT_FORMAT_VERSION, "model": us.state_dict(), "model_name": "us_mobilenet_v1",
        "model_kwargs": us.model_kwargs, "widths": list(us.widths), "config": cfg.to_dict()})  # fmt: skip
    study = _module()
    out = tmp_path / "out"
    args = ["--checkpoint", str(ck), "--out", str(out), "--budgets", "3M,4M", "--epochs", "1", "--jobs", "2"]
    assert study.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["widths"]["rows"]
    assert [r["width"] for r in rows] == list(study.GRID) and len(rows) == 16
    assert all(a["macs"] < b["macs"] for a, b in itertools.pairwise(rows))
    assert [r["trained_exactly"] for r in rows].count(True) == 2  # only the range's ends
    for b, budget in (("3M", 3e6), ("4M", 4e6)):
        found = results["search"]["budgets"][b]
        assert found["searched_macs"] <= budget and found["uniform_macs"] <= budget
        for kind in ("searched", "uniform"):
            assert abs(results["supernet"][f"{b}/{kind}"]["macs"] - (found[f"{kind}_macs"])) < 1
            assert 0 <= results["scratch"]["runs"][f"{b}_{kind}_s0"]["top1"] <= 100
    assert (out / "us_autoslim.png").stat().st_size > 0 and "| 3M | searched |" in (out / "us_autoslim.md").read_text()
    capsys.readouterr()
    assert study.main(args) == 0  # everything is reused
    assert "4 of 4 runs finished, 0 to go" in capsys.readouterr().out
