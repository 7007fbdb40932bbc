"""SlimmableRunner: outputs per width, thread safety, budget choice, drift, calibration cache, errors."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from slimmable.export import export_width
from slimmable.nn import use_width
from slimmable.runtime import SlimmableRunner

TABLE = {1: {0.35: 1.0, 0.5: 2.0, 0.75: 3.0, 1.0: 4.0}}


class FakeClock:
    """A clock that only moves when told to (the runner reads it before and after each forward pass)."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _x(batch=2, seed=0):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def runner(small_model):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    r = SlimmableRunner(small_model, input_size=32, calibration_s=0.5)
    torch.set_num_threads(n)
    return r


def _table_runner(model, **kw):
    r = SlimmableRunner(model, input_size=32, calibrate=False, **kw)
    r.load_latencies(TABLE)
    return r


def test_outputs_equal_the_slim_model_at_each_width(runner, small_model):
    x = _x()
    assert runner.widths == (0.35, 0.5, 0.75, 1.0)
    for w in runner.widths:
        with torch.no_grad(), use_width(small_model, w):
            ref = small_model(x)
        res = runner.run(x, width=w)
        assert res.width == w and res.latency_ms > 0 and res.budget_ms is None and res.budget_met is None
        torch.testing.assert_close(res.output, ref, atol=1e-5, rtol=0)
    # neither width nor budget: the widest width
    assert runner.run(x).width == 1.0


