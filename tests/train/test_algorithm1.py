"""Algorithm 1 and its options: summed per-width gradients, distillation, optimizer groups, schedules, AMP."""

from __future__ import annotations

import copy
import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F

import slimmable
from slimmable.train import (
    AllWidths,
    WidthSampler,
    create_optimizer,
    create_scheduler,
    evaluate,
    lr_factor,
    param_groups,
    soft_cross_entropy,
    train_step,
)

WIDTHS = (0.5, 1.0)


def _model(name: str = "slim_mobilenet_v2", widths: tuple[float, ...] = WIDTHS) -> torch.nn.Module:
    torch.manual_seed(0)
    return slimmable.create_model(name, widths=widths, num_classes=5, small_input=True)


def _batch(n: int = 4, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 5, (n,), generator=g)


def _frozen_sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    # lr 0: the step leaves the weights alone, so the gradients can be compared
    return torch.optim.SGD(model.parameters(), lr=0.0)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(("name", "widths"), [("slim_mobilenet_v2", (0.5, 1.0)), ("slim_resnet18", (0.125, 0.25))])
def test_gradient_is_sum_of_per_width_gradients(name: str, widths: tuple[float, float]) -> None:
    model = _model(name, widths)
    x, y = _batch()
    reference = copy.deepcopy(model)
    train_step(model, _frozen_sgd(model), x, y, list(reversed(widths)))
    got = _grads(model)
    per_width = []
    for w in reversed(widths):
        ref = copy.deepcopy(reference)
        ref.set_width(w)
        F.cross_entropy(ref(x), y).backward()
        per_width.append(_grads(ref))
    for n, g in got.items():
        parts = [pw[n] for pw in per_width if pw[n] is not None]
        if not parts:
            assert g is None, n
            continue
        torch.testing.assert_close(g, sum(parts), rtol=1e-5, atol=1e-6, msg=n)
    # each switchable BN gets gradient only from its own width
    bn = model.features[0][1]
    assert bn.bn[0].weight.grad is not None and bn.bn[1].weight.grad is not None
    torch.testing.assert_close(bn.bn[1].weight.grad, per_width[0]["features.0.1.bn.1.weight"])
    assert per_width[0]["features.0.1.bn.0.weight"] is None


def test_one_optimizer_step_per_batch() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    opt.register_step_post_hook(lambda *a: calls.append(1))
    res = train_step(model, opt, *_batch(), [1.0, 0.5])
    assert len(calls) == 1
    assert res.widths == [1.0, 0.5] and res.losses.shape == (2,) and res.correct.shape == (2,)
    assert not res.losses.requires_grad


def test_inplace_distillation_targets_the_widest_prediction() -> None:
    model = _model()
    x, y = _batch()
    ref = copy.deepcopy(model)
    res = train_step(model, _frozen_sgd(model), x, y, [1.0, 0.5], inplace_distill=True)
    with torch.no_grad():
        ref.set_width(1.0)
        teacher = F.softmax(ref(x), dim=1)
        ref.set_width(0.5)
        student = ref(x)
    torch.testing.assert_close(res.losses[0], F.cross_entropy(ref.set_width(1.0)(x), y).detach())
    torch.testing.assert_close(res.losses[1], soft_cross_entropy(student, teacher))
    # the teacher is detached: the widest width's BN gets gradient only from its own loss
    ref2 = copy.deepcopy(ref)
    ref2.zero_grad()
    ref2.set_width(1.0)
    F.cross_entropy(ref2(x), y).backward()
    bn1 = "features.0.1.bn.1.weight"
    torch.testing.assert_close(dict(model.named_parameters())[bn1].grad, dict(ref2.named_parameters())[bn1].grad)


def test_label_smoothing() -> None:
    model = _model()
    x, y = _batch()
    ref = copy.deepcopy(model)
    res = train_step(model, _frozen_sgd(model), x, y, [1.0], label_smoothing=0.1)
    with torch.no_grad():
        expected = F.cross_entropy(ref.set_width(1.0)(x), y, label_smoothing=0.1)
    torch.testing.assert_close(res.losses[0], expected)


