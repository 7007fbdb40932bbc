"""Vision transformers train like the CNN families: Algorithm 1 and US training (sandwich rule, in-place
distillation) through ``train_from_config`` on the native ``slim_vit_tiny``, and Algorithm 1 on a converted
torchvision ViT. Tiny configurations (2 blocks, 16-px fake Fashion-MNIST), a few steps each: the losses are finite and
fall."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from fake_data import tiny_recipe, write_fashion_mnist

import slimmable
from slimmable.config import RunConfig, load_recipe
from slimmable.nn import slim_modules
from slimmable.train import Sandwich, build_model_from_checkpoint, load_checkpoint, train_from_config, train_step

#: two blocks: the blocks are all alike, depth only multiplies time
VIT = {"name": "slim_vit_tiny", "widths": None, "options": {"depth": 2}}
#: AdamW with a warm-up and a cosine decay, as ViTs are trained (the packaged recipe's optimizer)
ADAMW = {"name": "adamw", "lr": 2e-3, "weight_decay": 0.05, "schedule": "cosine", "warmup_epochs": 0.5}


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fashion_mnist(tmp_path_factory.mktemp("data") / "fm", n_train=96, n_test=48)


def _train(sections: dict, out: Path) -> object:
    cfg = RunConfig.from_dict(sections)
    return train_from_config(cfg, out, device="cpu", latency_runs=0, tensorboard=False, cache_dir=out.parent / "c")


def _epoch_losses(out: Path) -> list[dict]:
    return [{t["width"]: t["loss"] for t in h["train"]} for h in json.loads((out / "history.json").read_text())]


def test_algorithm_1_trains_the_native_vit_at_every_width(fmnist: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = tiny_recipe(fmnist, model=VIT, optim=ADAMW, train={"epochs": 3, "label_smoothing": 0.1})
    result = _train(recipe, out)
    widths = [0.25, 0.5, 0.75, 1.0]  # small_input: 4 heads of 48, quarters
    assert [r["width"] for r in result.report] == widths
    macs = [r["macs"] for r in result.report]
    assert macs == sorted(macs) and len(set(macs)) == 4
    losses = _epoch_losses(out)
    assert [list(e) for e in losses] == [sorted(widths, reverse=True)] * 3  # widest first, every step
    assert all(torch.isfinite(torch.tensor(list(e.values()))).all() for e in losses)
    assert all(losses[-1][w] < losses[0][w] for w in widths), losses
    model = build_model_from_checkpoint(out / "best.pt")
    assert model.model_kwargs["depth"] == 2 and model.widths == tuple(widths)


def test_us_training_sandwich_and_inplace_distillation_on_the_native_vit(fmnist: Path, tmp_path: Path) -> None:
    out = tmp_path / "us"
    model = {**VIT, "width_range": [0.25, 1.0], "stat_widths": [0.25, 0.5, 1.0]}
    train = {"epochs": 3, "width_sampler": "sandwich", "num_sampled_widths": 3, "inplace_distill": True}
    result = _train(tiny_recipe(fmnist, model=model, optim=ADAMW, train=train), out)
    losses = _epoch_losses(out)
    assert [list(e) for e in losses] == [[1.0, "random", 0.25]] * 3  # the sandwich: widest, a random one, narrowest
    assert all(torch.isfinite(torch.tensor(list(e.values()))).all() for e in losses)
    # the widest width learns the labels; the others learn its predictions, a target that sharpens as it learns (so
    # their distillation loss need not fall: test_sandwich_steps_with_distillation_teach_the_narrow_widths)
    assert losses[-1][1.0] < losses[0][1.0], losses
    history = json.loads((out / "history.json").read_text())
    assert all([v["width"] for v in h["val"]] == [0.25, 1.0] for h in history)  # the widths trained every step
    # LayerNorm keeps no statistics: no calibration, and the report lists the model's stat_widths as they are
    assert [r["width"] for r in result.report] == [0.25, 0.5, 1.0]
    ckpt = load_checkpoint(out / "best.pt")
    assert tuple(ckpt["model_kwargs"]["width_range"]) == (0.25, 1.0)
    rebuilt = build_model_from_checkpoint(ckpt).eval()
    assert rebuilt.width_range == (0.25, 1.0) and rebuilt.widths == (0.25, 0.5, 1.0)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():  # any width in the range runs, with fewer heads and MLP units the narrower it is
        rebuilt.set_width(0.6)
        assert rebuilt(x).shape == (2, 10) and rebuilt.blocks[0].attn.active_heads == 3


def test_sandwich_steps_with_distillation_teach_the_narrow_widths() -> None:
    torch.manual_seed(0)
    model = slimmable.create_model(
        "slim_vit_tiny", small_input=True, num_classes=5, in_chans=1, depth=2, width_range=(0.25, 1.0)
    ).train()
    sampler = Sandwich(0.25, 1.0, n=3)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 5, (8,), generator=g)

    def label_loss(width: float) -> float:
        with torch.no_grad(), slimmable.use_width(model, width):
            return F.cross_entropy(model(x), y).item()

    before = {w: label_loss(w) for w in (0.25, 0.6)}
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    rng = random.Random(0)
    for step in range(12):
        widths = sampler.widths_for_step(step, rng)
        assert widths[0] == 1.0 and widths[-1] == 0.25 and 0.25 <= widths[1] <= 1.0
        res = train_step(model, opt, x, y, widths, inplace_distill=True)
        assert torch.isfinite(res.losses).all()
    # only the widest width saw the labels; the narrow widths learnt them through its predictions
    assert all(label_loss(w) < before[w] for w in before), (before, {w: label_loss(w) for w in before})


def test_us_vit_refuses_switches_with_a_range() -> None:
    with pytest.raises(ValueError, match=r"widths \(0.5, 1.0\) are an S-Net's switches but width_range"):
        slimmable.create_model("slim_vit_tiny", small_input=True, widths=(0.5, 1.0), width_range=(0.25, 1.0))


def test_algorithm_1_trains_a_converted_torchvision_vit() -> None:
    torch.manual_seed(0)
    dense = torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=5
    )
    widths = (0.25, 0.5, 0.75, 1.0)
    model = slimmable.convert(dense, widths=widths).train()
    heads = [m.head_rule.channels for _, m in slim_modules(model) if hasattr(m, "head_rule")]
    assert heads == [(1, 2, 3, 4)] * 2  # 1-4 of the 4 heads in each block
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 5, (8,), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = train_step(model, opt, x, y, sorted(widths, reverse=True)).losses
    for _ in range(10):
        last = train_step(model, opt, x, y, sorted(widths, reverse=True)).losses
    assert torch.isfinite(first).all() and torch.isfinite(last).all()
    assert (last < first).all(), (first, last)  # every width learns the batch


def test_us_vit_with_a_slim_stream_narrows_it_in_whole_heads() -> None:
    model = slimmable.create_model(
        "slim_vit_tiny", small_input=True, num_classes=5, in_chans=1, depth=1, width_range=(0.25, 1.0), slim_embed=True
    ).eval()
    x = torch.randn(2, 1, 28, 28)
    for width, heads in ((0.25, 1), (0.5, 2), (0.7, 3), (1.0, 4)):
        model.set_width(width)
        with torch.no_grad():
            tokens = model.forward_features(x)
        # each width is a ViT of `heads` heads of 48: its stream has heads * 48 features
        assert model.blocks[0].attn.active_heads == heads and tokens.shape == (2, 50, heads * 48), width


def test_the_packaged_recipe_trains(fmnist: Path, tmp_path: Path) -> None:
    overrides = [f"data.root={fmnist}", "data.val_size=16", "data.batch_size=16", "train.epochs=1",
                 "train.time_budget_min=null", "train.amp=off"]  # fmt: skip
    cfg = load_recipe("fmnist_slim_vit_tiny", overrides=overrides)
    assert cfg.optim.name == "adamw" and cfg.optim.warmup_epochs > 0 and cfg.train.label_smoothing == 0.1
    assert cfg.data.val_size == 16 and load_recipe("fmnist_slim_vit_tiny").data.val_size == 5000  # held out
    result = train_from_config(cfg, tmp_path / "run", device="cpu", latency_runs=0, tensorboard=False)
    # the MACs per image its comments give: patch 7 (17 tokens), 4 blocks, 1-4 heads of 48
    assert [round(r["macs"] / 1e6, 1) for r in result.report] == [7.8, 15.4, 23.0, 30.7]
    assert all(0 <= r["top1"] <= 100 for r in result.report)
