"""SlimmableRunner with its width policy: budgeted calls behind other calls choose narrower widths (load-aware) or
the same ones (static). A fake clock and a known latency table make every choice exact; a forward hook holds the
first call until the others have queued behind it."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from slimmable.runtime import LoadAwarePolicy, SlimmableRunner, StaticPolicy

TABLE = {1: {0.35: 1.0, 0.5: 2.0, 0.75: 3.0, 1.0: 4.0}}


class FakeClock:
    """Seconds that move only when a forward hook advances them (by the width's table latency)."""

    def __init__(self) -> None:
        self.t = 0.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.t += seconds


def _x(seed=0):
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _runner(model, clock, gate=None, **kw):
    """A runner whose forward at width w takes TABLE[1][w] ms on ``clock``; at width 1.0 it first waits for ``gate``
    (when given)."""
    r = SlimmableRunner(model, input_size=32, calibrate=False, clock=clock, **kw)
    r.load_latencies(TABLE)

    def hook(_m, _i, _o, w):
        if gate is not None and w == 1.0:
            assert gate.wait(30), "the test never opened the gate"
        clock.advance(TABLE[1][w] / 1e3)

    for w in r.widths:
        r.module(w).register_forward_hook(lambda m, i, o, w=w: hook(m, i, o, w))
    return r


def _wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def _call(results, key, runner, **kw):
    def target():
        results[key] = runner.run(_x(), **kw)

    t = threading.Thread(target=target)
    t.start()
    return t


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("load_aware", (0.75, 0.5, 0.35)), ("static", (1.0, 1.0, 1.0))],
)
def test_calls_behind_others_choose_narrower_widths(small_model, policy, expected):
    clock, gate = FakeClock(), threading.Event()
    r = _runner(small_model, clock, gate, max_concurrency=1, policy=policy)
    assert isinstance(r.policy, LoadAwarePolicy if policy == "load_aware" else StaticPolicy)
    gate.set()
    alone = r.run(_x(), budget_ms=7.0)
    assert alone.width == 1.0 and alone.predicted_queue_ms == 0.0 and alone.queue_ms == 0.0
    r.reset_drift()  # predictions exactly the table's, whatever float rounding the fake clock did
    gate.clear()
    results: dict = {}
    threads = [_call(results, "A", r, width=1.0)]  # pinned; holds the only slot until the gate opens
    _wait_for(lambda: r.policy.stats()["running"] == 1, "A to start")
    # B: 4 ms ahead, 3 left of 7; C: 4 + 3 ahead, 2 left of 9; D: 4 + 3 + 2 ahead of 4.5, nothing fits
    for n, (key, budget) in enumerate((("B", 7.0), ("C", 9.0), ("D", 4.5)), start=1):
        threads.append(_call(results, key, r, budget_ms=budget))
        _wait_for(lambda n=n: r.policy.stats()["waiting"] == n, f"{key} to queue")
    gate.set()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert (results["B"].width, results["C"].width, results["D"].width) == expected
    if policy == "load_aware":
        assert [results[k].predicted_queue_ms for k in "BCD"] == pytest.approx([4.0, 7.0, 9.0])
        assert [results[k].predicted_met for k in "BCD"] == [True, True, False]
        assert results["D"].budget_met is False  # ran anyway, at the narrowest width
    assert all(results[k].queue_ms >= 4.0 - 1e-9 for k in "BCD")  # each waited for A's 4 ms at least
    stats = r.policy.stats()
    assert (stats["running"], stats["waiting"]) == (0, 0)
    assert r.run(_x(), budget_ms=7.0).width == 1.0  # alone again: the widest
    assert r.info()["width_policy"]["policy"] == policy


def test_time_already_waited_counts_against_the_budget(small_model):
    r = _runner(small_model, FakeClock())
    res = r.run(_x(), budget_ms=5.0, waited_ms=1.5)
    assert res.width == 0.75 and res.waited_ms == 1.5 and res.predicted_met
    assert res.total_ms == pytest.approx(4.5) and res.budget_met
    res = r.run(_x(), budget_ms=5.0, waited_ms=10.0)  # too late for any width: the narrowest runs, not refused
    assert res.width == 0.35 and res.predicted_met is False and res.budget_met is False
    static = _runner(small_model, FakeClock(), policy="static")
    assert static.run(_x(), budget_ms=5.0, waited_ms=2.0).width == 1.0
    with pytest.raises(ValueError, match="waited_ms"):
        r.run(_x(), budget_ms=5.0, waited_ms=-1.0)
    with pytest.raises(ValueError, match="below the fastest width"):  # infeasible even on an idle runner
        r.run(_x(), budget_ms=0.5)
    with pytest.raises(ValueError, match="width policy 'fifo' is not known"):
        SlimmableRunner(small_model, input_size=32, calibrate=False, policy="fifo")


def test_a_failing_forward_leaves_the_queue_empty(small_model):
    r = _runner(small_model, FakeClock(), max_concurrency=2)

    def boom(*_):
        raise RuntimeError("out of memory (simulated)")

    handle = r.module(0.75).register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="simulated"):
        r.run(_x(), budget_ms=3.5)
    handle.remove()
    stats = r.policy.stats()
    assert (stats["running"], stats["waiting"], stats["predicted_queue_ms"]) == (0, 0, 0.0)
    assert r.run(_x(), budget_ms=3.5).width == 0.75


def test_many_threads_through_the_runner(small_model):
    """Smoke test on the real clock: concurrent budgeted and pinned calls all answer, and the books balance."""
    r = SlimmableRunner(small_model, input_size=32, calibrate=False, max_concurrency=2)
    r.load_latencies(TABLE)
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(i: int) -> None:
        try:
            start.wait()
            for j in range(5):
                res = r.run(_x(i), width=0.5) if (i + j) % 3 == 0 else r.run(_x(i), budget_ms=2.0 + i)
                assert res.width in r.widths and res.predicted_queue_ms is not None
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and not any(t.is_alive() for t in threads)
    stats = r.policy.stats()
    assert (stats["running"], stats["waiting"], stats["predicted_queue_ms"]) == (0, 0, 0.0)