def test_gradient_clipping() -> None:
    model = _model()
    x, y = _batch()
    train_step(model, _frozen_sgd(model), x, y, [1.0, 0.5], grad_clip=0.01)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert norm <= 0.01 * (1 + 1e-4)


def test_channels_last_matches_contiguous() -> None:
    model = _model("slim_resnet18", (0.125, 0.25))
    x, y = _batch(8, 32)
    other = copy.deepcopy(model).to(memory_format=torch.channels_last)
    train_step(model, _frozen_sgd(model), x, y, [0.25, 0.125])
    train_step(other, _frozen_sgd(other), x.contiguous(memory_format=torch.channels_last), y, [0.25, 0.125])
    grads = [(n, a.grad, b.grad) for (n, a), b in zip(model.named_parameters(), other.parameters())]
    scale = max(float(a.norm()) for _, a, _ in grads)
    for n, a, b in grads:
        # rounding differs between memory formats; compare against the gradient's own and the global scale
        assert float((a - b).norm()) <= 2e-3 * float(a.norm()) + 1e-5 * scale, n


def test_bf16_autocast_step_on_cpu() -> None:
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    res = train_step(model, opt, *_batch(), [1.0, 0.5], autocast_dtype=torch.bfloat16)
    assert torch.isfinite(res.losses).all()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_all_widths_sampler() -> None:
    s = AllWidths([0.25, 1.0, 0.5])
    assert isinstance(s, WidthSampler)
    assert s.widths_for_step(0, random.Random(0)) == [1.0, 0.5, 0.25]


