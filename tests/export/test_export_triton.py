"""``slimmable export --format triton``: the repository's layout and configs (parsed as Triton parses them), each
version's ONNX file equal to the slimmable model at its width, the router's width choice, and the Python-backend
model files run against a stand-in for Triton's ``triton_python_backend_utils`` (the real server:
``test_export_triton_server.py``, slow)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import slimmable
from slimmable.cli.main import main
from slimmable.export import export_triton
from slimmable.export.triton_models import router as router_module
from slimmable.export.triton_models import source
from slimmable.export.triton_repo import model_config, read_route, triton_version
from slimmable.nn import use_width
from slimmable.runtime import policy as policy_module

ort = pytest.importorskip("onnxruntime")

SMALL = ["--model", "slim_mobilenet_v1", "--num-classes", "10", "--small-input"]
FAST = {"exporter": "torchscript", "input_size": 32}  # the fast ONNX exporter (the default one: test_export_formats)


def _slim_out(model, width, x):
    with torch.no_grad(), use_width(model, width):
        out = model(x)
    return out["out"] if isinstance(out, dict) else out


def _inputs(*batches, shape=(3, 32, 32)):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(b, *shape, generator=g) for b in batches]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _pb2():
    """Triton's ``ModelConfig`` protobuf module (tritonclient's copy)."""
    pytest.importorskip("google.protobuf")
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        pytest.skip("tritonclient[grpc] is not installed")
    return model_config_pb2


def _parse_config(path: Path):
    """``config.pbtxt`` parsed into Triton's own ``ModelConfig`` message (as tritonserver parses it)."""
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), _pb2().ModelConfig())


@pytest.fixture
def mnv1(build):
    return build("slim_mobilenet_v1", widths=(0.25, 1.0))


@pytest.fixture
def repo(mnv1, tmp_path):
    return export_triton(mnv1, tmp_path / "repo", latency_runs=3, fold_bn=False, **FAST)


# ---------------------------------------------------------------------------------------------- layout and configs


def test_the_repository_layout(repo):
    assert repo.model == "slim_mobilenet_v1" and repo.router == "slim_mobilenet_v1_router"
    assert repo.versions == {25: 0.25, 100: 1.0} and repo.backend == "onnxruntime"
    assert _files(repo.path) == [
        "slim_mobilenet_v1/100/model.onnx",
        "slim_mobilenet_v1/25/model.onnx",
        "slim_mobilenet_v1/config.pbtxt",
        "slim_mobilenet_v1_router/1/model.py",
        "slim_mobilenet_v1_router/1/route.json",
        "slim_mobilenet_v1_router/1/width_policy.py",
        "slim_mobilenet_v1_router/config.pbtxt",
    ]
    assert all(d <= 1e-4 for d in repo.max_abs_diff.values()) and all(ms > 0 for ms in repo.latency_ms.values())


def test_the_model_config(repo):
    path = repo.path / repo.model / "config.pbtxt"
    text = path.read_text()
    for line in ('name: "slim_mobilenet_v1"', 'platform: "onnxruntime_onnx"', "max_batch_size: 8",
                 "version_policy: { all { } }", "dynamic_batching { }", "data_type: TYPE_FP32"):  # fmt: skip
        assert line in [t.strip() for t in text.splitlines()], line
    cfg = _parse_config(path)
    assert cfg.name == "slim_mobilenet_v1" and cfg.platform == "onnxruntime_onnx" and not cfg.backend
    assert cfg.max_batch_size == 8 and cfg.version_policy.WhichOneof("policy_choice") == "all"
    assert cfg.HasField("dynamic_batching")
    ((inp,), (out,)) = cfg.input, cfg.output
    assert (inp.name, list(inp.dims), out.name, list(out.dims)) == ("input", [3, 32, 32], "logits", [10])
    assert inp.data_type == out.data_type == _pb2().TYPE_FP32


