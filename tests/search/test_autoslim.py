"""AutoSlim search: respects budgets and tied channels, resumes after interruption, writes specs by name."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

import slimmable
from slimmable.nn import set_channels
from slimmable.search import count_macs
from slimmable.search.autoslim import autoslim_search, channel_choices, load_channel_spec, save_channel_spec


def _data(n_batches: int = 1, classes: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, classes, (8,), generator=g)) for _ in range(n_batches)
    ]


def _macs(model, spec) -> float:
    model.eval()
    set_channels(model, spec)
    model.train()  # US layers: batch statistics
    return count_macs(model, torch.randn(2, 3, 16, 16), eval_mode=False) / 2


def test_us_search_respects_budgets_and_ties() -> None:
    model = slimmable.create_model("us_mobilenet_v2", num_classes=10, small_input=True)
    full = count_macs(model.eval(), torch.randn(1, 3, 16, 16))
    budgets = [0.8 * full, 0.6 * full]
    result = autoslim_search(model, _data(), budgets, input_size=(3, 16, 16), steps=4)
    assert result.done and set(result.found) == {f"{b:g}" for b in budgets}
    for b in budgets:
        spec = result.spec_for(b)
        assert _macs(model, spec) <= b
        for group in model.channel_groups():  # tied layers move together
            assert len({spec[name] for name in group}) == 1
    # larger budget, larger (or equal) network; each step shrank exactly one group by one notch
    assert result.found[f"{budgets[0]:g}"]["cost"] >= result.found[f"{budgets[1]:g}"]["cost"]
    costs = [h["cost"] for h in result.history]
    assert costs and all(a > b for a, b in itertools.pairwise(costs))  # every step removes MACs
    # the found network builds from scratch with the same MACs
    spec = result.spec_for(budgets[1])
    built = slimmable.create_model("slim_mobilenet_v2", channels=spec, num_classes=10, small_input=True).eval()
    assert abs(count_macs(built, torch.randn(1, 3, 16, 16)) - result.found[f"{budgets[1]:g}"]["cost"]) < 1


def test_search_resumes_after_interruption(tmp_path) -> None:
    torch.manual_seed(0)
    model = slimmable.create_model("us_mobilenet_v1", num_classes=10, small_input=True)
    full = count_macs(model.eval(), torch.randn(1, 3, 16, 16))
    budgets = [0.75 * full]
    reference = autoslim_search(model, _data(), budgets, input_size=(3, 16, 16), steps=4)

    state = tmp_path / "search.json"
    calls = []

    def stop_after_three(step: dict) -> None:
        calls.append(step)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        autoslim_search(
            model, _data(), budgets, input_size=(3, 16, 16), steps=4, state_path=state, progress=stop_after_three
        )
    saved = json.loads(state.read_text())
    assert len(saved["history"]) == 3 and not saved["done"]
    resumed = autoslim_search(model, _data(), budgets, input_size=(3, 16, 16), steps=4, state_path=state)
    assert resumed.history == reference.history
    assert resumed.spec_for(budgets[0]) == reference.spec_for(budgets[0])


def test_slimmable_search_uses_switch_channel_counts() -> None:
    model = slimmable.create_model("slim_mobilenet_v1", num_classes=10, small_input=True)
    layer = dict(slimmable.nn.slim_modules(model))["features.1.body.3"]
    assert channel_choices(layer) == [64, 48, 32, 16]
    full = count_macs(model.eval(), torch.randn(1, 3, 16, 16))
    result = autoslim_search(model, _data(1), [0.6 * full], input_size=(3, 16, 16))
    spec = result.spec_for(0.6 * full)
    assert all(v in channel_choices(dict(slimmable.nn.slim_modules(model))[k]) for k, v in spec.items())
    model.eval()
    set_channels(model, spec)
    assert count_macs(model, torch.randn(1, 3, 16, 16)) <= 0.6 * full


def test_channel_spec_files_round_trip_and_errors(tmp_path) -> None:
    spec = {"features.0.0": 16, "features.1.body.3": 24}
    path = save_channel_spec(tmp_path / "spec.json", spec, {"budget": "150M"})
    assert load_channel_spec(path) == spec
    (tmp_path / "bad.json").write_text('{"channels": {"features.0.0": -1}}')
    with pytest.raises(ValueError, match="positive ints"):
        load_channel_spec(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_channel_spec(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError):
        load_channel_spec(tmp_path / "none.json")


def test_unreachable_budget_is_refused_before_searching() -> None:
    model = slimmable.create_model("us_mobilenet_v1", num_classes=10, small_input=True)
    steps: list[dict] = []
    with pytest.raises(ValueError, match=r"budgets 1 are below the flops of the narrowest network \(.*give budgets"):
        autoslim_search(model, _data(), [1, 1e12], input_size=(3, 16, 16), steps=4, progress=steps.append)
    assert steps == []  # refused at step 0, not after the whole search
