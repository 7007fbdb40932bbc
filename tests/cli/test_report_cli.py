"""``slimmable report RUN_DIR`` prints a finished run's table; an unfinished or missing run is a clear error."""

from __future__ import annotations

import json

from slimmable.cli.main import main


def test_report_prints_saved_table_and_outputs(tmp_path, capsys) -> None:
    rows = [
        {"width": 0.5, "top1": 88.25, "top5": 99.1, "loss": 0.31, "images": 100, "macs": 2.5e6, "params": 1e5,
         "latency_ms": 1.25},
        {"width": 1.0, "top1": 90.5, "top5": 99.5, "loss": 0.27, "images": 100, "macs": 9e6, "params": 4e5,
         "latency_ms": None},
    ]  # fmt: skip
    meta = {"model": "slim_resnet18", "dataset": "fashion_mnist", "split": "test", "epoch": 3, "checkpoint": "b.pt"}
    (tmp_path / "final_metrics.json").write_text(json.dumps({"meta": meta, "widths": rows}))
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "slim_resnet18 on fashion_mnist: test split" in out and "(epoch 3)" in out
    assert "88.25" in out and "90.50" in out and "2.50" in out and "9.00" in out
    assert "accuracy_vs_macs.png" in out


def test_report_of_unfinished_run_says_how_to_resume(tmp_path, capsys) -> None:
    (tmp_path / "last.pt").write_bytes(b"x")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds no finished run" in err and "--resume" in err
    (tmp_path / "final_metrics.json").write_text("{")
    assert main(["report", str(tmp_path)]) == 2
    assert "not a slimmable report" in capsys.readouterr().err
