"""The exporter registry: every registered format writes a file that its runtime runs equal to the slimmable model;
unknown formats and missing dependencies are refused with the names and the pip command; bundles in any format;
``slimmable export --format`` offers exactly the registered names."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch

import slimmable
from slimmable.cli.main import build_parser, main
from slimmable.export import (
    MANIFEST_NAME,
    Exporter,
    export_bundle,
    export_width,
    get_exporter,
    list_exporters,
    register_exporter,
)
from slimmable.export._io import sha256_file
from slimmable.export.registry import _REGISTRY
from slimmable.nn import use_width

# the fast ONNX exporter here; the default (dynamo) one is tested in test_export_formats.py
_OPTS = {"onnx": {"exporter": "torchscript"}}
SMALL = ["--model", "slim_mobilenet_v1", "--num-classes", "10", "--small-input"]


def _target(name: str) -> Exporter:
    exporter = get_exporter(name)
    if not exporter.available():
        pytest.skip(f"{name}: {', '.join(exporter.missing())} not installed")
    return exporter


def _slim_out(model, width, x):
    with torch.no_grad(), use_width(model, width):
        return model(x)


def _inputs(*batches, size=32):
    g = torch.Generator().manual_seed(7)
    return [torch.randn(b, 3, size, size, generator=g) for b in batches]


def test_the_builtin_targets_are_registered():
    assert list_exporters() == ["onnx", "torchscript", "pt2", "openvino", "pt"]
    assert list_exporters(detection=True) == ["onnx", "pt"]
    assert {get_exporter(n).suffix for n in list_exporters()} == {".onnx", ".ts", ".pt2", ".xml", ".pt"}


@pytest.mark.parametrize("name", list_exporters())
def test_every_target_writes_and_verifies_two_widths(name, build, tmp_path):
    target = _target(name)
    model = build("slim_mobilenet_v1")
    for w in (0.25, 1.0):
        path = tmp_path / f"m_w{w:g}{target.suffix}"
        res = target.export(model, path, width=w, input_size=32, **_OPTS.get(name, {}))
        assert res.format == name and res.width == w and res.path == path
        assert res.max_abs_diff is not None and res.max_abs_diff <= target.atol
        assert all(f.is_file() for f in target.files(path))
        # the file, loaded by its runtime, against the slimmable model switched to the width (batch 1 and 4)
        run = target.load(path, threads=1)
        for x in _inputs(1, 4):
            torch.testing.assert_close(run(x), _slim_out(model, w, x), atol=target.atol, rtol=0)
        if w == 1.0:  # the public check, once (a load each: torch.export's takes ~1 s)
            assert target.verify(path, model, _inputs(2), width=w) <= target.atol
    names = sorted(f.name for w in (0.25, 1.0) for f in target.files(tmp_path / f"m_w{w:g}{target.suffix}"))
    assert sorted(os.listdir(tmp_path)) == names  # no temporary files or folders left


@pytest.mark.parametrize("name", ["pt2", "openvino"])
def test_verify_detects_another_width(name, build, tmp_path):
    target = _target(name)
    model = build("slim_mobilenet_v1")
    res = target.export(model, tmp_path / f"a{target.suffix}", width=0.5, input_size=32)
    with pytest.raises(RuntimeError, match="differs from PyTorch"):
        target.verify(res.path, model, _inputs(2), width=0.25)


def test_openvino_keeps_float32_weights_and_tensor_names(build, tmp_path):
    target = _target("openvino")
    from slimmable.export.openvino_ir import import_openvino

    ov = import_openvino()

    def weight_types(path):
        ir = ov.Core().read_model(str(path))
        return ir, {str(op.get_output_element_type(0)) for op in ir.get_ops() if op.get_type_name() == "Constant"}

    dense = export_width(build("slim_mobilenet_v1"), 0.25)
    ir, types = weight_types(target.export(dense, tmp_path / "m.xml", input_size=32).path)
    assert ir.inputs[0].get_names() == {"input"} and ir.outputs[0].get_names() == {"logits"}
    assert str(ir.inputs[0].get_partial_shape()) == "[?,3,32,32]"  # dynamic batch
    assert "<Type: 'float32'>" in types and "<Type: 'float16'>" not in types
    # OpenVINO's own default, on request: float16 weights, half the file, no longer within 1e-4 of PyTorch
    half = target.export(dense, tmp_path / "h.xml", input_size=32, compress_to_fp16=True, verify=False)
    assert "<Type: 'float16'>" in weight_types(half.path)[1]
    assert (tmp_path / "h.bin").stat().st_size < 0.6 * (tmp_path / "m.bin").stat().st_size


def test_an_unknown_format_names_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown export format 'tflite'; registered: onnx, torchscript, pt2, "):
        get_exporter("tflite")
    with pytest.raises(ValueError, match="'tflite'"):
        export_bundle(slimmable.create_model("slim_mobilenet_v1", num_classes=10), "unused", format="tflite")


def test_a_missing_dependency_names_the_pip_command(build, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    target = get_exporter("openvino")
    assert not target.available() and target.missing() == ["openvino"]
    with pytest.raises(ImportError, match=r"OpenVINO export needs openvino, not installed: pip install 'slimmable\["):
        target.export(build("slim_mobilenet_v1"), tmp_path / "m.xml", width=0.25, input_size=32)
    assert "openvino" not in list_exporters(available=True)
    # the CLI: one line before the model is built, with the formats that are installed
    monkeypatch.setattr("slimmable.cli.export_cmd._load_model", lambda args: pytest.fail("loaded before the check"))
    assert main(["export", *SMALL, "--format", "openvino", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'slimmable[openvino]' (or pip install openvino)" in err and "installed here: onnx" in err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_register_exporter_adds_a_format_to_the_cli(tmp_path, capsys):
    pt = get_exporter("pt")
    custom = Exporter(name="pickled2", suffix=".pk2", title="test", runtime="torch.load", write=pt.write, load=pt.load)
    with pytest.raises(ValueError, match="lowercase word"):
        register_exporter(Exporter(**{**custom.__dict__, "name": "Bad Name"}))
    with pytest.raises(ValueError, match="registered already"):
        register_exporter(Exporter(**{**custom.__dict__, "name": "onnx"}))
    register_exporter(custom)
    try:
        assert list_exporters()[-1] == "pickled2"
        assert main(["export", *SMALL, "--width", "0.5", "--format", "pickled2", "--out", str(tmp_path)]) == 0
        assert (tmp_path / "slim_mobilenet_v1_w0.5.pk2").is_file()
    finally:
        del _REGISTRY["pickled2"]


def test_cli_format_choices_are_the_registry():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["export"]
    fmt = next(a for a in sub._actions if a.dest == "format")
    # the registry's file formats, then those that write a folder of every width (a Triton repository)
    assert list(fmt.choices) == [*list_exporters(), "triton"] and fmt.default == "onnx"


def test_cli_unknown_format_lists_the_registered_ones(capsys):
    with pytest.raises(SystemExit):
        main(["export", *SMALL, "--format", "tflite"])
    err = capsys.readouterr().err
    assert "invalid choice: 'tflite'" in err and all(n in err for n in list_exporters())


@pytest.mark.parametrize("name", ["openvino", "pt2"])
def test_bundle_in_another_format_round_trips(name, build, tmp_path):
    target = _target(name)
    model = build("slim_mobilenet_v1")
    manifest = export_bundle(model, tmp_path, [0.25, 1.0], name="m", input_size=32, format=name, latency_runs=2)
    data = json.loads(manifest.read_text())
    assert data["format"] == name and data["exporter"] is None and data["opset"] is None
    entries = data["widths"]
    assert [e["file"] for e in entries] == [f"m_w0.25{target.suffix}", f"m_w1{target.suffix}"]
    written = [MANIFEST_NAME]
    for e in entries:
        path = tmp_path / e["file"]
        files = target.files(path)
        written += [f.name for f in files]
        assert e["format"] == name and e["sha256"] == sha256_file(path)
        assert e["bytes"] == sum(f.stat().st_size for f in files)
        assert [c["file"] for c in e.get("companions", [])] == [f.name for f in files[1:]]
        assert all(c["sha256"] == sha256_file(tmp_path / c["file"]) for c in e.get("companions", []))
        assert e["max_abs_diff_vs_torch"] <= target.atol
        assert e["latency_ms"][target.runtime.replace(".", "_") + "_cpu"] > 0 and e["latency_ms"]["torch_cpu"] > 0
        (x,) = _inputs(3)
        torch.testing.assert_close(target.load(path)(x), _slim_out(model, e["width"], x), atol=1e-4, rtol=0)
    assert sorted(os.listdir(tmp_path)) == sorted(written)


def test_bundle_refuses_onnx_options_for_another_format(build, tmp_path):
    with pytest.raises(ValueError, match="ONNX options"):
        export_bundle(build("slim_mobilenet_v1"), tmp_path, [0.25], format="pt2", opset=17)


def test_cli_exports_a_pt2_bundle(capsys, tmp_path):
    _target("pt2")
    args = ["export", *SMALL, "--width", "0.25", "--format", "pt2", "--bundle", "--latency-runs", "1"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    assert "wrote 1 torch.export files" in capsys.readouterr().out
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["format"] == "pt2" and manifest["widths"][0]["file"] == "slim_mobilenet_v1_w0.25.pt2"
    program = torch.export.load(str(tmp_path / "slim_mobilenet_v1_w0.25.pt2"))  # no slimmable needed
    assert program.module()(torch.randn(3, 3, 32, 32)).shape == (3, 10)  # dynamic batch


def test_targets_without_detectors_refuse_them(tmp_path, capsys):
    det = slimmable.create_model("slim_keypointrcnn_mobilenet_v2_fpn")
    for name in list_exporters(available=True):  # an uninstalled target names its pip command first
        if get_exporter(name).detection:
            continue
        with pytest.raises(ValueError, match="does not take detectors"):
            get_exporter(name).export(det, tmp_path / f"d{get_exporter(name).suffix}", width=0.35, verify=False)
    args = ["export", "--model", "slim_keypointrcnn_mobilenet_v2_fpn", "--width", "0.35", "--out", str(tmp_path)]
    assert main([*args, "--format", "pt2"]) == 2
    assert "detectors export with --format onnx or --format pt, not --format pt2" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pt2", "openvino"])
def test_every_model_exports_at_its_narrowest_width(name, build, widths_of, tmp_path):
    # every block type through torch.export and OpenVINO's converter (~1.5 s per model each)
    target = _target(name)
    for model_name in slimmable.list_models(task="classification"):
        model = build(model_name)
        w = min(widths_of(model))
        res = target.export(model, tmp_path / f"{model_name}{target.suffix}", width=w, input_size=32, fold_bn=True)
        for x in _inputs(1, 3):
            ref = _slim_out(model, w, x)
            got = target.load(res.path)(x)
            torch.testing.assert_close(got, ref, atol=target.atol * max(1, float(ref.abs().max())), rtol=0)


def test_openvino_is_imported_with_its_usage_statistics_declined(monkeypatch):
    """OpenVINO sends usage statistics on import unless declined; slimmable imports it declined for the process
    and restores the environment. (Checked in a fresh process with a private HOME by hand: consent False, no
    ~/intel written. A test that started such a process from a pytest worker that had run OpenVINO crashed the
    worker with SIGSEGV, even with posix_spawn; so the suite checks this process.)"""
    if importlib.util.find_spec("openvino") is None:  # (importorskip would import it, undeclined)
        pytest.skip("openvino is not installed")
    if "openvino" in sys.modules:  # e.g. torch's dynamo backend discovery imports openvino's entry point
        pytest.skip("openvino was imported before in this process; its own setting holds")
    from slimmable.export.openvino_ir import import_openvino

    monkeypatch.setenv("CI", "no")
    ov = import_openvino()
    import openvino_telemetry as tm

    assert ov.__name__ == "openvino" and os.environ["CI"] == "no"
    assert tm.Telemetry().consent is False
