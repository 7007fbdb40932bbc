"""ONNX (checked with onnxruntime), TorchScript, pickled modules and all-width bundles."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import slimmable
from slimmable.export import (
    MANIFEST_NAME,
    export_bundle,
    export_onnx,
    export_torchscript,
    export_width,
    save_dense,
    verify_onnx,
)
from slimmable.export._io import sha256_file
from slimmable.nn import use_width

ort = pytest.importorskip("onnxruntime")


def _ort_run(path, x: torch.Tensor) -> torch.Tensor:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    return torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])


def _slim_out(model, w, x):
    with torch.no_grad(), use_width(model, w):
        return model(x)


def _inputs(*batches, size=32):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(b, 3, size, size, generator=g) for b in batches]


def test_onnx_dynamo_exporter_dynamic_batch(build, tmp_path):
    pytest.importorskip("onnxscript")
    model = build("slim_mobilenet_v2")
    res = export_onnx(model, tmp_path / "m.onnx", width=0.5, input_size=32, exporter="dynamo")
    assert res.exporter == "dynamo" and res.format == "onnx" and res.width == 0.5
    assert res.max_abs_diff is not None and res.max_abs_diff <= 1e-4
    for x in _inputs(2, 5):  # two batch sizes through one file
        torch.testing.assert_close(_ort_run(res.path, x), _slim_out(model, 0.5, x), atol=1e-4, rtol=0)
    assert os.listdir(tmp_path) == ["m.onnx"]  # no temporary files left


@pytest.mark.parametrize("name", slimmable.list_models(task="classification"))
def test_onnx_every_model_every_width_torchscript_exporter(name, build, widths_of, tmp_path):
    model = build(name)
    for w in widths_of(model):
        res = export_onnx(model, tmp_path / f"{name}_{w}.onnx", width=w, input_size=32, exporter="torchscript")
        assert res.exporter == "torchscript"
        for x in _inputs(1, 4):  # dynamic batch
            torch.testing.assert_close(_ort_run(res.path, x), _slim_out(model, w, x), atol=1e-4, rtol=0)


# every block type once: ResNet-34 and -101 repeat ResNet-18's and -50's blocks (they took 30 s of the suite)
_REPEATED_BLOCKS = ("slim_resnet34", "slim_resnet101")
_DYNAMO_MODELS = [n for n in slimmable.list_models(task="classification") if n not in _REPEATED_BLOCKS]


@pytest.mark.slow
@pytest.mark.parametrize("name", _DYNAMO_MODELS)
def test_onnx_every_block_type_dynamo(name, build, widths_of, tmp_path):
    # every width of every model goes through the TorchScript exporter above and export_width (test_export_dense);
    # the dynamo exporter traces the same dense module whatever its channel counts, so the narrowest width (where
    # the channel counts differ most from the original's) suffices (every width took 3 of the suite's 10 minutes on
    # an AVX2 CPU, both extremes 2.5 minutes of CPU time)
    pytest.importorskip("onnxscript")
    model = build(name)
    for w in sorted(widths_of(model))[:1]:
        res = export_onnx(model, tmp_path / f"{w}.onnx", width=w, input_size=32, exporter="dynamo", fold_bn=True)
        for x in _inputs(1, 3):
            ref = _slim_out(model, w, x)
            torch.testing.assert_close(_ort_run(res.path, x), ref, atol=1e-4 * max(1, float(ref.abs().max())), rtol=0)


def test_onnx_static_batch_and_dense_input(build, tmp_path):
    model = build("slim_shufflenet_v1")
    dense = export_width(model, 1.0, fold_bn=True)
    res = export_onnx(dense, tmp_path / "s.onnx", input_size=32, dynamic_batch=False, exporter="torchscript")
    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape == [1, 3, 32, 32]
    (x,) = _inputs(1)
    ref = _slim_out(model, 1.0, x)
    torch.testing.assert_close(_ort_run(res.path, x), ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="already dense"):
        export_onnx(dense, tmp_path / "t.onnx", width=1.0, exporter="torchscript")


def test_onnx_bad_arguments_write_nothing(build, tmp_path):
    model = build("slim_mobilenet_v1")
    with pytest.raises(ValueError, match="exporter"):
        export_onnx(model, tmp_path / "a.onnx", width=0.5, exporter="fast")
    with pytest.raises(ValueError, match="not both"):
        export_onnx(model, tmp_path / "a.onnx", width=0.5, channels={})
    with pytest.raises(ValueError, match="widths"):
        export_onnx(model, tmp_path / "a.onnx", width=0.3, exporter="torchscript")
    assert os.listdir(tmp_path) == []


def test_verify_onnx_detects_a_mismatch(build, tmp_path):
    model = build("slim_mobilenet_v1")
    res = export_onnx(model, tmp_path / "a.onnx", width=0.5, input_size=32, exporter="torchscript")
    other = export_width(model, 0.25)
    with pytest.raises(RuntimeError, match="differs from PyTorch"):
        verify_onnx(res.path, other, _inputs(2))


def test_torchscript_roundtrip(build, tmp_path):
    model = build("slim_shufflenet_v1")
    res = export_torchscript(model, tmp_path / "m.ts", width=0.5, input_size=32)
    assert res.max_abs_diff is not None and res.max_abs_diff <= 1e-5
    with pytest.warns(FutureWarning):  # torch.jit is deprecated; loading still works
        loaded = torch.jit.load(str(res.path))
    for x in _inputs(1, 3):
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), _slim_out(model, 0.5, x), atol=1e-5, rtol=0)


def test_save_dense_roundtrip(build, tmp_path):
    model = build("us_mobilenet_v1")
    w = model.widths[-1]
    res = save_dense(model, tmp_path / "m.pt", width=w, fold_bn=True)
    obj = torch.load(res.path, weights_only=False)
    assert obj["format_version"] == 1 and obj["export_info"]["fold_bn"] is True
    (x,) = _inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(obj["model"](x), _slim_out(model, w, x), atol=1e-5, rtol=0)


def test_bundle_manifest(build, tmp_path):
    model = build("slim_shufflenet_v1")
    manifest = export_bundle(model, tmp_path / "b", name="shuf", input_size=32, exporter="torchscript", latency_runs=2)
    assert manifest.name == MANIFEST_NAME
    data = json.loads(manifest.read_text())
    assert data["model"] == "shuf" and data["fold_bn"] is True and data["exporter"] == "torchscript"
    assert data["input"]["shape"] == ["batch", 3, 32, 32]
    entries = data["widths"]
    assert [e["width"] for e in entries] == [0.5, 1.0, 2.0]
    assert [e["file"] for e in entries] == ["shuf_w0.5.onnx", "shuf_w1.onnx", "shuf_w2.onnx"]
    macs = [e["macs"] for e in entries]
    assert macs == sorted(macs) and macs[0] > 0
    assert sorted(os.listdir(tmp_path / "b")) == sorted([MANIFEST_NAME, *(e["file"] for e in entries)])
    for e in entries:
        path = tmp_path / "b" / e["file"]
        assert e["sha256"] == sha256_file(path) and e["bytes"] == path.stat().st_size
        assert e["latency_ms"]["onnxruntime_cpu"] > 0 and e["latency_ms"]["torch_cpu"] > 0
        assert e["max_abs_diff_vs_torch"] <= 1e-4
        (x,) = _inputs(2)
        ref = _slim_out(model, e["width"], x)
        np.testing.assert_allclose(_ort_run(path, x).numpy(), ref.numpy(), atol=1e-4 * max(1, float(ref.abs().max())))


def test_auto_exporter_falls_back_without_onnxscript(build, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    model = build("slim_mobilenet_v1")
    with pytest.warns(UserWarning, match="falls back"):
        res = export_onnx(model, tmp_path / "a.onnx", width=0.25, input_size=32)
    assert res.exporter == "torchscript" and res.max_abs_diff <= 1e-4
    with pytest.raises(ImportError, match="onnxscript"):
        export_onnx(model, tmp_path / "b.onnx", width=0.25, input_size=32, exporter="dynamo")