def test_threads_at_different_widths_get_single_thread_results(runner):
    inputs = {w: _x(2, seed=i) for i, w in enumerate(runner.widths)}
    expected = {w: runner(inputs[w], width=w).clone() for w in runner.widths}
    errors: list[str] = []
    start = threading.Barrier(8)

    def worker(w: float) -> None:
        start.wait()
        for _ in range(10):
            out = runner(inputs[w], width=w)
            if not torch.equal(out, expected[w]):
                errors.append(f"width {w}: max diff {(out - expected[w]).abs().max():.3g}")

    threads = [threading.Thread(target=worker, args=(w,)) for w in runner.widths for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


def test_budget_picks_the_widest_width_that_fits(small_model):
    r = _table_runner(small_model)
    assert r.select_width(4.0) == (1.0, 4.0)
    assert r.select_width(3.5)[0] == 0.75
    assert r.select_width(2.0)[0] == 0.5
    assert r.select_width(1.0)[0] == 0.35
    assert r.select_width(1000.0)[0] == 1.0
    # batch 2 is estimated from batch 1 in proportion: twice the latency
    assert r.base_latency(0.5, 2) == pytest.approx(4.0)
    assert r.select_width(4.5, batch_size=2)[0] == 0.5


def test_budget_below_the_fastest_width_is_a_clear_error(small_model):
    r = _table_runner(small_model)
    with pytest.raises(ValueError, match=r"below the fastest width: width 0.35 takes 1 ms"):
        r.select_width(0.5)
    with pytest.raises(ValueError, match="below the fastest"):
        r.run(_x(1), budget_ms=0.5)
    for bad in (0, -1.0, float("nan"), float("inf"), "5", True):
        with pytest.raises(ValueError, match="budget_ms"):
            r.select_width(bad)


def test_batch_sizes_interpolate(small_model):
    r = SlimmableRunner(small_model, input_size=32, calibrate=False)
    r.load_latencies({1: {w: 1.0 for w in r.widths}, 8: {w: 8.0 for w in r.widths}})
    assert r.base_latency(0.5, 4) == pytest.approx(4.0)
    assert r.base_latency(0.5, 16) == pytest.approx(16.0)


def test_drift_lowers_and_restores_the_width(small_model):
    clock = FakeClock()
    r = _table_runner(small_model, clock=clock)
    # the drift alone: the tail factor would remember the slow passes of the transition for its 200-request window
    # (tested in tests/runtime/test_policy.py)
    r.policy.tail_quantile = None
    slowdown = {"factor": 1.0}
    for w in r.widths:  # each forward pass "takes" factor x its calibrated latency on the fake clock
        r.module(w).register_forward_hook(
            lambda _m, _i, _o, w=w: setattr(clock, "t", clock.t + slowdown["factor"] * TABLE[1][w] / 1e3)
        )
    x = _x(1)
    assert r.run(x, budget_ms=4.5).width == 1.0
    assert r.drift == pytest.approx(1.0)
    slowdown["factor"] = 3.0  # another process takes the CPU: everything is 3x slower
    chosen = [r.run(x, budget_ms=4.5).width for _ in range(30)]
    assert chosen[0] == 1.0 and chosen[-1] == 0.35  # 3 x 1 ms fits 4.5 ms, 3 x 2 ms does not
    assert r.drift == pytest.approx(3.0, rel=0.05)
    results = [r.run(x, budget_ms=4.5) for _ in range(3)]
    assert all(res.budget_met for res in results)  # the narrow width meets the budget under load
    slowdown["factor"] = 1.0  # the load goes away
    chosen = [r.run(x, budget_ms=4.5).width for _ in range(30)]
    assert chosen[-1] == 1.0
    assert r.drift == pytest.approx(1.0, rel=0.05)


def test_drift_with_a_real_slow_module(small_model):
    """End to end on the real clock: a model made slower by sleeping makes the runner choose a narrower width."""
    r = SlimmableRunner(small_model, input_size=32, calibration_s=0.3)
    widest = r.widths[-1]
    budget = r.base_latency(widest, 1) * 1.5 + 1.0
    x = _x(1)
    assert r.run(x, budget_ms=budget).width == widest
    sleep_s = 4 * budget / 1e3
    r.module(widest).register_forward_hook(lambda *_: time.sleep(sleep_s))
    chosen = [r.run(x, budget_ms=budget).width for _ in range(10)]
    # the first slow run raises the drift factor, so the next run is narrower; the runner re-probes the widest
    # width only once the factor has decayed, so most runs stay narrow
    assert chosen[0] == widest and chosen[1] < widest
    assert chosen.count(widest) <= 4


def test_drift_ignores_a_single_outlier(small_model):
    r = _table_runner(small_model)
    r.observe(1.0, 1, 10_000.0)  # one 10 s hiccup (GC pause, page fault storm)
    assert r.drift <= 1.0 + 0.2 * (10.0 - 1.0) + 1e-9  # clipped ratio
    r.reset_drift()
    assert r.drift == 1.0


def test_input_and_width_errors(runner):
    with pytest.raises(ValueError, match=r"widths are \(0.35, 0.5, 0.75, 1\)"):
        runner(_x(), width=0.3)
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        runner(torch.randn(1, 3, 64, 64), width=0.5)
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        runner(torch.randn(3, 32, 32), width=0.5)
    with pytest.raises(TypeError, match="floating-point"):
        runner(torch.zeros(1, 3, 32, 32, dtype=torch.int64), width=0.5)
    with pytest.raises(TypeError, match="torch.Tensor"):
        runner([[0.0]], width=0.5)
    with pytest.raises(ValueError, match="not both"):
        runner(_x(), width=0.5, budget_ms=10.0)
    with pytest.raises(ValueError, match="drift_alpha"):
        SlimmableRunner(runner.module(0.5), calibrate=False, drift_alpha=0)


def test_uncalibrated_runner(small_model):
    r = SlimmableRunner(small_model, input_size=32, calibrate=False)
    assert not r.calibrated
    assert r.run(_x(1), width=0.5).predicted_ms is None  # widths work without latencies
    with pytest.raises(RuntimeError, match="calibrate"):
        r.select_width(10.0)
    with pytest.raises(ValueError, match="lacks widths"):
        r.load_latencies({1: {0.35: 1.0}})


def test_calibration_is_bounded_and_cached(small_model, tmp_path):
    cache = tmp_path / "latency.json"
    t0 = time.perf_counter()
    r1 = SlimmableRunner(small_model, input_size=32, batch_sizes=(1, 4), calibration_s=1.0, cache_path=cache)
    assert time.perf_counter() - t0 < 10.0
    assert not r1.calibrated_from_cache and r1.calibration_seconds < 10.0
    for b in (1, 4):
        assert all(r1.base_latency(w, b) > 0 for w in r1.widths)
    data = json.loads(cache.read_text())
    keys = list(data["entries"])
    assert len(keys) == 2 and all("slim_mobilenet_v2|" in k and "threads=1" in k for k in keys)
    assert any("batch=4" in k for k in keys)
    r2 = SlimmableRunner(small_model, input_size=32, batch_sizes=(1, 4), cache_path=cache)
    assert r2.calibrated_from_cache and r2.calibration_seconds < 0.5
    for b in (1, 4):
        for w in r1.widths:
            assert r2.base_latency(w, b) == pytest.approx(r1.base_latency(w, b), rel=1e-3)
    # another batch size is measured and added; the old entries stay
    r3 = SlimmableRunner(small_model, input_size=32, batch_sizes=(1, 2), calibration_s=0.3, cache_path=cache)
    assert not r3.calibrated_from_cache
    assert len(json.loads(cache.read_text())["entries"]) == 3
    # a corrupt cache is ignored (and rewritten)
    cache.write_text("{not json")
    r4 = SlimmableRunner(small_model, input_size=32, calibration_s=0.3, cache_path=cache)
    assert r4.calibrated and not r4.calibrated_from_cache
    assert json.loads(cache.read_text())["format_version"] == 1


def test_memory_report(runner, small_model):
    mem = runner.memory_bytes()
    per = mem["per_width"]
    # tensors equal in several copies (the unslimmed classifier, ...) are stored once
    assert max(per.values()) < mem["dense_total"] < sum(per.values())
    heads = [runner.module(w).classifier[0].weight for w in runner.widths]
    assert all(h is heads[0] for h in heads)
    assert [per[w] for w in runner.widths] == sorted(per.values())
    full = sum(t.numel() * t.element_size() for t in [*small_model.parameters(), *small_model.buffers()])
    assert mem["source_weight_set"] == full
    assert mem["ratio"] == pytest.approx(mem["dense_total"] / full)
    info = runner.info()
    assert info["memory_bytes"]["dense_total"] == mem["dense_total"] and info["widths"] == list(runner.widths)


def test_width_switch_costs_under_a_millisecond(small_model):
    r = _table_runner(small_model)
    n = 2000
    t0 = time.perf_counter()
    for i in range(n):
        w, _ = r.select_width(1.0 + 3.0 * (i % 4) / 3)
        r.module(w)
    per_switch_ms = 1e3 * (time.perf_counter() - t0) / n
    assert per_switch_ms < 1.0


def test_dense_copies_match_export_and_are_frozen(runner, small_model):
    x = _x()
    for w in runner.widths:
        m = runner.module(w)
        assert not m.training and not any(p.requires_grad for p in m.parameters())
        ref = export_width(small_model, w, fold_bn=True)
        with torch.no_grad():
            torch.testing.assert_close(m(x), ref(x), atol=0, rtol=0)
