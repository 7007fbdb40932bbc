"""``slimmable calibrate`` and ``slimmable search`` on checkpoints of freshly built models with fake data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from fake_data import tiny_recipe

import slimmable
from slimmable.cli import search_cmd
from slimmable.cli.main import main
from slimmable.config import RunConfig
from slimmable.search import count_macs
from slimmable.search.autoslim import load_channel_spec
from slimmable.train import CHECKPOINT_FORMAT_VERSION, build_model_from_checkpoint, load_checkpoint, save_checkpoint

US_KWARGS = {"num_classes": 10, "in_chans": 1, "small_input": True, "width_range": [0.35, 0.7],
             "stat_widths": [0.35, 0.7]}  # fmt: skip


def _checkpoint(path: Path, fmnist: Path, name: str, kwargs: dict) -> Path:
    """A checkpoint as `slimmable train` writes it, of a freshly built model (training is tested elsewhere)."""
    torch.manual_seed(0)
    model = slimmable.create_model(name, **kwargs)
    cfg = RunConfig.from_dict(tiny_recipe(fmnist, model={"name": name, "widths": kwargs.get("widths")}))
    ckpt = {"format_version": CHECKPOINT_FORMAT_VERSION, "model": model.state_dict(), "model_name": name,
            "model_kwargs": model.model_kwargs, "widths": list(model.widths), "config": cfg.to_dict()}  # fmt: skip
    return save_checkpoint(path, ckpt)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_calibrate_adds_us_widths_and_the_output_evaluates_at_them(
    fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = _checkpoint(tmp_path / "best.pt", fmnist, "us_mobilenet_v2", US_KWARGS)
    digest = _digest(ck)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad(), pytest.raises(RuntimeError, match="no statistics for width 0.5"):
        build_model_from_checkpoint(ck).set_width(0.5)(x)
    rc = main(["calibrate", "--checkpoint", str(ck), "--widths", "0.5,0.6", "--batches", "2"])
    text = capsys.readouterr().out
    assert rc == 0, text
    out = tmp_path / "best_calibrated.pt"  # the default output, beside the input
    assert f"wrote {out}" in text and "held-out top-1" in text and _digest(ck) == digest  # input untouched
    new = load_checkpoint(out)
    assert list(new["model_kwargs"]["stat_widths"]) == [0.35, 0.5, 0.6, 0.7] and new["widths"] == [0.35, 0.5, 0.6, 0.7]
    assert new["calibration"][-1]["images_per_width"] == {0.5: 32, 0.6: 32}  # 2 batches of the recipe's 16
    model = build_model_from_checkpoint(out)  # eval mode, statistics for 0.5 and 0.6 stored
    with torch.no_grad():
        assert model.set_width(0.5)(x).shape == (2, 10)
    rc = main(["eval", "--checkpoint", str(out), "--widths", "0.5,0.6", "--latency-runs", "0", "--out",
               str(tmp_path / "ev")])  # fmt: skip
    assert rc == 0
    assert [r["width"] for r in json.loads((tmp_path / "ev.json").read_text())["widths"]] == [0.5, 0.6]


def test_calibrate_reestimates_snet_switches_and_overwrites_only_when_named(
    fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kwargs = {"num_classes": 10, "in_chans": 1, "small_input": True, "widths": [0.25, 0.5]}
    ck = _checkpoint(tmp_path / "s.pt", fmnist, "slim_mobilenet_v1", kwargs)
    before = load_checkpoint(ck)["model"]
    assert main(["calibrate", "--checkpoint", str(ck), "--batches", "1", "--out", str(ck)]) == 0
    after = load_checkpoint(ck)
    changed = {k for k in before if not torch.equal(before[k], after["model"][k])}
    assert changed and all("running_" in k or "num_batches_tracked" in k for k in changed)
    assert {k.split(".bn.")[1][0] for k in changed if ".bn." in k} == {"0", "1"}  # both switches re-estimated
    assert after["widths"] == [0.25, 0.5] and after["model_kwargs"] == load_checkpoint(ck)["model_kwargs"]
    capsys.readouterr()
    assert main(["calibrate", "--checkpoint", str(ck), "--widths", "0.4", "--out", str(tmp_path / "o.pt")]) == 2
    err = capsys.readouterr().err
    assert "width 0.4 not in widths (0.25, 0.5)" in err and not (tmp_path / "o.pt").exists()


def test_parse_budget() -> None:
    parse = search_cmd.parse_budget
    assert parse("150M") == 150e6 and parse("1.2G") == 1.2e9 and parse("5e6") == 5e6 and parse("2.5k") == 2500
    assert parse("2.5M", "params") == 2.5e6
    assert parse("12ms", "latency") == 12.0 and parse("12", "latency") == 12.0 and parse("0.012s", "latency") == 12.0
    for text, metric in (("12ms", "flops"), ("150X", "flops"), ("-5M", "flops"), ("0", "params"), ("5M", "latency")):
        with pytest.raises(ValueError):
            parse(text, metric)


def _us_setup(fmnist: Path, tmp_path: Path) -> tuple[Path, float, torch.nn.Module]:
    ck = _checkpoint(tmp_path / "us.pt", fmnist, "us_mobilenet_v2", US_KWARGS)
    model = build_model_from_checkpoint(ck)
    return ck, float(count_macs(model, torch.randn(1, 1, 16, 16))), model


def _search(ck: Path, out: Path, budgets: str, *extra: str) -> int:
    return main(["search", "--checkpoint", str(ck), "--budgets", budgets, "--out", str(out), "--steps", "3",
                 "--heldout", "16", *extra])  # fmt: skip


def test_search_writes_specs_within_budget_with_tied_channels(
    fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ck, full, model = _us_setup(fmnist, tmp_path)
    b1, b2 = f"{0.85 * full / 1e6:.4f}M", f"{0.7 * full:.0f}"
    assert _search(ck, tmp_path / "s", f"{b1},{b2}") == 0
    text = capsys.readouterr().out
    assert "step    0:" in text and "held-out top-1" in text and f"spec_{b1}.json" in text
    groups = model.channel_groups()
    assert any(len(g) > 1 for g in groups)
    for text_budget in (b1, b2):
        path = tmp_path / "s" / f"spec_{text_budget}.json"
        spec, meta = load_channel_spec(path), json.loads(path.read_text())["meta"]
        budget = search_cmd.parse_budget(text_budget)
        assert meta["budget"] == budget and meta["cost"] <= budget and 0 <= meta["heldout_top1"] <= 100
        assert meta["model"] == "slim_mobilenet_v2" and "16 images from the held-out split" in meta["heldout"]
        for group in groups:  # tied layers keep equal channels
            assert len({spec[name] for name in group}) == 1, group
        built = slimmable.create_model(meta["model"], channels=spec, num_classes=10, in_chans=1, small_input=True)
        assert count_macs(built.eval(), torch.randn(1, 1, 16, 16)) <= budget


def test_search_refuses_the_test_split_and_an_existing_state(
    fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ck, full, _ = _us_setup(fmnist, tmp_path)
    assert _search(ck, tmp_path / "s", f"{0.9 * full:.0f}", "--split", "test") == 2
    assert "--split test" in capsys.readouterr().err and not (tmp_path / "s").exists()
    assert _search(ck, tmp_path / "s", f"{0.9 * full:.0f}") == 0
    assert _search(ck, tmp_path / "s", f"{0.9 * full:.0f}") == 2
    assert "--resume" in capsys.readouterr().err
    assert _search(ck, tmp_path / "s", f"{0.9 * full:.0f}", "--resume", "--seed", "1") == 2
    assert "seed: 0 -> 1" in capsys.readouterr().err


def test_search_resumes_from_its_state_file(
    fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ck, full, _ = _us_setup(fmnist, tmp_path)
    budget = f"{0.75 * full:.0f}"
    assert _search(ck, tmp_path / "ref", budget) == 0
    reference = json.loads((tmp_path / "ref" / "search_state.json").read_text())
    assert len(reference["history"]) > 3

    lines: list[str] = []

    def interrupting_print(*args: object, **kwargs: object) -> None:  # Ctrl-C after the third step
        lines.append(" ".join(map(str, args)))
        if sum(line.startswith("step") for line in lines) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(search_cmd, "print", interrupting_print, raising=False)
    assert _search(ck, tmp_path / "cut", budget) == 130
    assert len(json.loads((tmp_path / "cut" / "search_state.json").read_text())["history"]) == 3
    monkeypatch.delattr(search_cmd, "print")
    assert _search(ck, tmp_path / "cut", budget, "--resume") == 0
    assert "resuming from" in capsys.readouterr().out
    resumed = json.loads((tmp_path / "cut" / "search_state.json").read_text())
    assert resumed["history"] == reference["history"] and resumed["found"] == reference["found"]
    spec = json.loads((tmp_path / "cut" / f"spec_{budget}.json").read_text())
    assert spec["channels"] == json.loads((tmp_path / "ref" / f"spec_{budget}.json").read_text())["channels"]


def test_searched_spec_is_calibrated_from_the_supernet_and_trained_from_scratch_by_recipe(
    fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """search → calibrate --channels (the spec's network out of the US model) → train with model.channels."""
    ck, full, _ = _us_setup(fmnist, tmp_path)
    budget = f"{0.8 * full:.0f}"
    assert _search(ck, tmp_path / "s", budget) == 0
    spec_path = tmp_path / "s" / f"spec_{budget}.json"
    spec = load_channel_spec(spec_path)
    capsys.readouterr()
    assert main(["calibrate", "--checkpoint", str(ck), "--channels", str(spec_path), "--batches", "2"]) == 0
    text = capsys.readouterr().out
    out = tmp_path / f"us_spec_{budget}_calibrated.pt"
    assert f"wrote {out}" in text and "held-out top-1" in text and "slim_mobilenet_v2" in text
    new = load_checkpoint(out)
    assert new["model_name"] == "slim_mobilenet_v2" and new["widths"] == [1.0]
    assert new["config"]["model"]["widths"] == [1.0] and new["config"]["model"]["name"] == "slim_mobilenet_v2"
    model = build_model_from_checkpoint(out)
    got = slimmable.get_channels(model)
    assert {k: got[k] for k in spec} == spec
    macs = count_macs(model, torch.randn(1, 1, 16, 16))
    assert macs <= float(budget) and f"{macs / 1e6:.2f}M" in text  # the table reports one image's MACs
    rc = main(["eval", "--checkpoint", str(out), "--latency-runs", "0", "--out", str(tmp_path / "ev")])
    assert rc == 0 and [r["width"] for r in json.loads((tmp_path / "ev.json").read_text())["widths"]] == [1.0]
    # bad input: both --widths and --channels; a spec file that is not there
    assert main(["calibrate", "--checkpoint", str(ck), "--channels", str(spec_path), "--widths", "0.5"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["calibrate", "--checkpoint", str(ck), "--channels", str(tmp_path / "nope.json")]) == 2
    assert "nope.json does not exist" in capsys.readouterr().err

    # the same spec trained from scratch: a recipe names it in model.channels
    recipe = tmp_path / "scratch.yaml"
    sections = tiny_recipe(fmnist, model={"name": "slim_mobilenet_v2", "widths": [1.0], "channels": str(spec_path)})
    recipe.write_text(json.dumps(sections))  # JSON is YAML
    run = tmp_path / "run"
    rc = main(["train", "--recipe", str(recipe), "--out", str(run), "--set", "train.epochs=1", "--no-tensorboard",
               "--latency-runs", "0"])  # fmt: skip
    assert rc == 0
    trained = build_model_from_checkpoint(run / "last.pt")  # the spec travels in the checkpoint
    got = slimmable.get_channels(trained)
    assert {k: got[k] for k in spec} == spec
