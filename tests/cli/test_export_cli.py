"""``slimmable export`` smoke tests: random weights, official and slimmable checkpoints, formats, bundles, errors."""

from __future__ import annotations

import json

import pytest
import torch

import slimmable
from slimmable.cli.main import main
from slimmable.export._io import spec_tag
from slimmable.nn import get_channels, use_width

ort = pytest.importorskip("onnxruntime")

SMALL = ["--model", "slim_mobilenet_v2", "--num-classes", "10", "--small-input"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machines: avoid OpenMP oversubscription stalls
    yield
    torch.set_num_threads(n)


def _ort(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])


def test_export_onnx_random_weights(capsys, tmp_path):
    out = tmp_path / "out"
    args = ["export", *SMALL, "--width", "0.35,1.0", "--exporter", "torchscript", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in text and "max diff vs PyTorch" in text
    assert sorted(p.name for p in out.iterdir()) == ["slim_mobilenet_v2_w0.35.onnx", "slim_mobilenet_v2_w1.onnx"]


@pytest.mark.parametrize(("fmt", "ext"), [("torchscript", ".ts"), ("pt", ".pt")])
def test_export_other_formats(capsys, tmp_path, fmt, ext):
    assert main(["export", *SMALL, "--width", "0.5", "--format", fmt, "--fold-bn", "--out", str(tmp_path)]) == 0
    assert (tmp_path / f"slim_mobilenet_v2_w0.5{ext}").is_file()


def test_export_channel_spec(capsys, tmp_path):
    model = slimmable.create_model("slim_mobilenet_v2", num_classes=10, small_input=True)
    with use_width(model, 0.5):
        spec = get_channels(model)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"channels": spec}))
    args = ["export", *SMALL, "--channels", str(spec_file), "--exporter", "torchscript", "--out", str(tmp_path)]
    assert main(args) == 0
    assert (tmp_path / f"slim_mobilenet_v2_{spec_tag(spec)}.onnx").is_file()


def test_export_bundle(capsys, tmp_path):
    args = ["export", *SMALL, "--bundle", "--exporter", "torchscript", "--latency-runs", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [e["width"] for e in manifest["widths"]] == [0.35, 0.5, 0.75, 1.0]
    assert all((tmp_path / e["file"]).is_file() for e in manifest["widths"])


def test_export_slimmable_checkpoint(capsys, tmp_path):
    pytest.importorskip("slimmable.train")
    model = slimmable.create_model("slim_mobilenet_v1", num_classes=10, small_input=True).eval()
    ckpt = tmp_path / "ckpt.pt"
    torch.save(
        {
            "format_version": 1,
            "model": model.state_dict(),
            "model_name": "slim_mobilenet_v1",
            "model_kwargs": dict(model.model_kwargs),
            "widths": list(model.widths),
            "preprocess": {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
        },
        ckpt,
    )
    args = ["export", "--checkpoint", str(ckpt), "--width", "0.25", "--exporter", "torchscript", "--out", str(tmp_path)]
    assert main(args) == 0
    assert "slimmable checkpoint" in capsys.readouterr().out
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), use_width(model, 0.25):
        ref = model(x)
    torch.testing.assert_close(_ort(tmp_path / "slim_mobilenet_v1_w0.25.onnx", x), ref, atol=1e-4, rtol=0)


def test_export_official_checkpoint_reproduces_official_logits(official, capsys, tmp_path):
    fixture = torch.load(official / "s_mobilenet_v2.fixture.pt", weights_only=True)
    ckpt = tmp_path / "s_mobilenet_v2.pt"
    torch.save(fixture["checkpoint"], ckpt)
    args = ["export", "--checkpoint", str(ckpt), "--model", "slim_mobilenet_v2", "--width", "0.35"]
    assert main([*args, "--exporter", "torchscript", "--out", str(tmp_path)]) == 0
    got = _ort(tmp_path / "slim_mobilenet_v2_w0.35.onnx", fixture["input"])
    torch.testing.assert_close(got, fixture["logits"][0.35], atol=1e-4, rtol=1e-4)


def test_export_errors(capsys, tmp_path):
    assert main(["export", *SMALL, "--width", "0.3", "--out", str(tmp_path)]) == 2
    assert "0.35, 0.5, 0.75, 1" in capsys.readouterr().err
    assert main(["export", "--out", str(tmp_path)]) == 2
    assert "--checkpoint PATH" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "missing.pt"), "--model", "slim_mobilenet_v2"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_export_without_the_export_extra_names_it_before_any_work(capsys, tmp_path, monkeypatch):
    # a plain `pip install slimmable` has no onnx: one line naming the extra, checked before the model is built
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    monkeypatch.setattr("slimmable.cli.export_cmd._load_model", lambda args: pytest.fail("loaded before the check"))
    out = tmp_path / "out"
    assert main(["export", *SMALL, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "slimmable export: error: ONNX export needs onnx, not installed: pip install 'slimmable[export]'" in err
    assert "Traceback" not in err and not out.exists()
    with pytest.raises(ImportError, match=r"pip install 'slimmable\[export\]'"):
        slimmable.export.export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")
