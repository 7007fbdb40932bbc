"""Vision transformers converted: torchvision's ViT and Swin, timm's ViT/DeiT and Swin. Attention heads and MLP
hidden units slim (each head keeps its size and scale), the residual stream keeps its width and the report says so;
width 1.0 equals the original; ``export_width`` gives the library's own attention class with ``num_heads`` updated
(timm) or a plain attention module (torchvision, whose classes tie ``head_dim`` to ``dim // num_heads``), equal to
the converted model at that width; MACs at 0.5 are at most 0.6x those at 1.0. Small configurations, random weights;
full-size models are marked slow."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttention, SwinTransformer, SwinTransformerBlockV2
from torchvision.models.vision_transformer import VisionTransformer

import slimmable
from slimmable.convert._coupling import KEPT_STREAM
from slimmable.export import export_width, is_dense
from slimmable.nn import SlimMultiheadAttention
from slimmable.nn.converted_attention import MultiheadSelfAttention, ShiftedWindowSelfAttention
from slimmable.search.cost import count_macs

timm = pytest.importorskip("timm", reason="timm is not installed: pip install 'slimmable[timm]'")

WIDTHS = (0.25, 0.5, 0.75, 1.0)


def _randomise(model: nn.Module) -> nn.Module:
    """Random relative position biases, LayerNorm affines and zero-initialised layers (torchvision's ViT head), so
    that slicing them matters."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name or "cls_token" in name or "pos_embed" in name:
                p.normal_(0, 0.5, generator=gen)
        for m in model.modules():
            if isinstance(m, nn.Linear) and not m.weight.any():
                m.weight.normal_(0, 0.05, generator=gen)
            if isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.2, generator=gen)
    return model.eval()


def tv_vit() -> nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128)


def tv_swin() -> nn.Module:
    torch.manual_seed(0)
    return SwinTransformer([4, 4], 32, [2, 2], [2, 4], [4, 4], stochastic_depth_prob=0.0, num_classes=10)


def timm_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10
    )


def timm_swin() -> nn.Module:
    torch.manual_seed(0)
    return timm.models.swin_transformer.SwinTransformer(
        img_size=32, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=10
    )


MODELS = {"tv_vit": tv_vit, "tv_swin": tv_swin, "timm_vit": timm_vit, "timm_swin": timm_swin}
#: attention class of the export at width 0.5, per model
DENSE_ATTENTION = {
    "tv_vit": MultiheadSelfAttention,
    "tv_swin": ShiftedWindowSelfAttention,
    "timm_vit": timm.layers.Attention,
    "timm_swin": timm.models.swin_transformer.WindowAttention,
}


ORIGINAL_ATTENTION = (
    nn.MultiheadAttention, ShiftedWindowAttention, timm.layers.Attention, timm.models.swin_transformer.WindowAttention
)  # fmt: skip


def _attention(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if type(m) in ORIGINAL_ATTENTION}


@pytest.fixture(scope="module")
def converted() -> dict[str, tuple[nn.Module, nn.Module]]:
    out = {}
    for name, build in MODELS.items():
        original = _randomise(build())
        out[name] = (original, slimmable.convert(original, widths=WIDTHS, example_input=torch.randn(1, 3, 32, 32)))
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_width_one_equals_the_original_and_its_state_dict_loads(converted, name: str) -> None:
    original, model = converted[name]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), original(x), atol=1e-5, rtol=1e-5)
    model.load_state_dict(original.state_dict(), strict=True)
    heads = [m for m in model.modules() if isinstance(m, SlimMultiheadAttention)]
    assert len(heads) == len(_attention(original)) > 0  # every attention layer converted


