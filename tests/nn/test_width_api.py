"""The one width API: set_width / use_width / set_channels, atomic, restoring, through wrappers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimmable
from slimmable.nn import get_channels, get_width, get_widths, set_channels, set_width, use_width


@pytest.fixture()
def model() -> nn.Module:
    return slimmable.create_model("slim_mobilenet_v2", num_classes=10, small_input=True).eval()


def _state(model: nn.Module) -> dict:
    return {n: m._get_state() for n, m in slimmable.nn.slim_modules(model)}


def test_set_width_changes_output_and_macs(model: nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    outs = {}
    for w in model.widths:
        set_width(model, w)
        assert get_width(model) == w
        outs[w] = model(x)
    assert not torch.allclose(outs[0.35], outs[1.0], rtol=1e-3, atol=0)
    set_width(model, 0.35)
    torch.testing.assert_close(model(x), outs[0.35])


def test_unknown_width_error_names_width_layer_and_fix(model: nn.Module) -> None:
    set_width(model, 0.5)
    before = _state(model)
    with pytest.raises(ValueError) as info:
        set_width(model, 0.6)
    msg = str(info.value)
    assert "0.6" in msg and "(0.35, 0.5, 0.75, 1)" in msg and "features.0.0" in msg and "widths=" in msg
    assert _state(model) == before  # atomic: nothing switched
    with pytest.raises(TypeError, match="number"):
        set_width(model, "0.5")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="no slimmable layers"):
        set_width(nn.Linear(2, 2), 0.5)


def test_use_width_restores_on_exit_and_on_exception(model: nn.Module) -> None:
    set_width(model, 0.75)
    with use_width(model, 0.35):
        assert get_width(model) == 0.35
    assert get_width(model) == 0.75
    with pytest.raises(RuntimeError, match="boom"), use_width(model, 1.0):
        assert get_width(model) == 1.0
        raise RuntimeError("boom")
    assert get_width(model) == 0.75
    with model.use_width(0.5):
        assert model.width == 0.5
    assert model.width == 0.75


def test_width_api_reaches_through_wrappers(model: nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    with use_width(model, 0.5):
        ref = model(x)
    dp = nn.DataParallel(model)  # on CPU it just calls the module
    set_width(dp, 0.5)
    torch.testing.assert_close(dp(x), ref)
    assert get_widths(dp).switches == model.widths and get_widths(dp).range is None
    set_width(model, 1.0)
    compiled = torch.compile(model, backend="eager")  # the wrapper keeps the model as _orig_mod
    set_width(compiled, 0.5)
    torch.testing.assert_close(compiled(x), ref)
    assert get_width(model) == 0.5


def test_width_api_reaches_through_ddp(model: nn.Module, tmp_path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        x = torch.randn(2, 3, 32, 32)
        with use_width(model, 0.35):
            ref = model(x)
        set_width(ddp, 0.35)
        torch.testing.assert_close(ddp(x), ref)
    finally:
        dist.destroy_process_group()


def test_set_channels_per_layer_spec(model: nn.Module) -> None:
    set_width(model, 1.0)
    spec = get_channels(model)
    assert spec["features.0.0"] == 32 and spec["features.2.body.0"] == 96
    assert "features.2.body.3" not in spec  # depthwise: follows its input
    # Narrow one expansion layer to the channel count of another switch: its BN picks that switch's statistics.
    set_channels(model, {"features.2.body.0": 48})
    assert get_channels(model)["features.2.body.0"] == 48
    assert get_width(model) is None
    y = model(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10)
    with pytest.raises(KeyError, match=r"features\.2\.body\.0"):
        set_channels(model, {"features.2.body.00": 8})
    with pytest.raises(ValueError, match=r"1\.\.96"):
        set_channels(model, {"features.2.body.0": 97})
    set_channels(model, {"features.2.body.0": 50})
    with pytest.raises(ValueError, match="no switch .* has 50 channels"):
        model(torch.randn(2, 3, 32, 32))


def test_widths_value_of_switches_and_of_a_range() -> None:
    from slimmable.nn import Widths

    s = Widths((1.0, 0.25, 0.5, 0.5))
    assert s.switches == (0.25, 0.5, 1.0) and not s.is_range and list(s) == [0.25, 0.5, 1.0] and len(s) == 3
    assert 0.5 in s and 0.75 not in s and (0.1 + 0.15) in s and "0.5" not in s
    assert s.describe() == "(0.25, 0.5, 1)"
    r = Widths((0.35, 1.0), (0.35, 1.0))
    assert r.is_range and 0.6 in r and 1.01 not in r and list(r) == [0.35, 1.0]
    assert r.describe() == "any width in [0.35, 1]"
    assert hash(r) == hash(Widths((1.0, 0.35), (0.35, 1.0)))  # frozen, comparable
    with pytest.raises(ValueError, match="0 < lo <= hi"):
        Widths((), (1.0, 0.5))