def test_weight_decay_groups() -> None:
    model = _model()
    groups = param_groups(model, 1e-4)
    decayed = {id(p) for p in groups[0]["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert groups[0]["weight_decay"] == 1e-4 and groups[1]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    for pid in decayed:
        n = names[pid]
        assert n.endswith("weight") and ".bn." not in n and not n.startswith("features.0.1"), n
    assert id(model.classifier[-1].bias) not in decayed
    dw = model.features[2].body[3].weight  # a depthwise convolution
    assert dw.shape[1] == 1 and id(dw) in decayed
    no_dw = {id(p) for p in param_groups(model, 1e-4, decay_depthwise=False)[0]["params"]}
    assert id(dw) not in no_dw and id(model.features[2].body[0].weight) in no_dw
    everything = param_groups(model, 1e-4, decay_norm_and_bias=True)
    assert len(everything) == 1 and len(everything[0]["params"]) == len(list(model.parameters()))


def test_optimizers() -> None:
    model = _model()
    sgd = create_optimizer(model, "sgd", 0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"]
    adamw = create_optimizer(model, "adamw", 1e-3, weight_decay=0.05)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[1]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="optimizer 'lamb' is not one of sgd, adamw"):
        create_optimizer(model, "lamb")


def test_schedules() -> None:
    kw = dict(steps_per_epoch=10, total_steps=100)
    assert lr_factor(0, schedule="cosine", **kw) == 1.0
    assert lr_factor(50, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_factor(99, schedule="cosine", min_factor=0.1, **kw) == pytest.approx(0.1, abs=1e-3)
    assert lr_factor(50, schedule="linear", **kw) == pytest.approx(0.5)
    assert lr_factor(29, schedule="multistep", milestones=(3, 6), **kw) == 1.0
    assert lr_factor(30, schedule="multistep", milestones=(3, 6), **kw) == pytest.approx(0.1)
    assert lr_factor(65, schedule="multistep", milestones=(3, 6), **kw) == pytest.approx(0.01)
    assert lr_factor(25, schedule="exponential", gamma=0.98, **kw) == pytest.approx(0.98**2)
    # warm-up: linear from warmup_factor to 1, then the schedule over the remaining steps
    assert lr_factor(0, schedule="cosine", warmup_steps=10, **kw) == pytest.approx(0.1)
    assert lr_factor(9, schedule="cosine", warmup_steps=10, **kw) == pytest.approx(1.0)
    assert lr_factor(55, schedule="cosine", warmup_steps=10, **kw) == pytest.approx(0.5)
    assert lr_factor(4, schedule="constant", warmup_steps=10, warmup_factor=0.5, **kw) == pytest.approx(0.75)


def test_scheduler_steps_per_iteration() -> None:
    model = _model()
    opt = create_optimizer(model, "sgd", 0.4)
    sched = create_scheduler(opt, "cosine", epochs=2, steps_per_epoch=5, warmup_epochs=0.4)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.2) and lrs[1] == pytest.approx(0.4)
    assert lrs[-1] == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert len({g["lr"] for g in opt.param_groups}) == 1  # both weight-decay groups follow the schedule
    with pytest.raises(ValueError, match="min_lr 1.0 is above optim.lr"):
        create_scheduler(opt, "cosine", epochs=1, steps_per_epoch=1, min_lr=1.0)


def test_a_time_budget_schedule_follows_the_time_spent_and_resumes() -> None:
    """TimeBudgetFactor: warm-up over steps, then a cosine over the budget's time (or over the most steps, whichever
    is further); a slow stretch advances it by its time, not by its steps; its state survives state_dict()."""
    from slimmable.train.optim import TimeBudgetFactor

    opt = create_optimizer(_model(), "sgd", 1.0)
    sched = create_scheduler(opt, "cosine", epochs=10, steps_per_epoch=10, warmup_epochs=0.5, total_steps=100,
                             budget_seconds=100.0)  # fmt: skip
    factor = sched.lr_lambdas[0]
    assert isinstance(factor, TimeBudgetFactor)
    lrs, spent = [], 0.0
    for step in range(71):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        spent += 4.0 if step < 10 else 1.0  # busy for the first 10 steps (warm-up, then 5 s of decay), then quiet
        factor.spent = spent
        sched.step()
    assert lrs[4] == pytest.approx(1.0) and factor.warmup_end == pytest.approx(0.2)  # warm-up ended at 20 s
    # the decay follows the time: at step 30 (60 s spent) progress (0.6 - 0.2) / 0.8, not 25/95 of the steps
    assert lrs[30] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)), abs=0.02)
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(lrs[5:]))  # decays, never rises
    assert max(a - b for a, b in itertools.pairwise(lrs)) < 0.08  # no jump: a 4-s step is 5% of the decay's time
    assert lrs[-1] == pytest.approx(0.0, abs=2e-3)  # 100 s spent: the budget's end
    # the most steps bound it too: a fast machine ends its decay at max_steps
    fast = TimeBudgetFactor(1e6, {"schedule": "cosine", "steps_per_epoch": 10, "total_steps": 50})
    assert fast(0) == 1.0 and fast(25) == pytest.approx(0.5) and fast(50) == 0.0
    # a resume restores the time spent and where the warm-up ended
    opt2 = create_optimizer(_model(), "sgd", 1.0)
    again = create_scheduler(opt2, "cosine", epochs=10, steps_per_epoch=10, warmup_epochs=0.5, total_steps=100,
                             budget_seconds=100.0)  # fmt: skip
    again.load_state_dict(sched.state_dict())
    assert (again.lr_lambdas[0].spent, again.lr_lambdas[0].warmup_end) == (factor.spent, factor.warmup_end)
    assert again.lr_lambdas[0](71) == factor(71)


def test_evaluate_uses_each_switch_statistics_and_restores_state() -> None:
    model = _model()
    x, y = _batch(8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        train_step(model, opt, x * 3 + 1, y, [1.0, 0.5])
    model.set_width(0.5)
    model.train()
    loader = [(x[:5], y[:5]), (x[5:], y[5:])]
    metrics = evaluate(model, loader, [1.0, 0.5])
    assert model.training and model.width == 0.5
    model.eval()
    for m in metrics:
        with torch.no_grad(), model.use_width(m.width):
            logits = model(x)
        assert m.images == 8
        assert m.top1 == pytest.approx(100 * (logits.argmax(1) == y).float().mean().item())
        top5 = (logits.topk(5, 1).indices == y[:, None]).any(1).float().mean().item()
        assert m.top5 == pytest.approx(100 * top5)
        assert m.loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert metrics[0].loss != metrics[1].loss