@pytest.mark.parametrize("name", list(MODELS))
def test_export_at_half_width_has_fewer_heads_and_equal_outputs(converted, name: str) -> None:
    original, model = converted[name]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), model.use_width(0.5):
        y = model.eval()(x)
        dense = export_width(model, 0.5, example=x[:1])
    assert is_dense(dense)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), y, atol=1e-5, rtol=1e-4)
    full = {n: m.num_heads for n, m in _attention(original).items()}
    got = {n: m.num_heads for n, m in dense.named_modules() if isinstance(m, DENSE_ATTENTION[name])}
    assert set(got) == set(full)
    assert all(type(dense.get_submodule(n)) is DENSE_ATTENTION[name] for n in got)
    # the project's rounding: half the heads, at least one
    assert got == {n: max(1, h // 2) for n, h in full.items()}
    assert not torch.equal(y, original(x))  # narrower really differs


@pytest.mark.parametrize("name", list(MODELS))
def test_macs_at_half_width_at_most_six_tenths_and_the_report_names_what_is_kept(converted, name: str) -> None:
    _, model = converted[name]
    x = torch.randn(1, 3, 32, 32)
    macs = {}
    for w in (0.25, 0.5, 1.0):
        with model.use_width(w):
            macs[w] = count_macs(model, x)
    assert macs[0.25] < macs[0.5] <= 0.6 * macs[1.0], macs
    report = model.conversion_report
    assert report.attention and all(a.channels[-1] == a.size for a in report.attention)
    assert report.kept_groups and all(why == KEPT_STREAM for _, why in report.kept_groups)
    assert report.groups  # the MLP hidden units
    # what stays frozen besides the stream: only the classifier (the model's output)
    assert [why for _, why in report.frozen_groups] == ["model output (keeps the original's shape)"]
    text = report.format()
    assert "attention heads slimmed" in text and "kept at full width" in text


def _vit_macs(tokens: int, patches: int, patch: int, dim: int, heads: int, head_dim: int, hidden: int) -> int:
    """Multiply-accumulates of the small torchvision ViT above: patch projection, per block q/k/v, the two attention
    products, the output projection and the MLP, then the classifier (1000 classes)."""
    block = tokens * dim * 3 * heads * head_dim + 2 * heads * tokens * tokens * head_dim
    block += tokens * heads * head_dim * dim + 2 * tokens * dim * hidden
    return patches * 3 * patch * patch * dim + 2 * block + dim * 1000


def test_macs_count_attention_by_formula(converted) -> None:
    _, model = converted["tv_vit"]
    x = torch.randn(1, 3, 32, 32)
    mlp = model.conversion_report.groups[0].channels  # hidden units per width
    for i, w in enumerate(WIDTHS):
        with model.use_width(w):
            heads = model.encoder.layers.encoder_layer_0.self_attention.active_heads
            assert count_macs(model, x) == _vit_macs(17, 16, 8, 64, heads, 16, mlp[i])


def test_onnx_export_of_a_converted_vit_at_half_width_runs_in_onnxruntime(converted, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from slimmable.export import export_onnx

    _, model = converted["timm_vit"]
    res = export_onnx(model, tmp_path / "vit.onnx", width=0.5, input_size=32, exporter="torchscript")
    assert res.max_abs_diff is not None and res.max_abs_diff < 1e-4


def test_swin_v2_attention_is_frozen_with_its_reason() -> None:
    torch.manual_seed(0)
    model = SwinTransformer([4, 4], 32, [2], [2], [4, 4], block=SwinTransformerBlockV2).eval()
    slim = slimmable.convert(model, example_input=torch.randn(1, 3, 32, 32))
    whys = [why for _, why in slim.conversion_report.frozen_groups]
    assert any("Swin v2 attention" in why for why in whys), whys
    assert not any(isinstance(m, SlimMultiheadAttention) for m in slim.modules())
    with torch.no_grad():
        x = torch.randn(1, 3, 32, 32)
        torch.testing.assert_close(slim(x), model(x))


def test_default_example_is_the_size_the_model_names() -> None:
    """torchvision's ViT built for 48 px, timm's for 48 px: converted without an example input."""
    torch.manual_seed(0)
    tv = VisionTransformer(image_size=48, patch_size=16, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64)
    tm = timm.models.vision_transformer.VisionTransformer(
        img_size=48, patch_size=16, embed_dim=32, depth=1, num_heads=2
    )
    for model in (tv, tm):
        slim = slimmable.convert(model.eval())
        assert slim.example_input_size == (3, 48, 48)


def test_a_refused_example_names_the_check_with_its_values() -> None:
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64)
    with pytest.raises(ValueError, match=r"refuses the example input of shape \(1, 3, 64, 64\).*got 64"):
        slimmable.convert(model.eval(), example_input=torch.randn(1, 3, 64, 64))


class _Branchy(nn.Module):
    """Python control flow on sizes: an assertion and a padding decided by the input's width."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == 3, "three channels"
        if x.shape[-1] % 2:
            x = F.pad(x, (0, 1))
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_conditions_on_sizes_follow_the_example_and_guard_other_inputs() -> None:
    model = _Branchy().eval()
    slim = slimmable.convert(model, widths=(0.5, 1.0), example_input=torch.randn(1, 3, 15, 15))
    assert not slim.conversion_report.untraced  # traced through, not a frozen leaf
    x = torch.randn(2, 3, 15, 15)
    with torch.no_grad():
        torch.testing.assert_close(slim(x), model(x))
        with slim.use_width(0.5):
            torch.testing.assert_close(export_width(slim, 0.5, example=x[:1])(x), slim(x))
    assert slim.conversion_report.groups  # the convolution slims
    with pytest.raises(ValueError, match="another branch"):
        slim(torch.randn(1, 3, 16, 16))


def test_an_unconverted_call_freezes_with_a_reason() -> None:
    """Attention weights used downstream: the layer stays as it was and the report says why."""

    class UsesWeights(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y, w = self.attn(x, x, x)
            return y + w.mean()

    model = UsesWeights().eval()
    slim = slimmable.convert(copy.deepcopy(model), example_input=torch.randn(1, 5, 16))
    assert type(slim.attn) is nn.MultiheadAttention
    assert any("attention weights are used" in why for _, why in slim.conversion_report.frozen_ops)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "size"),
    [("torchvision/vit_b_16", 64), ("torchvision/swin_t", 64), ("timm/deit_tiny_patch16_224", 64),
     ("timm/vit_small_patch16_224", 64), ("timm/swin_tiny_patch4_window7_224", 64)],
)  # fmt: skip
def test_full_size_transformers_convert(name: str, size: int) -> None:
    arch = name.split("/", 1)[1]
    torch.manual_seed(0)
    if name.startswith("torchvision/"):
        import torchvision

        kwargs = {"image_size": size} if arch.startswith("vit") else {}
        original = torchvision.models.get_model(arch, weights=None, **kwargs)
    else:
        original = timm.create_model(arch, pretrained=False, img_size=size)
    original = _randomise(original)
    x = torch.randn(1, 3, size, size)
    model = slimmable.convert(original, widths=WIDTHS, example_input=x).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), atol=1e-4, rtol=1e-4)
        with model.use_width(0.5):
            torch.testing.assert_close(export_width(model, 0.5, example=x)(x), model(x), atol=1e-4, rtol=1e-4)
    macs = {}
    for w in (0.5, 1.0):
        with model.use_width(w):
            macs[w] = count_macs(model, x)
    assert macs[0.5] <= 0.6 * macs[1.0]