def test_the_router_config_and_route(repo):
    cfg = _parse_config(repo.path / repo.router / "config.pbtxt")
    assert cfg.name == repo.router and cfg.backend == "python" and not cfg.platform and cfg.max_batch_size == 8
    ((inp,), (out, width)) = cfg.input, cfg.output
    assert (inp.name, list(inp.dims), out.name, list(out.dims)) == ("input", [3, 32, 32], "logits", [10])
    assert (width.name, list(width.dims), width.data_type) == ("width", [1], _pb2().TYPE_FP32)  # what each item ran
    kind_cpu = _pb2().ModelInstanceGroup.KIND_CPU
    assert [(g.kind, g.count) for g in cfg.instance_group] == [(kind_cpu, 1)]  # it only forwards requests
    route = read_route(repo.path, repo.model)
    assert route["model"] == repo.model and route["input"] == "input" and route["outputs"] == ["logits"]
    assert [(e["version"], e["width"]) for e in route["versions"]] == [(25, 0.25), (100, 1.0)]
    assert all(e["latency_ms"] > 0 and e["macs"] > 0 for e in route["versions"])
    for e in route["versions"]:  # batch 1 and max_batch_size, for the router's interpolation
        assert set(e["latency_ms_by_batch"]) == {"1", "8"} and e["latency_ms_by_batch"]["1"] == e["latency_ms"]
    assert route["latency"]["batch_sizes"] == [1, 8]
    assert {k: v for k, v in route["policy"].items() if k != "what"} == {
        "name": "load_aware", "utilization": 0.8, "tail_quantile": 0.99, "parallelism": 1
    }  # fmt: skip
    policy_py = repo.path / repo.router / "1" / "width_policy.py"
    assert policy_py.read_text() == source("width_policy") == Path(policy_module.__file__).read_text()
    assert route["versions"][0]["macs"] < route["versions"][1]["macs"]
    model_py = repo.path / repo.router / "1" / "model.py"
    assert model_py.read_text() == source("router")
    compile(model_py.read_text(), str(model_py), "exec")  # valid Python


def test_every_version_is_the_slim_model_at_its_width(mnv1, repo):
    for version, w in repo.versions.items():
        sess = ort.InferenceSession(str(repo.path / repo.model / str(version) / "model.onnx"))
        assert [i.name for i in sess.get_inputs()] == ["input"] and [o.name for o in sess.get_outputs()] == ["logits"]
        for x in _inputs(1, 4):  # the batch is dynamic
            got = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
            torch.testing.assert_close(got, _slim_out(mnv1, w, x), atol=1e-4, rtol=0)


def test_exporting_again_replaces_the_models_and_leaves_others(mnv1, repo):
    other = repo.path / "someone_else" / "1"
    other.mkdir(parents=True)
    (other / "model.onnx").write_bytes(b"x")
    again = export_triton(mnv1, repo.path, [1.0], latency_runs=0, max_batch_size=2, **FAST)
    assert again.versions == {100: 1.0} and again.latency_ms == {100: None}
    assert sorted(p.name for p in repo.path.iterdir()) == [
        "slim_mobilenet_v1",
        "slim_mobilenet_v1_router",
        "someone_else",
    ]
    assert sorted(p.name for p in (repo.path / repo.model).iterdir()) == ["100", "config.pbtxt"]
    assert "max_batch_size: 2" in (repo.path / repo.model / "config.pbtxt").read_text()


def test_the_segmenter_exports_its_out_logits(tmp_path):
    seg = slimmable.create_model("slim_lraspp_mobilenet_v2", num_classes=4, widths=(0.5, 1.0)).eval()
    repo = export_triton(seg, tmp_path, name="seg", latency_runs=0, **FAST)
    assert repo.versions == {50: 0.5, 100: 1.0}
    for folder in ("seg", "seg_router"):
        cfg = (tmp_path / folder / "config.pbtxt").read_text()
        assert 'name: "out"' in cfg and "dims: [ 4, 32, 32 ]" in cfg and "dims: [ 3, 32, 32 ]" in cfg
    assert read_route(tmp_path, "seg")["outputs"] == ["out"]
    (x,) = _inputs(2)
    for version, w in repo.versions.items():
        sess = ort.InferenceSession(str(tmp_path / "seg" / str(version) / "model.onnx"))
        assert [o.name for o in sess.get_outputs()] == ["out"]
        got = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
        torch.testing.assert_close(got, _slim_out(seg, w, x), atol=1e-4, rtol=1e-4)


def test_model_config_text():
    text = model_config("m", backend="python", max_batch_size=4, input_dims=(1, 8, 8), output_name="out",
                        output_dims=(2,), all_versions=False, dynamic_batching=False)  # fmt: skip
    assert text.splitlines()[:3] == ['name: "m"', 'backend: "python"', "max_batch_size: 4"]
    assert "version_policy" not in text and "dynamic_batching" not in text and "dims: [ 1, 8, 8 ]" in text
    with pytest.raises(ValueError, match="exactly one of platform and backend"):
        model_config("m", max_batch_size=1, input_dims=(1,), output_name="o", output_dims=(1,))


