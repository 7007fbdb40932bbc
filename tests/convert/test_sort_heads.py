"""``sort_channels`` on attention heads: each attention layer's heads sort as one group (q, k and v rows, output
projection columns, Swin's relative position bias columns; grouped key/value heads with their query heads) on our ViT
and on converted torchvision/timm ViT and Swin. The widest width computes the same; planted dead heads (and MLP units)
go last, after which the narrow width that keeps exactly the live ones computes the full model; Taylor scores equal
the gradient of a head mask computed by a separate attention; exports match."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimmable
from slimmable.convert import sort as sort_module
from slimmable.export import export_width
from slimmable.nn import SelfAttention, SlimMultiheadAttention

timm = pytest.importorskip("timm", reason="timm is not installed: pip install 'slimmable[timm]'")

from test_transformers import MODELS, _randomise  # noqa: E402

WIDTHS = (0.5, 1.0)


def _native(**kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        kw = {"num_classes": 10, "img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 4}
        return slimmable.create_model("slim_vit_tiny", widths=WIDTHS, **(kw | kwargs)).eval()

    return build


def _converted(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        original = _randomise(MODELS[name]())
        return slimmable.convert(original, widths=WIDTHS, example_input=torch.randn(1, 3, 32, 32)).eval()

    return build


CASES: dict[str, Callable[[], nn.Module]] = {
    "slim_vit": _native(),
    "slim_vit_gqa": _native(num_kv_heads=2),
    "slim_vit_embed": _native(slim_embed=True),
    **{name: _converted(name) for name in MODELS},
}
#: cases whose narrow width slims only heads and MLP units (not the residual stream)
PLANTABLE = [c for c in CASES if c != "slim_vit_embed"]


def _attention(model: nn.Module) -> dict[str, SlimMultiheadAttention]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SlimMultiheadAttention)}


def _mlps(model: nn.Module) -> list[tuple[nn.Linear, nn.Linear]]:
    """``(fc1, fc2)`` of every transformer MLP (timm's ``fc1``/``fc2``, torchvision's ``0``/``3``)."""
    out = []
    for name, m in model.named_modules():
        if name.endswith("mlp"):
            linears = [c for c in m.children() if isinstance(c, nn.Linear)]
            out.append((linears[0], linears[-1]))
    return out


@torch.no_grad()
def _scale_heads(layer: SlimMultiheadAttention, f: torch.Tensor, kinds: tuple[str, ...]) -> None:
    """Multiply the entries of key/value head group ``j`` by ``f[j]`` in every per-head tensor of those kinds."""
    g = layer.num_kv_heads
    for ht in layer.head_tensors():
        if ht.kind in kinds:
            for block, unit in zip(ht.tensor.split([g * u for u in ht.units], ht.dim), ht.units):
                shape = [1] * ht.tensor.dim()
                shape[ht.dim] = g * unit
                block.mul_(f.repeat_interleave(unit).view(shape))


@torch.no_grad()
def _plant(model: nn.Module) -> dict[str, list[int]]:
    """Kill key/value head groups 0 and 2 of every layer (group 0 of a two-group layer) and every second MLP
    unit; the live groups get strengths rising with their index. Returns the expected magnitude order per layer
    (strongest first, the dead last in their order)."""
    expected = {}
    for path, layer in _attention(model).items():
        g = layer.num_kv_heads
        f = torch.arange(g, dtype=torch.float32) + 1.0
        dead = [0, 2] if g >= 4 else [0]
        f[dead] = 0.0
        _scale_heads(layer, f, ("qkv", "proj", "other"))
        expected[path] = torch.argsort(f, descending=True, stable=True).tolist()
    for fc1, fc2 in _mlps(model):
        dead = torch.arange(1, fc1.out_features, 2)
        fc1.weight[dead] = 0.0
        fc1.bias[dead] = 0.0
        fc2.weight[:, dead] = 0.0
    return expected


def _x(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)) for _ in range(2)]


@pytest.mark.parametrize("case", list(CASES))
def test_heads_sort_the_widest_width_is_unchanged_and_exports_match(case: str) -> None:
    model = CASES[case]()
    layers = _attention(model)
    with torch.no_grad():  # the weights of head group i scaled by 4**i: magnitude reverses every layer's order
        for layer in layers.values():
            _scale_heads(layer, 4.0 ** torch.arange(layer.num_kv_heads, dtype=torch.float32), ("qkv", "proj"))
    x = _x()
    with torch.no_grad():
        before = model(x)
    report = slimmable.sort_channels(model, example_input=x)
    heads = {g.layers: g for g in report.groups if g.unit == "heads"}
    assert set(heads) == {(path,) for path in layers}, report.format()
    for path, layer in layers.items():
        g = heads[(path,)]
        assert g.size == layer.num_kv_heads and g.criterion == "magnitude"
        assert list(g.order) == list(range(layer.num_kv_heads))[::-1]
    assert any(g.unit == "channels" for g in report.groups)  # the MLP units sort as before
    assert "heads moved (magnitude)" in report.format()
    assert "the residual stream read and written by attention layers keeps its order" in report.notes
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-4)
        with model.use_width(0.5):
            torch.testing.assert_close(export_width(model, 0.5, example=x[:1])(x), model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", PLANTABLE)
@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_planted_dead_heads_go_last_and_the_narrow_width_keeps_the_live_ones(case: str, importance: str) -> None:
    model = CASES[case]()
    expected = _plant(model)
    x = _x()
    with torch.no_grad():
        full = model(x)
        with model.use_width(0.5):  # unsorted, the narrow width keeps dead heads and units, loses live ones
            assert (model(x) - full).abs().max() > 1e-3
    data = _data() if importance == "taylor" else None
    report = slimmable.sort_channels(model, importance, data=data, example_input=x)
    orders = {g.layers[0]: list(g.order) for g in report.groups if g.unit == "heads"}
    for path, order in expected.items():
        live = len(order) // 2 if len(order) >= 4 else len(order) - 1
        got = orders.get(path, list(range(len(order))))
        assert set(got[:live]) == set(order[:live]), (path, got)  # dead groups last
        if importance == "magnitude":
            assert got == order, path
    with torch.no_grad():
        torch.testing.assert_close(model(x), full, atol=1e-5, rtol=1e-4)
        with model.use_width(0.5):  # exactly the live heads and units: the full model's function
            torch.testing.assert_close(model(x), full, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(export_width(model, 0.5, example=x[:1])(x), full, atol=1e-5, rtol=1e-4)


class OneAttention(nn.Module):
    """Tokens through one attention layer, averaged, classified."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = SelfAttention(16, 4)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x).mean(1))


