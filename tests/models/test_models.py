"""Every registered model runs at every width; MACs and active parameters equal the reference figures."""

from __future__ import annotations

import pytest
import torch
import torchvision

import slimmable
from slimmable.search import count_active_params, count_macs

# MACs (millions) per width at 224x224, 1000 classes: the official models measured with torch.utils.flop_counter
# (../shared/official/README.md, right-hand column).
OFFICIAL_MACS = {
    "slim_mobilenet_v1": {0.25: 41.0, 0.5: 149.5, 0.75: 325.4, 1.0: 568.7},
    "slim_mobilenet_v2": {0.35: 59.3, 0.5: 97.1, 0.75: 209.1, 1.0: 300.8},
    "slim_shufflenet_v1": {0.5: 37.5, 1.0: 137.3, 2.0: 523.4},
    "slim_resnet50": {0.25: 278.1, 0.5: 1052.3, 0.75: 2322.7, 1.0: 4089.2},
}
# The official profiler's column (counts pooling and shuffles too): ours is within 0.5% of it.
OFFICIAL_PROFILER_MACS = {
    "slim_mobilenet_v1": {0.25: 41.0, 0.5: 149.5, 0.75: 325.4, 1.0: 568.8},
    "slim_mobilenet_v2": {0.35: 59.3, 0.5: 97.2, 0.75: 209.1, 1.0: 300.8},
    "slim_shufflenet_v1": {0.5: 37.8, 1.0: 137.7, 2.0: 524.2},
    "slim_resnet50": {0.25: 278.1, 0.5: 1052.4, 0.75: 2322.8, 1.0: 4089.3},
}


@pytest.mark.parametrize("name", slimmable.list_models(task="classification"))
def test_every_model_runs_at_every_width_small_input(name: str) -> None:
    model = slimmable.create_model(name, num_classes=10, in_chans=1, small_input=True).eval()
    x = torch.randn(2, 1, 28, 28)
    widths = model.widths if model.width_range is None else (model.widths[0], model.widths[-1])
    outs = []
    with torch.no_grad():
        for w in widths:
            with model.use_width(w):
                y = model(x)
            assert y.shape == (2, 10) and torch.isfinite(y).all()
            outs.append(y)
    assert not torch.equal(outs[0], outs[-1])


@pytest.mark.parametrize("name", list(OFFICIAL_MACS))
def test_macs_equal_official_figures(name: str) -> None:
    model = slimmable.create_model(name).eval()
    x = torch.randn(1, 3, 224, 224)
    for w, ref in OFFICIAL_MACS[name].items():
        with model.use_width(w):
            macs = count_macs(model, x) / 1e6
        assert abs(macs - ref) <= 0.1, (w, macs, ref)
        # ShuffleNet 0.5 differs by 0.8% (0.3 M of pooling and shuffles that flop_counter does not count).
        tol = 0.01 if name == "slim_shufflenet_v1" else 0.005
        assert abs(macs - OFFICIAL_PROFILER_MACS[name][w]) <= tol * OFFICIAL_PROFILER_MACS[name][w]


@pytest.mark.parametrize(
    ("name", "reference"),
    [("slim_mobilenet_v2", torchvision.models.mobilenet_v2), ("slim_resnet50", torchvision.models.resnet50)],
)
def test_active_params_at_full_width_equal_torchvision_dense(name: str, reference) -> None:
    model = slimmable.create_model(name).eval()
    dense = sum(p.numel() for p in reference().parameters())
    with model.use_width(1.0):
        assert count_active_params(model, torch.randn(1, 3, 224, 224)) == dense
    total = sum(p.numel() for p in model.parameters())
    assert total > dense  # the other switches' BNs exist but are not active


def test_active_params_shrink_with_width() -> None:
    model = slimmable.create_model("slim_mobilenet_v1").eval()
    x = torch.randn(1, 3, 224, 224)
    counts = []
    for w in model.widths:
        with model.use_width(w):
            counts.append(count_active_params(model, x))
    assert counts == sorted(counts) and counts[0] < counts[-1] / 4
    assert counts[-1] == 4_231_976  # MobileNet v1 1.0: 4.23 M