# ---------------------------------------------------------------------------------------------- the router's choice

ROUTE = {
    "model": "m",
    "input": "input",
    "outputs": ["logits"],
    "versions": [  # as written: narrowest first (the order is not relied on)
        {"version": 25, "width": 0.25, "latency_ms": 1.0},
        {"version": 50, "width": 0.5, "latency_ms": 2.5},
        {"version": 100, "width": 1.0, "latency_ms": 6.0},
    ],
}


@pytest.mark.parametrize(
    ("params", "version"),
    [
        ({}, 100),  # neither: the widest
        ({"width": 0.5}, 50),
        ({"width": "0.25"}, 25),  # a string, for Triton builds without floating-point parameters
        ({"width": 1}, 100),
        ({"width": 0.1 + 0.15}, 25),  # compared at 6 decimals
        ({"latency_budget_ms": 100}, 100),
        ({"latency_budget_ms": 6.0}, 100),  # fits exactly
        ({"latency_budget_ms": 5.9}, 50),
        ({"latency_budget_ms": "2.5"}, 50),
        ({"latency_budget_ms": 1.0}, 25),
        ({"latency_budget_ms": None, "width": 0.5}, 50),
        ({"other": "ignored"}, 100),
    ],
)
def test_the_router_picks_the_version(params, version):
    entry = router_module.choose_version(ROUTE, *router_module.request_choice(params))
    assert entry["version"] == version


def test_the_widest_fitting_width_wins_even_when_latency_is_not_monotonic():
    route = {**ROUTE, "versions": [{**e, "latency_ms": ms} for e, ms in zip(ROUTE["versions"], (3.0, 2.0, 9.0))]}
    assert router_module.choose_version(route, budget_ms=3.5)["version"] == 50
    assert router_module.choose_version(route, budget_ms=2.0)["version"] == 50


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"width": 0.3}, r"m has no width 0.3; its widths 0.25, 0.5, 1 \(versions 25, 50, 100\)"),
        ({"width": 0.5, "latency_budget_ms": 3}, "either parameter width or latency_budget_ms, not both"),
        ({"latency_budget_ms": 0.5}, r"latency_budget_ms 0.5 is below the fastest width of m: width 0.25 took 1 ms"),
        ({"width": "half"}, "parameter width must be a positive number"),
        ({"width": True}, "parameter width must be a positive number"),
        ({"width": -1}, "parameter width must be a positive number"),
        ({"latency_budget_ms": "nan"}, "parameter latency_budget_ms must be a positive number"),
        ({"budget_ms": 5}, "the budget parameter is 'latency_budget_ms'"),
    ],
)
def test_the_router_refuses(params, message):
    with pytest.raises(router_module.RouteError, match=message):
        router_module.choose_version(ROUTE, *router_module.request_choice(params))


def test_budgets_need_measured_latencies():
    route = {**ROUTE, "versions": [{**e, "latency_ms": None} for e in ROUTE["versions"]]}
    assert router_module.choose_version(route, width=0.5)["version"] == 50
    with pytest.raises(router_module.RouteError, match="not measured .* send width"):
        router_module.choose_version(route, budget_ms=10)


def test_the_written_router_file_imports_without_triton(repo):
    """The repository's ``model.py`` itself, imported as Triton would (but without Triton's module), routes."""
    written = _load_file(repo.path / repo.router / "1" / "model.py")
    assert written.pb_utils is None
    route = written.load_route(str(repo.path / repo.router / "1" / "route.json"))
    assert written.choose_version(route, 0.25)["version"] == 25
    with pytest.raises(RuntimeError, match="Triton Python-backend model"):
        written.TritonPythonModel().initialize({})


# ---------------------------------------------------------------------------------------------- python backend