def _masked(model: OneAttention, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``model`` with each head's output (before the output projection) multiplied by ``mask``, written apart from
    the library's attention."""
    a, (n, length, c) = model.attn, x.shape
    q, k, v = (t.view(n, length, 4, 4).transpose(1, 2) for t in a.qkv(x).split(c, dim=-1))
    att = torch.softmax(q @ k.transpose(-1, -2) * a.scale, dim=-1)
    ctx = (att @ v) * mask.view(1, 4, 1, 1)
    return model.head(a.proj(ctx.transpose(1, 2).reshape(n, length, c)).mean(1))


def test_taylor_head_scores_are_the_gradient_of_a_head_mask() -> None:
    torch.manual_seed(0)
    model = OneAttention().eval()
    gen = torch.Generator().manual_seed(2)
    data = [(torch.randn(3, 6, 16, generator=gen), torch.randint(0, 5, (3,), generator=gen)) for _ in range(2)]
    want = torch.zeros(4, dtype=torch.float64)
    for x, y in data:
        mask = torch.ones(4, requires_grad=True)
        out = _masked(model, x, mask)
        torch.testing.assert_close(out, model(x))
        (grad,) = torch.autograd.grad(F.cross_entropy(out, y), mask)
        want += grad.abs().double()
    plan = sort_module._Plan.build(sort_module._twin(model, None, data[0][0]), data[0][0])
    scores, criteria = sort_module._importance(plan, "taylor", data, None, None)
    (root,) = plan.heads
    assert criteria[root] == "taylor"
    torch.testing.assert_close(scores[root], want, atol=1e-7, rtol=1e-4)
    report = slimmable.sort_channels(model, "taylor", data=data, example_input=data[0][0])
    orders = {g.layers: list(g.order) for g in report.groups if g.unit == "heads"}
    assert orders.get(("attn",), [0, 1, 2, 3]) == torch.argsort(want, descending=True, stable=True).tolist()


def test_bn_falls_back_to_magnitude_for_heads_and_says_so() -> None:
    model = CASES["timm_vit"]()
    _plant(model)
    report = slimmable.sort_channels(model, "bn", example_input=_x())
    criteria = {g.criterion for g in report.groups if g.unit == "heads"}
    assert criteria == {"magnitude (heads have no norm layer)"}, report.format()


@pytest.mark.parametrize("name", list(MODELS))
def test_plain_models_sort_their_heads_before_conversion(name: str) -> None:
    """A model not converted: its attention (``nn.MultiheadAttention``, torchvision's Swin attention, timm's
    ``Attention`` and ``WindowAttention``) is read through the slimmable layer conversion makes of it, sharing its
    tensors; the heads sorted are those of the layers conversion slims."""
    original = _randomise(MODELS[name]())
    layers = _attention(slimmable.convert(original, widths=WIDTHS, example_input=torch.randn(1, 3, 32, 32)))
    x = _x()
    with torch.no_grad():
        before = original(x)
    report = slimmable.sort_channels(original, example_input=x)
    heads = {g.layers[0] for g in report.groups if g.unit == "heads"}
    assert heads and heads <= set(layers), report.format()
    with torch.no_grad():
        torch.testing.assert_close(original(x), before, atol=1e-5, rtol=1e-4)


def test_attention_the_converter_refuses_keeps_its_head_order() -> None:
    class UsesWeights(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
            self.fc = nn.Linear(16, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y, w = self.attn(x, x, x, average_attn_weights=False)  # per-head weights: positions mean heads
            return self.fc(y.mean(1)) + w[:, 0].mean()

    torch.manual_seed(0)
    model = UsesWeights().eval()
    report = slimmable.sort_channels(model, example_input=torch.randn(2, 6, 16))
    assert not [g for g in report.groups if g.unit == "heads"]
    left = {layer: why for layers, why in report.left for layer in layers}
    assert "is called in a way the converter does not convert: heads keep their order" in left["attn"]


def test_convert_with_sort_sorts_the_heads() -> None:
    original = _randomise(MODELS["timm_vit"]())
    x = _x()
    model = slimmable.convert(original, widths=WIDTHS, example_input=x[:1], sort="magnitude").eval()
    sort = model.conversion_report.sort
    assert sort is not None and {g.layers for g in sort.groups if g.unit == "heads"} <= {
        ("blocks.0.attn",),
        ("blocks.1.attn",),
    }
    assert [g for g in sort.groups if g.unit == "heads"], sort.format()
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), atol=1e-5, rtol=1e-4)
        with model.use_width(0.5):
            torch.testing.assert_close(export_width(model, 0.5, example=x[:1])(x), model(x), atol=1e-5, rtol=1e-4)
