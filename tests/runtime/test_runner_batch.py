"""SlimmableRunner.admit / run_admitted: requests admitted apart and run together, one forward pass per width."""

from __future__ import annotations

import pytest
import torch

from slimmable.runtime import SlimmableRunner
from slimmable.tasks import task_of

TABLE = {1: {0.35: 1.0, 0.5: 2.0, 0.75: 3.0, 1.0: 4.0}, 8: {0.35: 4.0, 0.5: 8.0, 0.75: 12.0, 1.0: 16.0}}


def _x(batch, seed):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def runner(small_model):
    r = SlimmableRunner(small_model, input_size=32, calibrate=False)
    r.load_latencies(TABLE)
    return r


def test_admitted_requests_share_a_pass_per_width_and_answer_as_alone(runner):
    xs = [_x(1, 0), _x(2, 1), _x(1, 2), _x(3, 3)]
    widths = [0.5, 1.0, 0.5, 1.0]
    admitted = [runner.admit(x, width=w, waited_ms=0.5) for x, w in zip(xs, widths)]
    assert [a.width for a in admitted] == widths
    assert runner.policy.stats()["waiting"] == 4  # admitted requests count in the queue until they run
    results = runner.run_admitted(admitted)
    assert runner.policy.stats()["waiting"] == runner.policy.stats()["running"] == 0
    assert [r.width for r in results] == widths
    assert [r.forward_batch_size for r in results] == [2, 5, 2, 5]  # 1+1 items at 0.5, 2+3 at 1.0
    for x, w, r in zip(xs, widths, results):
        alone = runner.run(x, width=w)
        assert alone.forward_batch_size == x.shape[0]
        assert r.output.shape == alone.output.shape
        torch.testing.assert_close(r.output, alone.output, atol=1e-5, rtol=1e-5)
        assert r.waited_ms == 0.5 and r.latency_ms > 0 and r.predicted_ms is not None
    same_pass = [r.latency_ms for r in results if r.width == 1.0]
    assert same_pass[0] == same_pass[1]


def test_budgeted_admission_sees_the_requests_admitted_before_it(runner):
    # alone, a 5 ms budget fits width 1.0 (4 ms); behind an admitted 1.0 request (4 ms of work) only 0.35 (1 ms) fits
    runner.reset_drift()  # the table's latencies, not what the passes before measured
    runner.policy.reset_correction()
    ahead = runner.admit(_x(1, 0), width=1.0)
    budgeted = runner.admit(_x(1, 1), budget_ms=5.0)
    assert budgeted.width == 0.35 and budgeted.admission.queue_ms == pytest.approx(4.0)
    results = runner.run_admitted([budgeted, ahead])
    assert [r.width for r in results] == [0.35, 1.0] and results[0].budget_ms == 5.0
    assert runner.policy.stats()["waiting"] == 0


def test_discard_and_a_failing_pass_leave_no_request_in_the_queue(runner, monkeypatch):
    runner.discard(runner.admit(_x(1, 0), width=0.5))
    assert runner.policy.stats()["waiting"] == 0
    admitted = [runner.admit(_x(1, 0), width=0.35), runner.admit(_x(1, 1), width=1.0)]

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(runner.module(1.0), "forward", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        runner.run_admitted(admitted)
    assert runner.policy.stats()["waiting"] == runner.policy.stats()["running"] == 0


def test_admit_checks_as_run_does(runner):
    with pytest.raises(ValueError, match="not both"):
        runner.admit(_x(1, 0), width=0.5, budget_ms=5.0)
    with pytest.raises(ValueError, match="below the fastest width"):
        runner.admit(_x(1, 0), budget_ms=0.5)
    with pytest.raises(ValueError, match="does not fit"):
        runner.admit(torch.zeros(1, 3, 16, 16), width=0.5)
    assert runner.policy.stats()["waiting"] == 0


def test_the_task_joins_inputs_and_splits_outputs_of_every_shape(small_model):
    task = task_of(small_model)
    a, b = _x(1, 0), _x(2, 1)
    assert task.join_inputs([a, b]).shape == (3, 3, 32, 32)
    images = [torch.zeros(3, 8, 8), torch.zeros(3, 9, 9), torch.zeros(3, 7, 7)]
    assert task.join_inputs([images[:1], images[1:]]) == images  # a detector's lists of images are chained
    logits = torch.arange(6.0).reshape(3, 2)
    first, second = task.split_outputs({"out": logits, "aux": logits + 1}, [1, 2])  # a segmenter's dict
    torch.testing.assert_close(first["out"], logits[:1])
    torch.testing.assert_close(second["aux"], logits[1:] + 1)
    detections = [{"boxes": torch.zeros(i, 4)} for i in range(3)]  # one dict per image
    assert task.split_outputs(detections, [2, 1]) == [detections[:2], detections[2:]]
    with pytest.raises(TypeError, match="override split_outputs"):
        task.split_outputs(3.0, [1, 2])
