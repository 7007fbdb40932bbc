"""Width samplers: the sandwich rule (both ends every step, random widths fixed by seed and step), the factory."""

from __future__ import annotations

import random

import pytest
import torch

import slimmable
from slimmable.config import RunConfig
from slimmable.train import Sandwich, Trainer, WidthSampler, create_width_sampler


def _rng(seed: int, step: int) -> random.Random:
    return random.Random(seed * 1_000_003 + step)  # as the Trainer seeds each step


def test_sandwich_always_has_both_ends_and_n_widths_widest_first() -> None:
    s = Sandwich(0.35, 1.0, n=4)
    assert isinstance(s, WidthSampler) and s.fixed_widths == (1.0, 0.35)
    for step in range(200):
        ws = s.widths_for_step(step, _rng(0, step))
        assert len(ws) == 4 and ws[0] == 1.0 and ws[-1] == 0.35
        assert ws == sorted(ws, reverse=True)
        assert all(0.35 < w < 1.0 for w in ws[1:-1])
    assert Sandwich(0.25, 0.5, n=2).widths_for_step(0, _rng(0, 0)) == [0.5, 0.25]


def test_sandwich_is_deterministic_per_seed_and_step_and_varies_across_steps() -> None:
    s = Sandwich(0.25, 1.0, n=5)
    draws = [tuple(s.widths_for_step(step, _rng(7, step))) for step in range(50)]
    assert draws == [tuple(Sandwich(0.25, 1.0, n=5).widths_for_step(step, _rng(7, step))) for step in range(50)]
    assert len(set(draws)) == 50  # every step draws other random widths
    assert draws != [tuple(s.widths_for_step(step, _rng(8, step))) for step in range(50)]  # and so does the seed
    randoms = torch.tensor([w for d in draws for w in d[1:-1]])
    assert 0.5 < randoms.mean() < 0.75  # uniform over (0.25, 1.0): mean 0.625


def test_trainer_widths_depend_on_seed_and_step_only() -> None:
    model = slimmable.create_model("us_mobilenet_v1", num_classes=4, width_range=(0.25, 0.5), stat_widths=(0.25, 0.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def trainer(seed: int) -> Trainer:
        return Trainer(model, opt, None, Sandwich(0.25, 0.5), device=torch.device("cpu"), seed=seed)

    a, b = trainer(3), trainer(3)
    seq_a, seq_b = [], []
    for step in range(5):
        a.step = b.step = step
        random.random()  # the global random state plays no part
        seq_a.append(a.widths_for_step())
        seq_b.append(b.widths_for_step())
    assert seq_a == seq_b and len({tuple(w) for w in seq_a}) == 5


def test_create_width_sampler_and_errors() -> None:
    s = create_width_sampler("sandwich", (0.25, 0.5, 1.0), width_range=(0.25, 1.0), n=3)
    assert isinstance(s, Sandwich) and (s.lo, s.hi, s.n) == (0.25, 1.0, 3)
    assert create_width_sampler("all", (0.5, 1.0)).widths_for_step(0, _rng(0, 0)) == [1.0, 0.5]
    with pytest.raises(ValueError, match="universally slimmable model .*us_mobilenet_v2.*width_sampler: all"):
        create_width_sampler("sandwich", (0.25, 0.5))
    with pytest.raises(ValueError, match="'random' is not one of all, sandwich"):
        create_width_sampler("random", (0.25, 0.5))
    with pytest.raises(ValueError, match="n=1 must be an integer >= 2"):
        Sandwich(0.25, 1.0, n=1)
    with pytest.raises(ValueError, match="0 < lo < hi"):
        Sandwich(1.0, 0.25)


def test_recipe_keys_of_us_training_are_validated() -> None:
    cfg = RunConfig.from_dict(
        {"train": {"width_sampler": "sandwich", "num_sampled_widths": 3, "inplace_distill": True, "calib_batches": 5},
         "model": {"name": "us_mobilenet_v1", "width_range": [0.25, 1.0], "stat_widths": [0.25, 0.5, 1.0]}}
    )  # fmt: skip
    assert (cfg.train.width_sampler, cfg.train.num_sampled_widths, cfg.train.calib_batches) == ("sandwich", 3, 5)
    assert cfg.model.width_range == (0.25, 1.0) and cfg.model.stat_widths == (0.25, 0.5, 1.0)
    bad = [
        ({"train": {"num_sampled_widths": 1}}, "train.num_sampled_widths: must be >= 2"),
        ({"train": {"calib_batches": 0}}, "train.calib_batches: must be >= 1"),
        ({"train": {"width_sampler": "random"}}, "train.width_sampler must be one of 'all', 'sandwich'"),
        ({"model": {"width_range": [1.0, 0.5]}}, "model.width_range: must be \\[lo, hi\\] with 0 < lo < hi"),
        ({"model": {"width_range": [0.5, 1.0], "stat_widths": [0.25]}}, "\\[0.25\\] are outside model.width_range"),
    ]
    for data, match in bad:
        with pytest.raises(ValueError, match=match):
            RunConfig.from_dict(data, source="r.yaml")


def test_per_layer_sandwich_draws_one_width_per_tied_group_and_trains_those_channels() -> None:
    model = slimmable.create_model("us_mobilenet_v2", num_classes=10, small_input=True, width_range=(0.35, 1.0))
    groups = model.channel_groups()
    s = Sandwich(0.35, 1.0, n=4, layer_groups=groups)
    assert "per layer" in repr(s) and s.fixed_widths == (1.0, 0.35)
    draws = [s.widths_for_step(step, _rng(3, step)) for step in range(20)]
    assert draws == [s.widths_for_step(step, _rng(3, step)) for step in range(20)]  # seed and step only
    for ws in draws:
        assert ws[0] == 1.0 and ws[-1] == 0.35 and len(ws) == 4
        for layerwise in ws[1:-1]:
            assert set(layerwise) == {name for g in groups for name in g}
            for g in groups:  # tied layers share one draw
                assert len({layerwise[name] for name in g}) == 1 and 0.35 <= layerwise[g[0]] <= 1.0
            assert len(set(layerwise.values())) > len(groups) // 2  # non-uniform: the groups differ
    # the model runs at the drawn per-layer channels: each layer at its own width's rounding
    layerwise = draws[0][1]
    spec = slimmable.nn.set_layer_widths(model, layerwise)
    got = slimmable.get_channels(model)
    layers = dict(slimmable.nn.slim_modules(model))
    for name, w in layerwise.items():
        assert got[name] == spec[name] == layers[name].out_rule(w)
    assert model.train()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="sandwich"):
        create_width_sampler("all", (0.5, 1.0), layer_groups=groups)
    with pytest.raises(ValueError, match="train.per_layer_widths.*width_sampler: sandwich"):
        RunConfig.from_dict({"train": {"per_layer_widths": True}})
