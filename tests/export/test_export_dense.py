"""Dense export: every registered model at every width equals the slimmable model, holds no slimmable layer, and
leaves the source model untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimmable
from slimmable.export import export_channels, export_width, fold_batchnorm, is_dense
from slimmable.nn import (
    PatchEmbed,
    SelfAttention,
    SlimModule,
    get_channels,
    set_channels,
    slim_modules,
    use_width,
)

# the plain modules transformer layers become: no width state, standard torch layers and tensors inside
_DENSE_FORMS = (PatchEmbed, SelfAttention)


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "layer_states": [(n, m._get_state()) for n, m in slim_modules(model)],
        "training": [m.training for m in model.modules()],
        "hooks": sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()),
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    assert a["layer_states"] == b["layer_states"]
    assert a["training"] == b["training"]
    assert a["hooks"] == b["hooks"]


def _assert_plain(dense: nn.Module) -> None:
    assert is_dense(dense)
    assert not any(isinstance(m, SlimModule) for m in dense.modules())
    assert not any(
        type(m).__module__.startswith("slimmable.nn") and type(m) not in _DENSE_FORMS for m in dense.modules()
    )
    for m in dense.modules():
        if isinstance(m, nn.Conv2d):
            assert type(m) is nn.Conv2d and m.weight.is_contiguous()
            assert m.weight.shape == (m.out_channels, m.in_channels // m.groups, *m.kernel_size)


@pytest.mark.parametrize("name", slimmable.list_models(task="classification"))
def test_every_model_every_width_equals_slim(name, build, widths_of, x):
    model = build(name)
    before = _snapshot(model)
    for w in widths_of(model):
        dense = export_width(model, w)
        _assert_plain(dense)
        assert not dense.training
        with torch.no_grad(), use_width(model, w):
            ref = model(x)
        with torch.no_grad():
            out = dense(x)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        # a batch size other than the recording pass's
        with torch.no_grad(), use_width(model, w):
            torch.testing.assert_close(dense(x[:1]), model(x[:1]), atol=1e-5, rtol=0)
        assert dense.export_info["width"] == pytest.approx(w)
    _assert_same(before, _snapshot(model))  # the source model is unchanged


@pytest.mark.parametrize("name", ["slim_mobilenet_v2", "slim_resnet18", "slim_shufflenet_v1", "us_mobilenet_v1"])
def test_fold_bn_equals_slim(name, build, widths_of, x):
    model = build(name)
    for w in widths_of(model):
        dense = export_width(model, w, fold_bn=True)
        _assert_plain(dense)
        # every BN of these families follows a convolution in an nn.Sequential, so none is left
        assert not any(isinstance(m, nn.BatchNorm2d) for m in dense.modules())
        with torch.no_grad(), use_width(model, w):
            ref = model(x)
            out = dense(x)
        torch.testing.assert_close(out, ref, atol=1e-5 * max(1.0, float(ref.abs().max())), rtol=0)


def test_fold_batchnorm_counts_and_rejects_slim_models(build):
    model = build("slim_mobilenet_v1")
    dense = export_width(model, 0.5)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in dense.modules())
    assert fold_batchnorm(dense) == n_bn
    assert fold_batchnorm(dense) == 0
    with pytest.raises(TypeError, match="dense"):
        fold_batchnorm(model)


def test_export_is_independent_of_source(build, x):
    model = build("slim_mobilenet_v2")
    dense = export_width(model, 0.5)
    with torch.no_grad():
        before = dense(x).clone()
        for p in model.parameters():
            p.add_(1.0)
    with torch.no_grad():
        assert torch.equal(dense(x), before)
    src_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not any(p.untyped_storage().data_ptr() in src_ptrs for p in dense.parameters())


def test_training_mode_source_exports_eval_behaviour(build, x):
    model = build("slim_resnet18").train()
    dense = export_width(model, 0.25)
    assert model.training and not dense.training
    model.eval()
    with torch.no_grad(), use_width(model, 0.25):
        torch.testing.assert_close(dense(x), model(x), atol=1e-5, rtol=0)


def test_export_channels_matches_set_channels(build, x):
    model = build("slim_mobilenet_v2")
    with use_width(model, 0.5):
        spec_half = get_channels(model)
    dense = export_channels(model, spec_half)
    ref_dense = export_width(model, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), ref_dense(x), atol=1e-5, rtol=0)
    # a mixed spec: the widest network with two blocks slimmed to their 0.35 switch
    with use_width(model, 1.0):
        full = get_channels(model)
    with use_width(model, 0.35):
        narrow = get_channels(model)
    mixed = dict(full)
    for key in ("features.2.body.0", "features.5.body.0"):
        mixed[key] = narrow[key]
    before = _snapshot(model)
    dense = export_channels(model, mixed)
    _assert_same(before, _snapshot(model))
    assert dense.export_info["width"] is None
    assert dense.export_info["channels"]["features.2.body.0"] == narrow["features.2.body.0"]
    import copy

    twin = copy.deepcopy(model)
    set_channels(twin, mixed)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), twin(x), atol=1e-5, rtol=0)


def test_unknown_width_is_a_clear_error(build):
    model = build("slim_mobilenet_v2")
    with pytest.raises(ValueError, match=r"0\.35, 0\.5, 0\.75, 1"):
        export_width(model, 0.3)


def test_us_width_without_statistics_is_a_clear_error(build):
    model = build("us_mobilenet_v2")
    with pytest.raises(ValueError, match="calibrate BN statistics"):
        export_width(model, 0.36)


def test_bad_spec_is_a_clear_error(build):
    model = build("slim_mobilenet_v2")
    with pytest.raises(KeyError, match="did you mean"):
        export_channels(model, {"features.2.body.O": 8})
    with pytest.raises(TypeError, match="mapping"):
        export_channels(model, [("features.2.body.0", 8)])


def test_non_slimmable_model_is_a_type_error():
    with pytest.raises(TypeError, match="no slimmable layers"):
        export_width(nn.Sequential(nn.Conv2d(3, 4, 3)), 1.0)


def test_wrapped_model_exports(build, x):
    model = build("slim_mobilenet_v1")
    dense = export_width(nn.DataParallel(model), 0.25)
    with torch.no_grad(), use_width(model, 0.25):
        torch.testing.assert_close(dense(x), model(x), atol=1e-5, rtol=0)


def test_shared_bn_model_exports_at_each_width(build, x):
    model = build("slim_mobilenet_v1", norm="shared")
    for w in model.widths:
        dense = export_width(model, w)
        _assert_plain(dense)
        with torch.no_grad(), use_width(model, w):
            torch.testing.assert_close(dense(x), model(x), atol=1e-5, rtol=0)