def test_the_python_backend_repository_runs_in_a_stand_in_for_triton(mnv1, tmp_path, monkeypatch):
    """``--triton-backend python``: each version is ``model.py`` + ``model.onnx``; the model files run in a stand-in
    for Triton's Python backend (requests in, responses out, BLS calls from the router to the versions)."""
    repo = export_triton(mnv1, tmp_path, triton_backend="python", max_batch_size=4, latency_runs=2, **FAST)
    assert _files(tmp_path) == [
        "slim_mobilenet_v1/100/model.onnx",
        "slim_mobilenet_v1/100/model.py",
        "slim_mobilenet_v1/25/model.onnx",
        "slim_mobilenet_v1/25/model.py",
        "slim_mobilenet_v1/config.pbtxt",
        "slim_mobilenet_v1_router/1/model.py",
        "slim_mobilenet_v1_router/1/route.json",
        "slim_mobilenet_v1_router/1/width_policy.py",
        "slim_mobilenet_v1_router/config.pbtxt",
    ]
    cfg = (tmp_path / repo.model / "config.pbtxt").read_text()
    assert 'backend: "python"' in cfg and "platform" not in cfg and "max_batch_size: 4" in cfg
    assert "version_policy: { all { } }" in cfg and "dynamic_batching { }" in cfg

    fake = _fake_pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    config = {"input": [{"name": "input"}], "output": [{"name": "logits"}],
              "parameters": {"intra_op_thread_count": {"string_value": "1"}}}  # fmt: skip
    versions = {}
    for version in repo.versions:
        module = _load_file(tmp_path / repo.model / str(version) / "model.py")
        model = module.TritonPythonModel()
        model.initialize(_args(config, tmp_path / repo.model, version))
        versions[version] = model
    fake.models[repo.model] = versions
    # a dynamic batch of two requests (batches 1 and 3) runs as one call and splits back
    a, b = _inputs(1, 3)
    replies = versions[25].execute([fake.Request({"input": a.numpy()}), fake.Request({"input": b.numpy()})])
    for x, reply in zip((a, b), replies):
        got = torch.from_numpy(reply.output_tensors()[0].as_numpy())
        torch.testing.assert_close(got, _slim_out(mnv1, 0.25, x), atol=1e-4, rtol=0)

    router = _load_file(tmp_path / repo.router / "1" / "model.py").TritonPythonModel()
    router.initialize(_args({}, tmp_path / repo.router, 1))
    route = read_route(tmp_path, repo.model)
    fastest = route["versions"][0]["latency_ms"]
    (x,) = _inputs(2)
    cases = [({}, 1.0), ({"width": 0.25}, 0.25), ({"width": "1.0"}, 1.0), ({"latency_budget_ms": fastest}, None)]
    requests = [fake.Request({"input": x.numpy()}, params) for params, _ in cases]
    requests.append(fake.Request({"input": x.numpy()}, {"width": 0.5}))
    replies = asyncio.run(router.execute(requests))
    ran = []
    for (params, w), reply in zip(cases, replies):
        assert not reply.has_error(), reply.error().message()
        if w is None:  # the budget: the widest width measured within it (at least the fastest)
            w = router_module.choose_version(route, budget_ms=params["latency_budget_ms"])["width"]
        ran.append((repo.model, triton_version(w)))
        assert reply.parameters == {"width": f"{w:g}", "version": triton_version(w)}
        width_out = reply.output_tensors()[1]
        assert width_out.name() == "width" and width_out.as_numpy().tolist() == [[w]] * len(x)
        got = torch.from_numpy(reply.output_tensors()[0].as_numpy())
        torch.testing.assert_close(got, _slim_out(mnv1, w, x), atol=1e-4, rtol=0)
    bad = replies[-1]
    assert bad.has_error() and bad.error().code == fake.TritonError.INVALID_ARG
    assert "has no width 0.5; its widths 0.25, 1 (versions 25, 100)" in bad.error().message()
    assert fake.calls == ran  # one BLS call per routed request, none for the refused one


def test_onnx_model_helpers():
    module = _load_source("onnx_model")
    parts = module.split_batch([np.arange(12).reshape(6, 2)], [1, 2, 3])
    assert [p[0].shape[0] for p in parts] == [1, 2, 3] and parts[2][0][0, 0] == 6
    assert module.config_int({"parameters": {"k": {"string_value": "3"}}}, "k") == 3
    assert module.config_int({}, "k") is None
    with pytest.raises(ValueError, match="non-negative integer"):
        module.config_int({"parameters": {"k": {"string_value": "x"}}}, "k")


# ---------------------------------------------------------------------------------------------- errors and the CLI


