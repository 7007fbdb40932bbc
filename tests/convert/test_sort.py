"""``sort_channels``: the widest width computes the same after sorting (converted torchvision and timm models, our
families, concatenations, grouped convolutions), a planted importance comes out as planted under each criterion,
the narrow width then keeps the live channels, and exports still match."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import nn

import slimmable
from slimmable.convert import sort as sort_module
from slimmable.export import export_width
from slimmable.nn import SwitchableBatchNorm2d
from slimmable.nn.converted import ConvertedBatchNorm2d


def _randomise_bn(model: nn.Module) -> nn.Module:
    """BN statistics and affine away from their defaults, so that a wrongly permuted one shows in the output."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.affine and m.running_mean is not None:
            m.running_mean.normal_(0, 0.2, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.normal_(0, 0.2, generator=gen)
    return model.eval()


class Concat(nn.Module):
    """Two branches concatenated, a BN over the concatenation, then flatten into a linear layer (H*W blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(24)
        self.head = nn.Conv2d(24, 8, 1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1))))
        return self.fc(torch.flatten(y, 1))


class Grouped(nn.Module):
    """A grouped convolution (its input and output keep their order), then depthwise and pointwise ones."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.g = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.bn2 = nn.BatchNorm2d(32)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw = nn.Conv2d(32, 24, 1)
        self.bn3 = nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.c1(x)))
        x = self.dw(torch.relu(self.bn2(self.g(x))))
        return self.fc(torch.relu(self.bn3(self.pw(x))).mean((2, 3)))


def _converted(original: nn.Module, side: int) -> tuple[nn.Module, torch.Tensor]:
    x = torch.randn(2, 3, side, side)
    return slimmable.convert(_randomise_bn(original), widths=(0.5, 1.0), example_input=x[:1]), x


def _family(name: str) -> tuple[nn.Module, torch.Tensor]:
    return _randomise_bn(slimmable.create_model(name, num_classes=10, small_input=True)), torch.randn(2, 3, 32, 32)


CASES: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    "tv_resnet18": lambda: _converted(torchvision.models.resnet18(num_classes=10), 32),
    "tv_mobilenet_v3_small": lambda: _converted(torchvision.models.mobilenet_v3_small(num_classes=10), 32),
    "concat": lambda: _converted(Concat(), 4),
    "grouped": lambda: _converted(Grouped(), 8),
    "slim_resnet18": lambda: _family("slim_resnet18"),
    "slim_mobilenet_v2": lambda: _family("slim_mobilenet_v2"),
    "us_mobilenet_v2": lambda: _family("us_mobilenet_v2"),
    "slim_vit_tiny": lambda: (
        slimmable.create_model("slim_vit_tiny", num_classes=10, img_size=32, patch_size=4),
        torch.randn(2, 3, 32, 32),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_widest_width_unchanged_and_exports_match(case: str) -> None:
    torch.manual_seed(0)
    model, x = CASES[case]()
    model.eval()
    with torch.no_grad():
        before = model(x)
    report = slimmable.sort_channels(model, example_input=x)
    assert report.groups and all(g.moved > 0 for g in report.groups), report.format()
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-4)
        narrow = model.widths[0]
        with model.use_width(narrow):
            torch.testing.assert_close(export_width(model, narrow, example=x)(x), model(x), atol=1e-5, rtol=1e-4)


def test_constraints_are_reported_and_kept_in_order() -> None:
    model, x = CASES["grouped"]()
    report = slimmable.sort_channels(model, example_input=x)
    left = {layer: why for layers, why in report.left for layer in layers}
    assert "grouped convolution g (4 groups)" in left["c1"] and "grouped convolution g" in left["g"]
    assert "model output" in left["fc"]
    assert [g.layers for g in report.groups] == [("pw",)]
    assert "kept in their order" in report.format()


