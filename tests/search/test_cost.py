"""Profiling: MACs per width from flop_counter, latency measured, widths restored."""

from __future__ import annotations

import slimmable
from slimmable.search import profile_widths


def test_profile_widths_small_model_and_restore() -> None:
    model = slimmable.create_model("slim_mobilenet_v1", num_classes=10, small_input=True)
    model.set_width(0.5)
    profs = profile_widths(model, 32, latency_runs=2)
    assert [p.width for p in profs] == [0.25, 0.5, 0.75, 1.0]
    macs = [p.macs for p in profs]
    assert macs == sorted(macs) and macs[-1] > 10 * macs[0]
    assert all(p.latency_ms is not None and p.latency_ms > 0 for p in profs)
    assert model.width == 0.5
    assert profs[-1].to_dict()["params"] == profs[-1].params
