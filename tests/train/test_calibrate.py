"""BN calibration changes BN statistics only, fills new US widths, and a calibrated width reloads identically."""

from __future__ import annotations

import pytest
import torch

import slimmable
from slimmable.checkpoint import model_build_kwargs
from slimmable.export import export_channels
from slimmable.train.calibrate import calibrate_bn, calibrate_channels


def _batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 32, 32, generator=g) * 2 + 1 for _ in range(n)]


def test_calibration_changes_only_bn_statistics_of_each_switch() -> None:
    model = slimmable.create_model("slim_mobilenet_v1", num_classes=10, small_input=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    used = calibrate_bn(model, _batches(3), widths=[0.5], num_batches=3)
    assert used == {0.5: 48}
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "statistics of the 0.5 switch must change"
    for k in changed:  # only running statistics of switch 1 (width 0.5)
        assert ".bn.1." in k and ("running_" in k or "num_batches_tracked" in k), k
    # the cumulative average equals the mean over all calibration images of the first BN's input
    stem = model.features[0][0]
    with model.use_width(0.5), torch.no_grad():
        acts = torch.cat([stem(x) for x in _batches(3)])
    torch.testing.assert_close(model.features[0][1].bn[1].running_mean, acts.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert model.training  # mode restored


def test_us_calibration_adds_widths_and_reloads_identically(tmp_path) -> None:
    model = slimmable.create_model("us_mobilenet_v2", num_classes=10, small_input=True, stat_widths=(0.35, 1.0))
    model.eval()
    model.set_width(0.6)
    with pytest.raises(RuntimeError, match="no statistics for width 0.6"):
        model(torch.randn(2, 3, 32, 32))
    calibrate_bn(model, _batches(2), widths=[0.6, 0.8], num_batches=2)
    assert model.widths == (0.35, 0.6, 0.8, 1.0) == slimmable.get_widths(model).switches
    assert model.model_kwargs["stat_widths"] == (0.35, 1.0)  # calibration does not edit the build record
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)  # at 0.6, now with its own statistics
    torch.save(model.state_dict(), tmp_path / "m.pt")
    again = slimmable.create_model(model.model_name, **model_build_kwargs(model)).eval()
    again.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    with torch.no_grad(), again.use_width(0.6):
        torch.testing.assert_close(again(x), y, rtol=0, atol=0)


def test_shared_bn_baseline_statistics_are_wrong_for_narrow_width_until_recalibrated() -> None:
    """The paper's failure mode in miniature: one set of BN statistics does not fit the narrow width."""
    torch.manual_seed(0)
    model = slimmable.create_model("slim_mobilenet_v1", num_classes=10, small_input=True, norm="shared")
    data = _batches(4, seed=3)
    bn = model.features[5].body[4]  # a BN deep enough that its input depends on the active width
    model.train()
    with torch.no_grad():  # naive Algorithm 1 accumulates one set of statistics over every width
        for x in data:
            for w in model.widths:
                model.set_width(w)
                model(x)
    model.set_width(0.25)
    model.eval()

    def mismatch() -> float:
        """Relative gap between the BN's running mean and the mean of what it is fed at width 0.25."""
        seen = []
        handle = bn.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].mean((0, 2, 3))))
        with torch.no_grad():
            for x in data:
                model(x)
        handle.remove()
        fed = torch.stack(seen).mean(0)
        return float((bn.running_mean[: fed.numel()] - fed).abs().mean() / fed.abs().mean())

    before = mismatch()
    with pytest.raises(ValueError, match="one width at a time"):
        calibrate_bn(model, data, widths=[0.25, 1.0])
    calibrate_bn(model, data, widths=[0.25], num_batches=4)
    after = mismatch()
    assert before > 0.2  # shared statistics are off by more than 20%
    assert after < 0.05 and after < before / 10


@pytest.mark.parametrize("name", ["slim_mobilenet_v1", "us_mobilenet_v1"])
def test_calibrate_channels_at_a_uniform_spec_equals_calibrating_that_width(name: str) -> None:
    """The spec of width 0.5, calibrated as a channel spec, is the same network as width 0.5 calibrated."""
    torch.manual_seed(0)
    kwargs = {"stat_widths": (0.25, 1.0)} if name.startswith("us_") else {}
    model = slimmable.create_model(name, num_classes=10, small_input=True, **kwargs).eval()
    with model.use_width(0.5):
        spec = slimmable.get_channels(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fixed = calibrate_channels(model, spec, _batches(3), num_batches=3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the source is untouched
    assert fixed.model_name == name.replace("us_", "slim_") and fixed.widths == (1.0,) and not fixed.training
    assert slimmable.get_channels(fixed) == spec and fixed.calibration == {"images": 48, "num_batches": 3}
    calibrate_bn(model, _batches(3), widths=[0.5], num_batches=3)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), model.use_width(0.5):
        torch.testing.assert_close(fixed(x), model(x), rtol=1e-5, atol=1e-5)


def test_calibrate_channels_takes_a_per_layer_mix_of_a_us_model_and_reloads(tmp_path) -> None:
    torch.manual_seed(0)
    model = slimmable.create_model("us_mobilenet_v1", num_classes=10, small_input=True, stat_widths=(0.25, 1.0))
    with model.use_width(1.0):
        full = slimmable.get_channels(model)
    names = list(full)
    spec = {names[0]: 8, names[3]: 40, names[-2]: 256}  # a mix no width has statistics for
    with pytest.raises(ValueError, match="no statistics for a per-layer channel spec.*calibrate_channels"):
        export_channels(model, spec)  # without re-estimation there is nothing to normalise with
    fixed = calibrate_channels(model, spec, _batches(2), num_batches=2)
    got = slimmable.get_channels(fixed)
    assert {k: got[k] for k in spec} == spec and all(got[k] == full[k] for k in full if k not in spec)
    # the weights are the source's leading channels; the first BN's mean is the mean of what it is fed
    stem = fixed.features[0][0]
    torch.testing.assert_close(stem.weight, model.features[0][0].weight[:8])
    with torch.no_grad():
        acts = torch.cat([stem(x) for x in _batches(2)])
    torch.testing.assert_close(fixed.features[0][1].bn[0].running_mean, acts.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.save(fixed.state_dict(), tmp_path / "f.pt")
    again = slimmable.create_model(fixed.model_name, **fixed.model_kwargs).eval()
    again.load_state_dict(torch.load(tmp_path / "f.pt", weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), fixed(x), rtol=0, atol=0)
    with pytest.raises(KeyError, match="not a layer"):
        calibrate_channels(model, {"features.99": 8}, _batches(1))
    with pytest.raises(ValueError, match="no batches"):
        calibrate_channels(model, spec, [])
    resnet = slimmable.create_model("slim_resnet18", num_classes=10, small_input=True)
    with pytest.raises(ValueError, match="slim_resnet18 cannot be built with per-layer channels"):
        calibrate_channels(resnet, {}, _batches(1))