@pytest.mark.parametrize("name", ["slim_resnet18", "slim_resnet50"])
def test_resnet_stage_forward_equals_the_flat_feature_chain(name: str) -> None:
    # SlimResNet.forward walks ``features`` stage by stage (to keep torchvision's activation lifetimes); it must
    # visit every layer once, in order, at every width.
    model = slimmable.create_model(name, num_classes=10, small_input=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for _ in model.iter_widths():
            flat = model.classifier(torch.flatten(model.features(x), 1))
            torch.testing.assert_close(model(x), flat, rtol=0, atol=0)


def test_custom_widths_build_and_run() -> None:
    model = slimmable.create_model("slim_mobilenet_v2", widths=(1.0, 0.3, 0.6), num_classes=5, small_input=True)
    assert model.widths == (0.3, 0.6, 1.0)  # sorted: BN switch i is the i-th smallest width
    model.eval()
    for w in model.widths:
        with model.use_width(w):
            assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    with pytest.raises(ValueError, match="0.35"):
        model.set_width(0.35)
    wide = slimmable.create_model("slim_mobilenet_v2", widths=(0.5, 1.4), num_classes=5, small_input=True)
    assert wide.num_features == 1792  # the tail widens above 1.0, as in MobileNet v2 1.4


def test_us_model_runs_at_any_width_in_range_in_training_mode() -> None:
    model = slimmable.create_model("us_mobilenet_v2", num_classes=10, small_input=True)
    assert model.width_range == (0.35, 1.0)
    widths = slimmable.get_widths(model)
    assert widths.range == (0.35, 1.0) and widths.is_range and widths.switches == model.widths
    assert len(widths.switches) == 27 and 0.4123 in widths and 0.3 not in widths  # stat widths every 0.025
    model.train()
    for w in (0.35, 0.4123, 0.777, 1.0):
        model.set_width(w)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"outside the width range \[0.35, 1\]"):
        model.set_width(0.3)


def test_create_model_errors() -> None:
    with pytest.raises(ValueError, match="Did you mean slim_mobilenet_v2"):
        slimmable.create_model("slim_mobilenet_v3")
    with pytest.raises(ValueError, match="not a positive number"):
        slimmable.create_model("slim_resnet18", widths=(0.5, -1.0))
    with pytest.raises(ValueError, match="depth 19"):
        slimmable.models.SlimResNet(depth=19)


@pytest.mark.parametrize(
    ("family", "budget", "macs"),
    [("mobilenet_v2", "207M", 207), ("mobilenet_v2", "305M", 305), ("mobilenet_v1", "150M", 150),
     ("mobilenet_v1", "325M", 325)],
)  # fmt: skip
def test_official_autoslim_channel_configs_build_and_profile_to_their_macs(family, budget, macs) -> None:
    from slimmable.search.official_specs import official_autoslim_spec

    spec = official_autoslim_spec(family, budget)
    model = slimmable.create_model(f"slim_{family}", channels=spec).eval()
    assert model.widths == (1.0,)
    got = count_macs(model, torch.randn(1, 3, 224, 224)) / 1e6
    assert abs(got - macs) <= 0.01 * macs
    active = slimmable.get_channels(model)
    assert all(active[k] == v for k, v in spec.items() if k in active)


def test_channel_spec_per_width_and_errors() -> None:
    spec = {"features.0.0": [8, 16], "features.1.body.3": [8, 16]}
    model = slimmable.create_model("slim_mobilenet_v1", widths=(0.5, 1.0), channels=spec, small_input=True)
    assert model.features[0][0].out_channels == 16
    with model.use_width(0.5):
        assert slimmable.get_channels(model)["features.1.body.3"] == 8
    with pytest.raises(ValueError, match=r"does not have: \['features.99.body.3'\]"):
        slimmable.create_model("slim_mobilenet_v1", channels={"features.99.body.3": 8})
    with pytest.raises(ValueError, match="one count per width"):
        slimmable.create_model("slim_mobilenet_v1", widths=(0.5, 1.0), channels={"features.0.0": [8, 16, 32]})
    with pytest.raises(ValueError, match="width_range"):
        slimmable.create_model("us_mobilenet_v2", channels={"features.0.0": 8})
