"""torchrun: 2 Gloo processes on CPU reach the weights of 1 process with the same global batch; one all-reduce/step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from fake_data import tiny_detection_recipe, tiny_recipe, write_fashion_mnist, write_recipe

from slimmable.train import load_checkpoint

PYTHON = sys.executable
TORCHRUN = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

pytestmark = pytest.mark.slow


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "SLIMMABLE_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "CI": "true"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _run(cmd: list[str], tmp_path: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_two_processes_match_one_process(tmp_path: Path) -> None:
    fm = write_fashion_mnist(tmp_path / "fm", n_train=80, n_test=24)
    # sync_bn: BatchNorm statistics over the global batch, as in one process; no augmentation randomness
    recipe = tiny_recipe(
        fm,
        data={"augment": "none", "val_size": 16, "batch_size": 16},
        train={"epochs": 2, "sync_bn": True},
        optim={"lr": 0.01, "schedule": "constant"},
    )
    write_recipe(tmp_path / "r.yaml", recipe)
    args = ["train", "--recipe", "r.yaml", "--device", "cpu", "--no-tensorboard", "--latency-runs", "0"]
    _run([PYTHON, "-m", "slimmable.cli.main", *args, "--out", "one"], tmp_path)
    two = _run([*TORCHRUN, "-m", "slimmable.cli.main", *args, "--out", "two"], tmp_path)
    assert "x2 processes" in two.stderr
    one_ck, two_ck = load_checkpoint(tmp_path / "one" / "last.pt"), load_checkpoint(tmp_path / "two" / "last.pt")
    assert one_ck["step"] == two_ck["step"] == 8
    for k, v in one_ck["model"].items():
        if v.is_floating_point():
            # float32 rounding differs (other reduction order); with a small learning rate it stays tiny
            torch.testing.assert_close(two_ck["model"][k], v, rtol=1e-4, atol=1e-4, msg=k)
        else:
            assert torch.equal(two_ck["model"][k], v), k
    one_rep = json.loads((tmp_path / "one" / "final_metrics.json").read_text())["widths"]
    two_rep = json.loads((tmp_path / "two" / "final_metrics.json").read_text())["widths"]
    assert [r["images"] for r in two_rep] == [24, 24]  # every test image counted once over the 2 shards
    for a, b in zip(one_rep, two_rep):
        assert a["top1"] == pytest.approx(b["top1"], abs=100 / 24 + 1e-6)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)


def test_two_processes_with_a_teacher_match_one_process(tmp_path: Path) -> None:
    """Each process builds its own frozen teacher from the recipe (no DDP around it): 2 processes still compute what
    1 process computes, and the teacher changes the result."""
    fm = write_fashion_mnist(tmp_path / "fm", n_train=80, n_test=24)
    base = {"data": {"augment": "none", "val_size": 16, "batch_size": 16},
            "optim": {"lr": 0.01, "schedule": "constant"}}  # fmt: skip
    write_recipe(tmp_path / "t.yaml", tiny_recipe(fm, train={"epochs": 1}, **base))
    args = ["--device", "cpu", "--no-tensorboard", "--latency-runs", "0"]
    _run([PYTHON, "-m", "slimmable.cli.main", "train", "--recipe", "t.yaml", *args, "--out", "teacher"], tmp_path)
    train = {"epochs": 1, "sync_bn": True, "teacher": str(tmp_path / "teacher" / "last.pt"), "teacher_weight": 0.8}
    write_recipe(tmp_path / "r.yaml", tiny_recipe(fm, train=train, **base))
    args = ["train", "--recipe", "r.yaml", *args]
    _run([PYTHON, "-m", "slimmable.cli.main", *args, "--out", "one"], tmp_path)
    two = _run([*TORCHRUN, "-m", "slimmable.cli.main", *args, "--out", "two"], tmp_path)
    assert "x2 processes" in two.stderr and "teacher: slim_resnet18 from" in two.stderr
    one_ck, two_ck = load_checkpoint(tmp_path / "one" / "last.pt"), load_checkpoint(tmp_path / "two" / "last.pt")
    for k, v in one_ck["model"].items():
        if v.is_floating_point():
            torch.testing.assert_close(two_ck["model"][k], v, rtol=1e-4, atol=1e-4, msg=k)
    alone, one_hist, two_hist = (json.loads((tmp_path / d / "history.json").read_text())[0]["train"]
                                 for d in ("teacher", "one", "two"))  # fmt: skip
    for a, b, c in zip(alone, one_hist, two_hist):
        assert b["loss"] == pytest.approx(c["loss"], rel=1e-3)
        assert abs(a["loss"] - b["loss"]) > 1e-3  # the same run without a teacher (the teacher's own) differs


def test_a_budgeted_run_replans_on_every_process(tmp_path: Path) -> None:
    """Under torchrun the plan is re-planned every log_interval steps on every process (rank 0's plan, broadcast):
    the same steps everywhere, so the collective neither hangs nor lets the processes' step counts differ."""
    fm = write_fashion_mnist(tmp_path / "fm", n_train=80, n_test=24)
    recipe = tiny_recipe(fm, data={"augment": "none", "val_size": 16, "batch_size": 16},
                         train={"epochs": 2, "time_budget_min": 1e3, "log_interval": 1})  # fmt: skip
    write_recipe(tmp_path / "r.yaml", recipe)
    args = ["train", "--recipe", "r.yaml", "--device", "cpu", "--no-tensorboard", "--latency-runs", "0"]
    _run([*TORCHRUN, "-m", "slimmable.cli.main", *args, "--out", "two"], tmp_path)
    ck = load_checkpoint(tmp_path / "two" / "last.pt")
    assert ck["step"] == ck["plan"]["total_steps"] == 8 and ck["time_spent"] > 0
    assert json.loads((tmp_path / "two" / "hardware.json").read_text())["plan"]["total_steps"] == 8


HARNESS = textwrap.dedent(
    """
    import copy, json
    import torch, torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    import slimmable
    from slimmable.nn import get_width
    from slimmable.train import (
        convert_sync_batchnorm, create_optimizer, init_distributed, shutdown_distributed, train_step, wrap_ddp,
    )

    info = init_distributed("cpu")
    torch.manual_seed(0)
    model = slimmable.create_model("slim_resnet18", widths=(0.125, 0.25), num_classes=4, in_chans=1, small_input=True)
    model.double()  # float64: the comparison with one process is exact up to rounding of 1e-16
    reference = copy.deepcopy(model)  # one process, the whole batch, plain BatchNorm
    convert_sync_batchnorm(model, dist.new_group())
    ddp = wrap_ddp(model, info)
    calls = []

    def hook(state, bucket):
        calls.append(get_width(model))
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, hook)
    kw = dict(momentum=0.9, nesterov=True, weight_decay=1e-3)  # decay groups without BN and biases
    opt, ref_opt = create_optimizer(model, "sgd", 0.05, **kw), create_optimizer(reference, "sgd", 0.05, **kw)
    g = torch.Generator().manual_seed(1)
    per_step, worst = [], 0.0
    for step in range(4):
        x = torch.randn(8, 1, 16, 16, generator=g, dtype=torch.float64)
        y = torch.randint(0, 4, (8,), generator=g)
        before = len(calls)
        train_step(model, opt, x[info.rank :: 2], y[info.rank :: 2], [0.25, 0.125], ddp=ddp)
        train_step(reference, ref_opt, x, y, [0.25, 0.125])
        per_step.append(calls[before:])
        worst = max(worst, max(float((p - q).abs().max()) for p, q in zip(model.parameters(), reference.parameters())))
    if info.rank == 0:
        print(json.dumps({"per_step": per_step, "worst": worst}))
    shutdown_distributed()
    """
)


def test_ddp_step_equals_one_process_and_all_reduces_once(tmp_path: Path) -> None:
    script = tmp_path / "harness.py"
    script.write_text(HARNESS)
    proc = _run([*TORCHRUN, str(script)], tmp_path)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # DDP (no_sync for the wider width, unused BN switches) + SyncBatchNorm2d == one process on the global batch
    assert result["worst"] < 1e-10, result["worst"]
    for calls in result["per_step"]:
        # gradients are all-reduced once per step, during the last width's backward; the first ran under no_sync
        assert calls and set(calls) == {0.125}, calls
        assert len(calls) == len(result["per_step"][-1])


DETECTION_HARNESS = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    from torch import nn
    import slimmable
    from slimmable.data.coco import CocoDetectionDataset
    from slimmable.train import init_distributed, shutdown_distributed
    from slimmable.train.detection import evaluate_detector

    info = init_distributed("cpu")  # under torchrun a process group; alone one process
    data = CocoDetectionDataset(sys.argv[1], sys.argv[2])


    class NoisyOracle(nn.Module):
        # the ground truth of the image it is shown (found by content), boxes shifted by the image id: 0 < AP < 1
        def __init__(self):
            super().__init__()
            self.truth = {data[i][0].sum().item(): data[i][1] for i in range(len(data))}
            self.seen = 0

        def forward(self, images):
            self.seen += len(images)
            out = []
            for img in images:
                t = self.truth[img.sum().item()]
                boxes = t["boxes"] + 3.0 * (int(t["image_id"]) % 4)
                out.append({"boxes": boxes, "labels": t["labels"], "scores": torch.linspace(1, 0.5, len(boxes))})
            return out


    oracle = NoisyOracle()
    oracle_ap = evaluate_detector(oracle, data, iou_types=["bbox"], batch_size=2)
    torch.manual_seed(0)
    model = slimmable.create_model("slim_fasterrcnn_resnet18_fpn", widths=(0.5, 1.0), box_score_thresh=0.0)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    model_ap = evaluate_detector(model, data, batch_size=2)
    mine = {"oracle": oracle_ap[None], "model": {str(w): v for w, v in model_ap.items()},
            "oracle_images": oracle.seen, "model_images": sum(seen)}
    everyone = [mine]
    if info.world_size > 1:
        everyone = [None] * info.world_size
        dist.all_gather_object(everyone, mine)
        shutdown_distributed()
    if info.rank == 0:
        print(json.dumps(everyone))
    """
)


def test_detection_evaluation_shards_images_and_scores_all_of_them(tmp_path: Path) -> None:
    from slimmable.data.scenes import make_scenes

    fm = write_fashion_mnist(tmp_path / "fm", n_train=16, n_test=16)
    ann = make_scenes(tmp_path / "scenes", "test", 7, seed=0, root=fm)  # odd: the shards differ in size
    script = tmp_path / "harness.py"
    script.write_text(DETECTION_HARNESS)
    args = [str(script), str(tmp_path / "scenes"), str(ann)]
    (one,) = json.loads(_run([PYTHON, *args], tmp_path).stdout.splitlines()[-1])
    two = json.loads(_run([*TORCHRUN, *args], tmp_path).stdout.splitlines()[-1])
    assert (one["oracle_images"], one["model_images"]) == (7, 14)  # 7 images at each of 2 widths
    assert [r["oracle_images"] for r in two] == [4, 3]  # each process ran its own shard, once per width
    assert [r["model_images"] for r in two] == [8, 6]
    assert 0.05 < one["oracle"]["bbox"]["AP"] < 0.95, one["oracle"]  # AP would change if an image went missing
    for r in two:  # every process scored all 7 images: the AP of one process over the whole set
        assert r["oracle"] == one["oracle"] and r["model"] == one["model"]


def test_detector_trains_under_torchrun(tmp_path: Path) -> None:
    """Algorithm 1 for a detector in 2 Gloo processes: DDP over torchvision's detector (its RPN and RoI samplers
    and the unused switches of other widths), validation sharded, rank 0's checkpoint and report."""
    fm = write_fashion_mnist(tmp_path / "fm", n_train=32, n_test=16)
    write_recipe(tmp_path / "d.yaml", tiny_detection_recipe(fm))
    args = ["train", "--recipe", "d.yaml", "--device", "cpu", "--no-tensorboard", "--latency-runs", "0"]
    two = _run([*TORCHRUN, "-m", "slimmable.cli.main", *args, "--out", "two"], tmp_path, timeout=400)
    assert "x2 processes" in two.stderr
    history = json.loads((tmp_path / "two" / "history.json").read_text())
    assert len(history) == 2 and all({r["width"] for r in h["val"]} == {0.5, 1.0} for h in history)
    for w in (0.5, 1.0):  # both processes' gradients averaged: every width's loss falls
        first, second = (next(r["loss"] for r in h["train"] if r["width"] == w) for h in history)
        assert second < first, (w, first, second)
    rows = json.loads((tmp_path / "two" / "final_metrics.json").read_text())["widths"]
    assert [r["images"] for r in rows] == [6, 6]  # every test scene scored once, whichever process ran it
    assert all(0.0 <= r["bbox_AP"] <= 100.0 and 0.0 <= r["segm_AP"] <= 100.0 for r in rows)
    ck = load_checkpoint(tmp_path / "two" / "last.pt")
    # 14 training scenes (20 less 6 held out) in global batches of 4, 2 per process, the partial one dropped
    assert ck["step"] == 2 * 3


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc (Linux)")
def test_shutdown_joins_the_gloo_threads_of_a_group_held_in_a_cycle(tmp_path: Path) -> None:
    """A DDP wrapper caught in a reference cycle keeps its group alive after ``destroy_process_group``; freed at
    interpreter shutdown, its worker threads aborted one torchrun process in six. ``shutdown_distributed`` frees it."""
    import torch.distributed as dist
    from torch import nn

    from slimmable.train import shutdown_distributed

    def gloo_threads() -> int:
        return sum("gloo" in p.read_text() for p in Path("/proc/self/task").glob("*/comm"))

    before = gloo_threads()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    holder: dict = {"ddp": nn.parallel.DistributedDataParallel(nn.Linear(2, 2))}
    holder["self"] = holder  # the cycle
    holder["ddp"](torch.ones(1, 2)).sum().backward()  # one all-reduce through the group
    del holder
    assert gloo_threads() > before
    shutdown_distributed()
    assert gloo_threads() == before
