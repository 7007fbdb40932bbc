"""BN calibration changes BN statistics only, fills new US widths, and a calibrated width reloads identically."""

from __future__ import annotations

import pytest
import torch

import slimmable
from slimmable.train.calibrate import calibrate_bn


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
    assert model.widths == (0.35, 0.6, 0.8, 1.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)  # at 0.6, now with its own statistics
    torch.save(model.state_dict(), tmp_path / "m.pt")
    again = slimmable.create_model(model.model_name, **model.model_kwargs).eval()
    again.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    with torch.no_grad(), again.use_width(0.6):
        torch.testing.assert_close(again(x), y, rtol=0, atol=0)
