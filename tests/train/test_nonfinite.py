"""Issue 16: a non-finite loss never reaches the weights; the Trainer stops (naming the step) or skips and counts."""

from __future__ import annotations

import pytest
import torch

import slimmable
from slimmable.train import Trainer, create_optimizer, create_width_sampler, train_step
from slimmable.train.nonfinite import NonFiniteLoss, NonFiniteLossError


def _model_and_optimizer():
    model = slimmable.create_model("slim_resnet18", widths=(0.125, 0.25), num_classes=4, in_chans=1, small_input=True)
    return model, create_optimizer(model, "sgd", 0.1, momentum=0.9)


def _batches(nan_at: set[int], n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        x = torch.randn(4, 1, 16, 16, generator=g)
        if i in nan_at:
            x[0, 0, 0, 0] = float("nan")
        out.append((x, torch.randint(0, 4, (4,), generator=g)))
    return out


def test_train_step_refuses_a_nan_loss_before_the_update() -> None:
    model, opt = _model_and_optimizer()
    before = {k: v.clone() for k, v in model.named_parameters()}
    ((x, y),) = _batches({0}, n=1)
    with pytest.raises(NonFiniteLoss, match=r"width 0.25: nan, width 0.125: nan"):
        train_step(model, opt, x, y, [0.25, 0.125])
    assert all(torch.equal(before[k], p) for k, p in model.named_parameters())
    assert not opt.state and all(p.grad is None for p in model.parameters())  # no momentum buffer, no gradient


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_trainer_stops_or_skips(mode: str) -> None:
    model, opt = _model_and_optimizer()
    sampler = create_width_sampler("all", (0.125, 0.25))
    trainer = Trainer(model, opt, None, sampler, device=torch.device("cpu"), nonfinite=mode, log_interval=100)
    batches = _batches({2})
    if mode == "stop":
        with pytest.raises(NonFiniteLossError, match=r"non-finite loss at epoch 1, batch 3/4 \(step 2\), width 0.25"):
            trainer.train_epoch(batches, 0, steps_in_epoch=4)
        assert trainer.step == 2
        return
    stats = trainer.train_epoch(batches, 0, steps_in_epoch=4)
    assert stats.skipped_steps == 1 and stats.batches_done == 4 and trainer.step == 4
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())  # weights and BN statistics
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.loss.values())