def test_a_detector_is_refused(tmp_path):
    det = slimmable.create_model("slim_keypointrcnn_mobilenet_v2_fpn")
    with pytest.raises(ValueError, match="Triton repositories take classifiers and segmenters.*--format onnx"):
        export_triton(det, tmp_path, [0.35])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"widths": [0.12345]}, r"width 0.12345 has no Triton version.*multiples of 0.0001"),
        ({"widths": [0.00004]}, "width 4e-05 has no Triton version"),
        ({"widths": [0.25, 0.250000001]}, "both have Triton version 25"),
        ({"max_batch_size": 0}, "max_batch_size 0 must be an integer >= 1"),
        ({"triton_backend": "tensorrt"}, "triton_backend 'tensorrt' is not one of onnxruntime, python"),
        ({"name": "a/b"}, "model name 'a/b' cannot name a Triton model folder"),
        ({"name": ""}, "cannot name a Triton model folder"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(mnv1, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        export_triton(mnv1, tmp_path / "repo", **kwargs)
    assert not (tmp_path / "repo").exists()


def test_triton_versions():
    assert [triton_version(w) for w in (0.01, 0.25, 0.35, 0.5, 1.0, 1.5, 0.1 + 0.2)] == [1, 25, 35, 50, 100, 150, 30]
    assert triton_version(0.0625, 10000) == 625
    # widths finer than 0.01 (the main job's) scale every version of the repository alike
    from slimmable.export.triton_repo import _versions

    assert _versions([0.25, 0.0625, 0.125, 0.1875]) == {625: 0.0625, 1250: 0.125, 1875: 0.1875, 2500: 0.25}
    assert _versions([0.35, 1.0]) == {35: 0.35, 100: 1.0}
    with pytest.raises(ValueError, match="multiples of 0.0001"):
        _versions([0.123456, 1.0])


def test_cli_writes_a_repository(capsys, tmp_path):
    out = tmp_path / "repo"
    args = ["export", *SMALL, "--width", "0.25,1.0", "--format", "triton", "--exporter", "torchscript"]
    assert main([*args, "--latency-runs", "1", "--max-batch-size", "2", "--name", "mnv1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "wrote Triton models 'mnv1' (2 versions, onnxruntime backend) and 'mnv1_router'" in text
    assert "tritonserver --model-repository=" in text and "max diff vs PyTorch" in text
    assert sorted(p.name for p in out.iterdir()) == ["mnv1", "mnv1_router"]
    assert sorted(p.name for p in (out / "mnv1").iterdir()) == ["100", "25", "config.pbtxt"]
    assert "max_batch_size: 2" in (out / "mnv1" / "config.pbtxt").read_text()
    assert main([*args, "--triton-backend", "python", "--latency-runs", "0", "--out", str(out)]) == 0
    assert (out / "slim_mobilenet_v1" / "25" / "model.py").is_file()


def test_cli_refusals(capsys, tmp_path):
    out = str(tmp_path / "repo")
    cases = [
        (["--format", "triton", "--width", "0.12345"], "width 0.12345 has no Triton version"),
        (["--format", "triton", "--bundle"], "--bundle does not apply to --format triton"),
        (["--format", "onnx", "--triton-backend", "python"], "--triton-backend: for --format triton only"),
        (["--max-batch-size", "4", "--name", "x"], "--max-batch-size, --name: for --format triton only; drop them"),
    ]
    for extra, message in cases:
        assert main(["export", *SMALL, *extra, "--out", out]) == 2
        assert message in capsys.readouterr().err
    det = ["export", "--model", "slim_keypointrcnn_mobilenet_v2_fpn", "--width", "0.35", "--format", "triton"]
    assert main([*det, "--out", out]) == 2
    assert "--format triton takes classifiers and segmenters" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


# ---------------------------------------------------------------------------------------------- helpers


def _load_file(path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"_triton_model_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_source(name: str) -> types.ModuleType:
    module = types.ModuleType(f"_triton_source_{name}")
    exec(compile(source(name), f"{name}.py", "exec"), module.__dict__)
    return module


def _args(config: dict, folder: Path, version: int) -> dict[str, str]:
    """``initialize``'s arguments as Triton's Python backend gives them."""
    return {
        "model_config": json.dumps(config),
        "model_instance_kind": "CPU",
        "model_instance_device_id": "0",
        "model_repository": str(folder),
        "model_version": str(version),
        "model_name": folder.name,
    }


def _fake_pb_utils() -> types.ModuleType:
    """A stand-in for ``triton_python_backend_utils``: tensors, requests, responses, errors, and BLS calls that
    run the registered Python models (``fake.models[name][version]``)."""
    fake = types.ModuleType("triton_python_backend_utils")
    fake.models = {}
    fake.calls = []

    class Tensor:
        def __init__(self, name, array):
            self._name, self._array = name, np.asarray(array)

        def name(self):
            return self._name

        def as_numpy(self):
            return self._array

    class TritonError:
        INVALID_ARG = 3

        def __init__(self, message, code=None):
            self._message, self.code = message, code

        def message(self):
            return self._message

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None, parameters=None):
            self._tensors, self._error, self.parameters = output_tensors or [], error, parameters

        def has_error(self):
            return self._error is not None

        def error(self):
            return self._error

        def output_tensors(self):
            return self._tensors

    class Request:  # an incoming request
        def __init__(self, arrays, params=None):
            self.tensors = [Tensor(n, a) for n, a in arrays.items()]
            self._params = params or {}

        def parameters(self):
            return json.dumps(self._params)

    class InferenceRequest:  # a BLS request
        def __init__(self, model_name, model_version, requested_output_names, inputs):
            self.model, self.version, self.outputs, self.inputs = (
                model_name,
                model_version,
                requested_output_names,
                inputs,
            )

        async def async_exec(self):
            fake.calls.append((self.model, self.version))
            request = Request({t.name(): t.as_numpy() for t in self.inputs})
            (reply,) = fake.models[self.model][self.version].execute([request])
            return reply

    def get_input_tensor_by_name(request, name):
        return next((t for t in request.tensors if t.name() == name), None)

    fake.Tensor, fake.TritonError, fake.InferenceResponse = Tensor, TritonError, InferenceResponse
    fake.Request, fake.InferenceRequest, fake.get_input_tensor_by_name = (
        Request,
        InferenceRequest,
        get_input_tensor_by_name,
    )
    return fake


# ---------------------------------------------------------------------------------------------- the router's policy

ROUTE_BY_BATCH = {
    **ROUTE,
    "versions": [
        {"version": 25, "width": 0.25, "latency_ms": 1.0, "latency_ms_by_batch": {"1": 1.0, "9": 3.0}},
        {"version": 50, "width": 0.5, "latency_ms": 2.5, "latency_ms_by_batch": {"1": 2.5, "9": 10.5}},
        {"version": 100, "width": 1.0, "latency_ms": 6.0, "latency_ms_by_batch": {"1": 6.0, "9": 30.0}},
    ],
    "policy": {"what": "...", "name": "load_aware", "utilization": 0.8, "parallelism": 1},
}


def test_the_estimator_interpolates_the_batches_and_learns_the_drift():
    est = router_module.Estimator(ROUTE_BY_BATCH, policy_module.interpolate_latency)
    assert est.base(0.25, 1) == 1.0 and est.base(0.25, 5) == pytest.approx(2.0) and est.base(1.0, 9) == 30.0
    assert est.base(1.0, 17) == pytest.approx(54.0)  # extrapolated along the same line
    assert est(0.5, 1) == 2.5  # no drift yet
    for _ in range(50):  # twice as slow as measured, at any width and batch
        est.observe(0.5, 9, 21.0)
    assert est.drift == pytest.approx(2.0, rel=1e-3) and est(1.0, 1) == pytest.approx(12.0, rel=1e-3)
    # only one image measured: in proportion to the batch
    one = router_module.Estimator(ROUTE, policy_module.interpolate_latency)
    assert one.base(0.5, 4) == 10.0


def test_the_router_policy_narrows_behind_requests_in_flight(tmp_path):
    path = tmp_path / "width_policy.py"
    path.write_text(source("width_policy"))
    est = router_module.Estimator(ROUTE_BY_BATCH, policy_module.interpolate_latency)
    policy = router_module.load_policy(str(path), ROUTE_BY_BATCH, est)
    assert type(policy).__name__ == "LoadAwarePolicy" and policy.utilization == 0.8 and policy.parallelism == 1
    first = policy.choose(8.0, 1)
    assert first.width == 1.0  # nothing ahead: 6 ms fits
    second = policy.choose(8.0, 1)
    assert second.width == 0.25 and second.queue_ms == 6.0  # 6 ms ahead: only 1 ms fits the 2 left
    policy.finished(first)
    policy.finished(second)
    static = router_module.load_policy(str(path), {**ROUTE_BY_BATCH, "policy": {"name": "static"}}, est)
    static.admit(1.0, 1)
    assert static.choose(8.0, 1).width == 1.0  # the static rule ignores the queue
    with pytest.raises(ValueError, match="width policy 'fastest' is not known"):
        router_module.load_policy(str(path), {**ROUTE_BY_BATCH, "policy": {"name": "fastest"}}, est)
    with pytest.raises(RuntimeError, match="write the repository again"):
        router_module.load_policy(str(tmp_path / "missing.py"), ROUTE_BY_BATCH, est)
