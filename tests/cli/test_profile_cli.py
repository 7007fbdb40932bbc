"""``slimmable profile`` prints the per-width table with the official MACs."""

from __future__ import annotations

import json

import pytest

from slimmable.cli.main import main


def test_profile_prints_official_macs(capsys, tmp_path) -> None:
    out_json = tmp_path / "p.json"
    assert main(["profile", "slim_mobilenet_v2", "--runs", "1", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    for macs in ("59.3", "97.1", "209.1", "300.8"):
        assert macs in text
    data = json.loads(out_json.read_text())
    assert [p["width"] for p in data["profiles"]] == [0.35, 0.5, 0.75, 1.0]


def test_profile_unknown_model_is_a_clear_error(capsys) -> None:
    assert main(["profile", "mobilenet"]) == 2
    assert "unknown model 'mobilenet'" in capsys.readouterr().err


def test_help_lists_commands(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "profile" in capsys.readouterr().out