class Tied(nn.Module):
    """Two convolutions sharing one weight: a permutation for one would reorder the other's."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3.weight = self.c2.weight
        self.c4 = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))
        return self.fc(torch.relu(self.c4(h)).mean((2, 3)))


def test_tied_weights_keep_their_order() -> None:
    model, x = _converted(Tied(), 8)
    with torch.no_grad():
        before = model(x)
    report = slimmable.sort_channels(model, example_input=x)
    left = {layer: why for layers, why in report.left for layer in layers}
    assert all("shares a tensor" in left[name] for name in ("c1", "c2", "c3"))
    assert [g.layers for g in report.groups] == [("c4",)]
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-4)


def test_vit_heads_and_mlp_units_sort_and_the_embedding_stream_is_reported() -> None:
    """The coupling analysis freezes the embedding stream (the positional embedding, attention), so it keeps its
    order; each block's MLP hidden units (fc1's rows, fc2's columns) sort, and each attention layer's heads as one
    group (tests/convert/test_sort_heads.py)."""
    torch.manual_seed(0)
    model, x = CASES["slim_vit_tiny"]()
    report = slimmable.sort_channels(model, example_input=x)
    channels = [g.layers for g in report.groups if g.unit == "channels"]
    assert sorted(channels) == sorted((f"blocks.{i}.mlp.fc1",) for i in range(12))
    heads = [g for g in report.groups if g.unit == "heads"]
    # random weights: a layer whose 3 heads are already in magnitude order is not permuted (1 in 6)
    assert len(heads) >= 6 and all(g.layers[0] in {f"blocks.{i}.attn" for i in range(12)} for g in heads)
    assert all(g.size == 3 and sorted(g.order) == [0, 1, 2] for g in heads)
    assert any("fixed channels" in why for _, why in report.left)


def test_sort_then_convert_equals_convert_then_sort_at_every_width() -> None:
    """Narrow switches restart from the permuted widest BN, and concatenated parts keep their offsets."""
    torch.manual_seed(0)
    original = _randomise_bn(Concat())
    x = torch.randn(2, 3, 4, 4)
    after = slimmable.convert(original, widths=(0.5, 1.0), example_input=x[:1], sort="magnitude").eval()
    plain = copy.deepcopy(original)
    slimmable.sort_channels(plain, example_input=x)
    before = slimmable.convert(plain, widths=(0.5, 1.0), example_input=x[:1]).eval()
    assert after.conversion_report.sort is not None and after.conversion_report.sort.groups
    assert "channels sorted by magnitude" in after.conversion_report.format()
    with torch.no_grad():
        for w in (0.5, 1.0):
            with after.use_width(w), before.use_width(w):
                torch.testing.assert_close(after(x), before(x), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(after(x), original(x), atol=1e-6, rtol=1e-5)
    bn = after.bn
    assert isinstance(bn, ConvertedBatchNorm2d)
    idx = bn._switch_index[0]
    torch.testing.assert_close(bn.switches[0].running_mean, bn.running_mean[idx])


def test_switchable_bn_narrow_switches_restart_from_the_widest() -> None:
    model, x = _family("slim_resnet18")
    slimmable.sort_channels(model, example_input=x)
    bn = model.get_submodule("features.1.body.1")
    assert isinstance(bn, SwitchableBatchNorm2d)
    full = bn.bn[len(bn.bn) - 1]
    for sw in list(bn.bn)[:-1]:
        c = sw.num_features
        torch.testing.assert_close(sw.weight, full.weight[:c])
        torch.testing.assert_close(sw.running_var, full.running_var[:c])


@pytest.mark.parametrize("seed", range(12))
def test_random_cnns_keep_their_output_sorted_before_or_after_conversion(seed: int) -> None:
    """The random user-style CNNs of test_random_cnns (channels-last permutes, views with -1, spatial sizes equal to
    channel counts): sorting the plain model, or converting with ``sort=``, leaves the output as it was."""
    from test_random_cnns import RandomCNN

    torch.manual_seed(seed)
    model = _randomise_bn(RandomCNN(seed))
    x = torch.randn(2, 3, model.side, model.side)
    with torch.no_grad():
        ref = model(x)
    slim = slimmable.convert(model, widths=(0.5, 1.0), example_input=x[:1], sort="magnitude").eval()
    assert slim.conversion_report.sort is not None and slim.conversion_report.sort.groups
    slimmable.sort_channels(model, example_input=x)
    with torch.no_grad():
        torch.testing.assert_close(slim(x), ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)
        with slim.use_width(0.5):
            torch.testing.assert_close(export_width(slim, 0.5)(x), slim(x), atol=1e-4, rtol=1e-4)


# -- planted importance ---------------------------------------------------------------------------------------------


class Planted(nn.Module):
    """A residual stream of 16 channels and a 32-channel layer; half of each is dead (zero weights, zero BN affine)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 32, 1)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        s = torch.relu(self.bn2(self.conv2(h)) + h)
        t = torch.relu(self.bn3(self.conv3(s)))
        return self.fc(t.mean((2, 3)))


def _strength(n: int, live: list[int], gen: torch.Generator) -> torch.Tensor:
    """Distinct strengths for the live channels (in a random order), zero for the dead ones."""
    f = torch.zeros(n)
    f[live] = torch.linspace(0.5, 2.0, len(live))[torch.randperm(len(live), generator=gen)]
    return f


@torch.no_grad()
def _planted() -> tuple[Planted, torch.Tensor, torch.Tensor]:
    """Every weight is ``sign * strength(out) * strength(in)``: each layer's L1 per channel, and the BN scale, rank
    the channels as their strengths do."""
    gen = torch.Generator().manual_seed(0)
    model = Planted()
    fs = _strength(16, [1, 2, 4, 7, 9, 10, 12, 15], gen)
    ft = _strength(32, [0, 3, 5, 6, 8, 11, 13, 17, 18, 20, 22, 25, 27, 28, 29, 31], gen)
    ones = torch.ones(3)

    def plant(w: torch.Tensor, f_out: torch.Tensor, f_in: torch.Tensor) -> None:
        sign = torch.randint(0, 2, w.shape, generator=gen).float() * 2 - 1
        w.copy_(sign * f_out.view(-1, *[1] * (w.dim() - 1)) * f_in.view(1, -1, *[1] * (w.dim() - 2)))

    plant(model.conv1.weight, fs, ones)
    plant(model.conv2.weight, fs, fs)
    plant(model.conv3.weight, ft, fs)
    plant(model.fc.weight, torch.ones(5), ft)
    for conv, f in ((model.conv1, fs), (model.conv2, fs), (model.conv3, ft)):
        conv.bias.copy_(0.1 * f)
    for bn, f in ((model.bn1, fs), (model.bn2, fs), (model.bn3, ft)):
        bn.weight.copy_(f)
        bn.bias.copy_(0.1 * f)
        bn.running_mean.normal_(0, 0.2, generator=gen)
        bn.running_var.uniform_(0.5, 2.0, generator=gen)
    return model.eval(), fs, ft


