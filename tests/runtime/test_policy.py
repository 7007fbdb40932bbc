"""Width policies on a fake clock and a fake latency table: the load-aware choice, the queue bookkeeping, the online
correction and thread safety. No model runs and nothing is timed."""

from __future__ import annotations

import random
import threading

import pytest

from slimmable.runtime.policy import POLICIES, LoadAwarePolicy, StaticPolicy, make_policy

#: predicted forward time (ms) per width at batch 1; a batch of b takes b times as long
TABLE = {0.25: 1.0, 0.5: 2.0, 0.75: 3.0, 1.0: 4.0}


def estimate(width: float, batch_size: int) -> float:
    return TABLE[width] * batch_size


class FakeClock:
    """Seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _policy(cls=LoadAwarePolicy, **kw):
    clock = kw.pop("clock", None) or FakeClock()
    return cls(tuple(TABLE), estimate, clock=clock, **kw), clock


def test_empty_queue_chooses_as_the_static_policy():
    aware, _ = _policy()
    static, _ = _policy(StaticPolicy)
    for budget in [0.5 + 0.25 * i for i in range(40)]:
        for batch in (1, 2):
            a, s = aware.choose(budget, batch), static.choose(budget, batch)
            assert a.width == s.width, (budget, batch)
            assert a.queue_ms == s.queue_ms == 0.0 and a.predicted_met == s.predicted_met
            aware.finished(a)
            static.finished(s)
    assert aware.choose(3.5).width == 0.75 and aware.choose(100.0, now=1.0).width == 1.0


def test_narrower_widths_as_the_queue_ahead_grows():
    policy, _ = _policy()
    widths, queues, met = [], [], []
    for _ in range(6):
        probe = policy.choose(5.0)
        widths.append(probe.width)
        queues.append(probe.queue_ms)
        met.append(probe.predicted_met)
        policy.finished(probe, failed=True)  # the probe leaves the queue without teaching it anything
        policy.admit(0.25)  # one more 1 ms request waits ahead of the next probe
    assert queues == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert widths == [1.0, 1.0, 0.75, 0.5, 0.25, 0.25]  # completion = queue + own service must fit 5 ms
    assert met == [True, True, True, True, True, False]
    assert policy.queue_factor == 1.0  # nothing learnt from failed probes


def test_parallelism_divides_the_queue():
    policy, _ = _policy(parallelism=2)
    for _ in range(4):
        policy.admit(0.25)
    a = policy.choose(5.0)
    assert a.queue_ms == 2.0 and a.width == 0.75


def test_budgeted_requests_ahead_count_at_their_chosen_width():
    policy, _ = _policy()
    first = policy.choose(7.0)  # empty queue: 1.0 (4 ms)
    second = policy.choose(7.0)  # 4 ms ahead: 3 ms left, 0.75
    third = policy.choose(9.0)  # 4 + 3 ms ahead: 2 ms left, 0.5
    assert [first.width, second.width, third.width] == [1.0, 0.75, 0.5]
    assert [second.queue_ms, third.queue_ms] == [4.0, 7.0]
    assert third.predicted_total_ms == 9.0


def test_running_requests_count_their_remainder():
    policy, clock = _policy()
    a = policy.admit(1.0)  # 4 ms
    policy.started(a)
    clock.t = 0.003
    assert policy.predicted_queue_ms() == pytest.approx(1.0)
    clock.t = 0.006  # overran its prediction: nothing left to predict
    assert policy.predicted_queue_ms() == 0.0
    policy.finished(a, failed=True)


def test_nothing_fits_runs_the_narrowest_and_never_refuses():
    policy, _ = _policy()
    a = policy.choose(0.5)  # below even the narrowest width's prediction
    assert a.width == 0.25 and a.predicted_met is False
    b = policy.choose(5.0, waited_ms=100.0)  # the request already spent 100 ms decoding
    assert b.width == 0.25 and b.predicted_met is False and b.predicted_total_ms == pytest.approx(100.0 + 1.0 + 1.0)
    for _ in range(50):
        policy.admit(1.0)
    c = policy.choose(10.0)
    assert c.width == 0.25 and c.queue_ms == pytest.approx(2.0 + 200.0)


def test_time_already_waited_comes_off_the_budget():
    aware, _ = _policy()
    static, _ = _policy(StaticPolicy)
    assert aware.choose(5.0, waited_ms=2.0).width == 0.75
    assert static.choose(5.0, waited_ms=2.0).width == 1.0  # the old rule ignores it
    a = static.choose(5.0, waited_ms=2.0, now=0.0)
    assert a.predicted_met is False  # static still reports the full prediction: 2 + 4 (ahead) + 4 > 5


def test_bookkeeping_survives_out_of_order_finishes_and_failures():
    policy, clock = _policy()
    a, b, c, d = (policy.admit(w) for w in (1.0, 0.5, 0.75, 0.25))
    for x in (a, b, c):
        policy.started(x)
    assert policy.stats()["running"] == 3 and policy.stats()["waiting"] == 1
    assert policy.predicted_queue_ms() == 10.0
    assert policy.finished(c, failed=True)  # raised mid-forward
    assert policy.predicted_queue_ms() == 7.0
    assert policy.finished(d, failed=True)  # raised before it got a slot
    assert policy.predicted_queue_ms() == 6.0
    clock.t = 0.002
    assert policy.predicted_queue_ms() == pytest.approx(2.0)  # a has 2 ms left, b none
    clock.t = 0.006
    assert policy.finished(b)  # finished after a: 6 ms in the runner, 2 its own, 4 of queueing as predicted
    assert policy.queue_factor == pytest.approx(1.0)
    assert not policy.finished(b)  # a second finish is a no-op
    policy.started(b)  # and so is starting a finished request
    assert (b.started_at, b.finished_at) == (0.0, 0.006)
    assert policy.stats()["running"] == 1 and policy.predicted_queue_ms() == 0.0  # a overran its prediction
    assert policy.finished(a)
    stats = policy.stats()
    assert (stats["running"], stats["waiting"], stats["predicted_queue_ms"]) == (0, 0, 0.0)
    assert policy.choose(4.0).queue_ms == 0.0


def test_queue_factor_learns_observed_over_predicted_delay():
    policy, clock = _policy(alpha=0.5)
    a = policy.admit(1.0)
    policy.started(a)
    b = policy.choose(100.0)  # 4 ms predicted ahead of it
    assert (b.width, b.raw_queue_ms) == (1.0, 4.0)
    clock.t = 0.012  # the request ahead took 12 ms, not 4
    policy.finished(a)
    policy.started(b)
    clock.t = 0.016
    policy.finished(b)  # 16 ms in the runner, 4 of them its own service: 12 ms of queueing against 4 predicted
    assert policy.queue_factor == pytest.approx(3.0)
    ahead = policy.admit(0.25)
    probe = policy.choose(100.0)
    assert (probe.raw_queue_ms, probe.queue_ms) == (1.0, pytest.approx(3.0))
    policy.finished(probe, failed=True)
    policy.finished(ahead, failed=True)
    # one faithful observation: the moving averages move halfway (alpha 0.5)
    t0 = clock.t
    a = policy.admit(1.0, now=t0)
    policy.started(a, t0)
    b = policy.choose(100.0, now=t0)
    assert b.raw_queue_ms == 4.0
    policy.finished(a, t0 + 0.004)
    policy.started(b, t0 + 0.004)
    policy.finished(b, t0 + 0.008)
    # observed 4 ms of queueing (8 in the runner, 4 its own), as predicted: the averages become 8 and 4
    assert policy.queue_factor == pytest.approx((12 + 0.5 * (4 - 12)) / 4.0)
    assert policy.stats()["queue_observations"] == 2
    policy.reset_correction()
    assert policy.queue_factor == 1.0


def test_failed_requests_and_empty_queues_teach_nothing():
    policy, clock = _policy()
    a = policy.admit(1.0)
    policy.started(a)
    b = policy.choose(100.0)
    clock.t = 1.0  # a very long wait...
    policy.finished(a)
    policy.finished(b, failed=True)  # ...but the request raised
    assert policy.queue_factor == 1.0
    c = policy.choose(100.0)  # nothing ahead: its time says nothing about queueing
    clock.t = 2.0
    policy.finished(c)
    assert policy.queue_factor == 1.0


def test_one_outlier_moves_the_factor_a_bounded_amount():
    policy, clock = _policy(alpha=0.2)
    a = policy.admit(0.25)
    b = policy.choose(100.0)
    policy.finished(a, failed=True)
    clock.t = 10.0  # a 10 s stall
    policy.finished(b)
    assert policy.queue_factor == pytest.approx(10.0)  # one sample counts as at most 10x its prediction


def test_concurrent_choices_each_see_the_others():
    policy, _ = _policy()
    start = threading.Barrier(12)
    got: list = []
    lock = threading.Lock()

    def worker() -> None:
        start.wait()
        a = policy.choose(1000.0)
        with lock:
            got.append(a)

    threads = [threading.Thread(target=worker) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(got) == 12
    # admission is atomic: each request's queue is exactly the work of those admitted before it
    got.sort(key=lambda a: a.raw_queue_ms)
    ahead = 0.0
    for a in got:
        assert a.raw_queue_ms == pytest.approx(ahead)
        ahead += a.service_ms


def test_many_threads_keep_the_books_consistent():
    policy = LoadAwarePolicy(tuple(TABLE), estimate, parallelism=2)  # the real clock
    errors: list[BaseException] = []
    start = threading.Barrier(16)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            start.wait()
            for _ in range(300):
                if rng.random() < 0.7:
                    a = policy.choose(rng.uniform(0.5, 20.0), rng.choice((1, 2)), waited_ms=rng.uniform(0, 2))
                else:
                    a = policy.admit(rng.choice(tuple(TABLE)))
                assert a.width in TABLE
                if rng.random() < 0.9:
                    policy.started(a)
                policy.predicted_queue_ms()
                policy.finished(a, failed=rng.random() < 0.2)
                policy.finished(a)  # a second finish is harmless
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    stats = policy.stats()
    assert (stats["running"], stats["waiting"], stats["predicted_queue_ms"]) == (0, 0, 0.0)
    assert 0.05 <= policy.queue_factor <= 20.0


def test_arguments_are_checked():
    policy, _ = _policy()
    for bad in (0, -1.0, float("nan"), float("inf"), "5", True, None):
        with pytest.raises(ValueError, match="budget_ms"):
            policy.choose(bad)
    for bad in (-1.0, float("nan"), "1"):
        with pytest.raises(ValueError, match="waited_ms"):
            policy.choose(5.0, waited_ms=bad)
    with pytest.raises(ValueError, match=r"width 0.3 is not one of the policy's widths"):
        policy.admit(0.3)
    with pytest.raises(ValueError, match="parallelism"):
        LoadAwarePolicy(tuple(TABLE), estimate, parallelism=0)
    with pytest.raises(ValueError, match="alpha"):
        LoadAwarePolicy(tuple(TABLE), estimate, alpha=0)
    with pytest.raises(ValueError, match="at least one width"):
        LoadAwarePolicy((), estimate)
    with pytest.raises(ValueError, match="'load_aware', 'static'"):
        make_policy("fastest", tuple(TABLE), estimate)
    assert set(POLICIES) == {"load_aware", "static"}
    assert isinstance(make_policy("static", tuple(TABLE), estimate), StaticPolicy)
    assert policy.stats()["policy"] == "load_aware"


def _steady(policy, clock, rate, seconds, budget=100.0):
    """Requests arriving every 1/rate s on the fake clock, each served at once (no queue): the widths chosen."""
    widths = []
    for _ in range(int(rate * seconds)):
        clock.t += 1.0 / rate
        a = policy.choose(budget)
        policy.finished(a, failed=True)
        widths.append(a.width)
    return widths


@pytest.mark.parametrize(
    ("rate", "width"),
    [(100, 1.0), (250, 0.75), (350, 0.5), (700, 0.25), (1000, 0.25)],  # utilisation of 1.0 at 250/s: 250 x 4 ms = 1.0
)
def test_the_width_the_arrival_rate_sustains(rate, width):
    # nothing is ever queued, so the queue rule alone would run 1.0 at every rate; the rate rule keeps
    # rate x service <= 0.8 of the one slot
    policy, clock = _policy()
    widths = _steady(policy, clock, rate, 2.0)
    assert set(widths[rate:]) == {width}  # after the first window
    assert policy.stats()["arrival_rate_per_s"] == pytest.approx(rate, rel=0.01)


def test_the_rate_limit_follows_the_load_down_and_back_up():
    policy, clock = _policy(utilization=0.6)
    assert _steady(policy, clock, 100, 1.0)[-1] == 1.0  # 100 x 4 ms = 0.4
    assert _steady(policy, clock, 300, 1.0)[-1] == 0.5  # 0.75: 0.9, 0.5: 0.6
    assert _steady(policy, clock, 100, 1.5)[-1] == 1.0  # the burst left the window
    clock.t += 10.0
    assert policy.choose(100.0).width == 1.0 and policy.stats()["arrival_rate_per_s"] == 1.0


def test_no_rate_limit_and_bad_utilizations():
    policy, clock = _policy(utilization=None)
    assert set(_steady(policy, clock, 1000, 1.0)) == {1.0}  # the queue alone decides, and it is always empty
    for bad in (0.0, -0.5, 1.5, True, "0.8", float("nan")):
        with pytest.raises(ValueError, match="utilization"):
            _policy(utilization=bad)
    # the static policy has no rate rule
    static, clock = _policy(StaticPolicy)
    assert set(_steady(static, clock, 1000, 1.0)) == {1.0}


def test_the_tail_factor_leaves_room_for_passes_that_run_long():
    # predictions are right on average, but one request in ten takes three times as long: a budget that fits the
    # mean of the widest width no longer chooses it once the ratios are known, and the misses stop
    policy, clock = _policy(utilization=None)
    widths = []
    for i in range(300):
        a = policy.choose(4.5)
        widths.append(a.width)
        clock.t += (3.0 if i % 10 == 0 else 1.0) * a.service_ms / 1e3
        policy.finished(a)
    assert widths[:20] == [1.0] * 20  # the factor counts from 20 ratios on
    assert policy.tail_factor == pytest.approx(3.0) and policy.stats()["tail_factor"] == 3.0
    assert set(widths[30:]) == {0.25}  # 3 x 1 ms fits 4.5 ms; 3 x 2 ms does not
    # means only
    plain, clock = _policy(utilization=None, tail_quantile=None)
    for i in range(300):
        a = plain.choose(4.5)
        clock.t += (3.0 if i % 10 == 0 else 1.0) * a.service_ms / 1e3
        plain.finished(a)
    assert plain.tail_factor == 1.0 and plain.choose(4.5).width == 1.0
    # a quantile below the share of slow passes ignores them
    lenient, clock = _policy(utilization=None, tail_quantile=0.85)
    for i in range(300):
        a = lenient.choose(4.5)
        clock.t += (3.0 if i % 10 == 0 else 1.0) * a.service_ms / 1e3
        lenient.finished(a)
    assert lenient.tail_factor == pytest.approx(1.0) and lenient.choose(4.5).width == 1.0
    policy.reset_correction()
    assert policy.tail_factor == 1.0
    with pytest.raises(ValueError, match="tail_quantile"):
        _policy(tail_quantile=1.5)