def _data(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 5, (8,), generator=gen)) for _ in range(n)]


@pytest.mark.parametrize("importance", ["magnitude", "bn", "taylor"])
def test_planted_importance_puts_dead_channels_last(importance: str) -> None:
    original, fs, ft = _planted()
    x = torch.randn(2, 3, 8, 8)
    model = slimmable.convert(original, widths=(0.5, 1.0), example_input=x[:1]).eval()
    with torch.no_grad(), model.use_width(0.5):
        assert (model(x) - original(x)).abs().max() > 1e-2  # unsorted, the narrow width loses live channels
    report = slimmable.sort_channels(model, importance, data=_data() if importance == "taylor" else None)
    orders = {g.layers[0]: list(g.order) for g in report.groups}
    for layers, f in ((("conv2", "conv1"), fs), (("conv3",), ft)):
        order = next(orders[name] for name in layers if name in orders)
        live = int((f > 0).sum())
        assert set(order[:live]) == set(torch.nonzero(f).flatten().tolist())  # the dead channels go last
        if importance != "taylor":  # weights and BN scales were planted to rank as the strengths do
            assert order == torch.argsort(f, descending=True, stable=True).tolist()
    assert {name for g in report.groups for name in g.layers} == {"conv1", "conv2", "conv3"}
    with torch.no_grad():
        full = model(x)
        torch.testing.assert_close(full, original(x), atol=1e-5, rtol=1e-5)
        with model.use_width(0.5):  # the live channels fit in the narrow width: it computes the full model
            torch.testing.assert_close(model(x), full, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(export_width(model, 0.5, example=x)(x), full, atol=1e-5, rtol=1e-5)


def test_taylor_needs_data_and_criteria_are_checked() -> None:
    model, _, _ = _planted()
    with pytest.raises(ValueError, match="needs data"):
        slimmable.sort_channels(model, "taylor")
    with pytest.raises(ValueError, match="sort_data"):
        slimmable.convert(model, widths=(0.5, 1.0), sort="taylor")
    with pytest.raises(ValueError, match="importance 'l2' is not one of"):
        slimmable.sort_channels(model, "l2")
    with pytest.raises(ValueError, match=r"\(inputs, targets\)"):
        slimmable.sort_channels(model, "taylor", data=[torch.randn(2, 3, 8, 8)])


def test_a_changed_output_restores_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = CASES["concat"]()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    real = sort_module._write_back

    def broken(model: nn.Module, twin: nn.Module, changed: set[str]) -> None:
        real(model, twin, changed)
        with torch.no_grad():
            model.head.weight.add_(1.0)  # a permutation that missed a consumer

    monkeypatch.setattr(sort_module, "_write_back", broken)
    with pytest.raises(RuntimeError, match="restored unsorted"):
        slimmable.sort_channels(model, example_input=x)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_timm_mobilenetv3_keeps_its_widest_width_under_bn() -> None:
    pytest.importorskip("timm", reason="timm is not installed: pip install 'slimmable[timm]'")
    model, x, before = _timm("mobilenetv3_small_050")
    report = slimmable.sort_channels(model, "bn", example_input=x)
    assert len(report.groups) > 10
    fallback = [g.layers for g in report.groups if g.criterion != "bn"]
    # SE reductions and the head convolution have no BN after them
    assert fallback and all(layers[0].endswith(("se.conv_reduce", "conv_head")) for layers in fallback)
    assert {g.criterion for g in report.groups} == {"bn", "magnitude (no norm layer)"}
    _check_timm(model, x, before)


def test_timm_rexnet_channel_ranges_are_followed() -> None:
    """ReXNet's partial residual (``x[:, :c]``) is a converted channel range: its groups sort, the output holds."""
    pytest.importorskip("timm", reason="timm is not installed: pip install 'slimmable[timm]'")
    model, x, before = _timm("rexnet_100")
    report = slimmable.sort_channels(model, example_input=x)
    assert len(report.groups) > 20, report.format()
    _check_timm(model, x, before)


def _timm(arch: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = _randomise_bn(slimmable.create_model(f"timm/{arch}", widths=(0.5, 1.0), num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return model, x, model(x)


def _check_timm(model: nn.Module, x: torch.Tensor, before: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-4)
        with model.use_width(0.5):
            torch.testing.assert_close(export_width(model, 0.5, example=x)(x), model(x), atol=1e-5, rtol=1e-4)
