"""The slimmable ViT family: registered, equal to timm's DeiT at full width, every width equal to its dense export
(fewer heads), MACs per width equal to flop_counter's count, ONNX, Algorithm 1, features, clear width errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import slimmable
from slimmable.cli.main import main
from slimmable.export import export_width, is_dense
from slimmable.models.vit import SlimVisionTransformer, timm_state_dict
from slimmable.nn import SelfAttention, SlimModule
from slimmable.search import count_active_params, count_macs, profile_widths
from slimmable.train import train_step


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _small(depth: int = 2, **kwargs) -> SlimVisionTransformer:
    """A shallow Fashion-MNIST-sized ViT-Tiny (the blocks are all alike; depth only multiplies time)."""
    kwargs = {"num_classes": 10, "in_chans": 1, "small_input": True, "depth": depth, **kwargs}
    return slimmable.create_model("slim_vit_tiny", **kwargs).eval()


def _x(n: int = 2, side: int = 28, chans: int = 1) -> torch.Tensor:
    return torch.randn(n, chans, side, side, generator=torch.Generator().manual_seed(3))


def _perturb(model: nn.Module) -> nn.Module:
    """Non-trivial LayerNorm affines and biases (they start at 1 and 0), so every slice matters."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def test_registered_with_their_widths_and_listed(capsys) -> None:
    assert {"slim_vit_tiny", "slim_vit_small"} <= set(slimmable.list_models(task="classification"))
    tiny = slimmable.create_model("slim_vit_tiny")
    assert tiny.widths == (0.333333, 0.666667, 1.0)  # DeiT-Ti's 3 heads: 1, 2, 3 of them
    assert {b.attn.head_rule.channels for b in tiny.blocks} == {(1, 2, 3)}
    assert tiny.model_name == "slim_vit_tiny" and tiny.model_kwargs == {}
    assert tiny.patch_embed.grid == (14, 14) and tiny.blocks[0].attn.head_dim == 64
    small_input = slimmable.create_model("slim_vit_tiny", small_input=True)
    assert small_input.widths == (0.25, 0.5, 0.75, 1.0)  # 4 heads of 48 on 28-px images, patch 4
    assert small_input.patch_embed.grid == (7, 7) and small_input.blocks[0].attn.num_heads == 4
    small = slimmable.create_model("slim_vit_small")
    assert small.embed_dim == 384 and small.blocks[0].attn.head_rule.channels == (2, 4, 6)
    assert main(["list", "slim_vit*"]) == 0
    out = capsys.readouterr().out
    assert "slim_vit_tiny" in out and "SlimVisionTransformer" in out and "0.333333, 0.666667, 1" in out


def test_full_width_equals_timm_deit() -> None:
    timm = pytest.importorskip("timm")
    ref = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=4)
    model = slimmable.create_model("slim_vit_tiny", num_classes=10, img_size=32, patch_size=4, depth=12)
    ref = _perturb(ref).eval()
    model.load_state_dict(timm_state_dict(ref.state_dict()))
    model.eval()
    x = _x(2, 32, 3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
        # timm's forward_features ends with the final norm; ours stops at the last block's tokens
        torch.testing.assert_close(model.norm(model.forward_features(x)), ref.forward_features(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("slim_embed", [False, True])
def test_every_width_equals_its_dense_export_with_fewer_heads(slim_embed: bool) -> None:
    model = _perturb(_small(slim_embed=slim_embed, num_kv_heads=None))
    x = _x()
    for w in model.widths:
        dense = export_width(model, w)
        assert is_dense(dense) and not any(isinstance(m, SlimModule) for m in dense.modules())
        heads = round(4 * w)
        dim = 48 * heads if slim_embed else 192
        for block in dense.blocks:
            assert type(block.attn) is SelfAttention and block.attn.num_heads == heads
            assert (block.attn.qkv.in_features, block.attn.qkv.out_features) == (dim, 3 * 48 * heads)
            assert type(block.mlp.fc1) is nn.Linear and block.mlp.fc1.out_features == 768 * heads // 4
            assert type(block.norm1) is nn.LayerNorm and block.norm1.normalized_shape == (dim,)
        assert dense.patch_embed.pos_embed.shape == (1, 50, dim) and dense.head.in_features == dim
        with torch.no_grad(), model.use_width(w):
            ref = model(x)
            torch.testing.assert_close(dense(x), ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(dense(x[:1]), model(x[:1]), atol=1e-5, rtol=1e-5)
        n_dense = sum(p.numel() for p in dense.parameters())
        with model.use_width(w):
            assert count_active_params(model, x) == n_dense


def test_grouped_key_value_heads_slim_in_whole_groups() -> None:
    model = _perturb(_small(num_heads=8, num_kv_heads=2, widths=(0.5, 1.0)))
    x = _x()
    for w, heads in ((0.5, 4), (1.0, 8)):
        dense = export_width(model, w)
        assert (dense.blocks[0].attn.num_heads, dense.blocks[0].attn.num_kv_heads) == (heads, heads // 4)
        with torch.no_grad(), model.use_width(w):
            torch.testing.assert_close(dense(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("slim_embed", [False, True])
def test_macs_per_width_equal_flop_counter_on_the_dense_export(slim_embed: bool) -> None:
    model = _small(depth=12, slim_embed=slim_embed)
    x = _x(1)
    macs = {}
    for w in model.widths:
        dense = export_width(model, w)
        with model.use_width(w):
            macs[w] = count_macs(model, x)
        # torch's own counter on the dense model, with attention as plain matrix products (the math kernel)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            dense(x)
        assert macs[w] == counter.get_total_flops() // 2 == count_macs(dense, x)
        # by layer: the patch convolution, each block's attention (its own formula) and MLP, the classifier
        c, h = (48 * round(4 * w), round(4 * w)) if slim_embed else (192, round(4 * w))
        attn = model.blocks[0].attn
        with model.use_width(w):
            per_block = attn.macs(50, c) + 2 * 50 * c * 192 * h
        assert macs[w] == 49 * 16 * c + 12 * per_block + c * 10
    half, full = macs[0.5], macs[1.0]
    if slim_embed:  # every linear layer a quarter, attention's products half
        assert 0.25 < half / full < 0.27
    else:  # the patch embedding and the classifier stay
        assert 0.5 < half / full < 0.51


def test_onnx_export_of_a_narrow_width_runs_in_onnxruntime(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from slimmable.export import export_onnx
    from slimmable.export.formats import load_onnx

    model = _perturb(_small(slim_embed=True))
    res = export_onnx(model, tmp_path / "vit.onnx", width=0.5, input_size=28, exporter="torchscript")
    run = load_onnx(res.path)
    for n in (1, 3):
        x = _x(n)
        with torch.no_grad(), model.use_width(0.5):
            torch.testing.assert_close(run(x), model(x), atol=1e-4, rtol=0)


def test_algorithm_1_training_step_is_finite_and_moves_every_width() -> None:
    torch.manual_seed(0)
    model = _small(slim_embed=True).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _x(8), torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = train_step(model, opt, x, y, sorted(model.widths, reverse=True))
    assert res.widths == [1.0, 0.75, 0.5, 0.25] and torch.isfinite(res.losses).all()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == set(before)  # every tensor is used by the full width
    # the same batch again: the step lowered the loss of the widths together
    second = train_step(model, opt, x, y, sorted(model.widths, reverse=True))
    assert second.losses.mean() < res.losses.mean()


def test_features_only_returns_tokens_of_the_chosen_blocks() -> None:
    model = slimmable.create_model(
        "slim_vit_tiny", small_input=True, in_chans=1, depth=4, features_only=True, out_indices=(1, 3)
    ).eval()
    assert [f.name for f in model.out_feature_info] == ["blocks.1", "blocks.3"]
    assert isinstance(model.norm, nn.Identity) and isinstance(model.head, nn.Identity)
    assert model.dropped_layers() == ["norm", "head"]
    with torch.no_grad(), model.use_width(0.5):
        out = model(_x())
    assert list(out) == ["blocks.1", "blocks.3"] and all(t.shape == (2, 50, 192) for t in out.values())
    embed = slimmable.create_model("slim_vit_tiny", small_input=True, in_chans=1, depth=2, slim_embed=True)
    assert embed.feature_channels(0.5) == [96, 96]


def test_bad_widths_are_one_clear_line() -> None:
    with pytest.raises(ValueError, match="width 1.5 needs 5 attention heads but the model has 3") as err:
        slimmable.create_model("slim_vit_tiny", widths=(0.5, 1.5))
    assert "\n" not in str(err.value)
    model = slimmable.create_model("slim_vit_tiny", depth=1)
    with pytest.raises(ValueError, match=r"width 0.5 not in widths \(0.333333, 0.666667, 1\)") as err:
        model.set_width(0.5)
    assert "\n" not in str(err.value)
    # 0.5 and 0.25 are widths a 3-head model can be built with: 2 heads and 1 (the nearest, at least one)
    built = slimmable.create_model("slim_vit_tiny", widths=(0.25, 0.5, 1.0), depth=1)
    assert built.blocks[0].attn.head_rule.channels == (1, 2, 3)
    with pytest.raises(ValueError, match="embed_dim 192 must be divisible by num_heads 5"):
        slimmable.create_model("slim_vit_tiny", num_heads=5)
    with pytest.raises(NotImplementedError, match="AutoSlim"):
        model.channel_groups()


def test_profile_counts_every_width_and_restores_it() -> None:
    model = _small(depth=2)
    model.set_width(0.5)
    profs = profile_widths(model, 28, latency_runs=0)
    assert [p.width for p in profs] == [0.25, 0.5, 0.75, 1.0] and model.width == 0.5
    macs = [p.macs for p in profs]
    assert macs == sorted(macs) and macs[0] < 0.3 * macs[-1]


def test_checkpoint_round_trip_rebuilds_the_model(tmp_path) -> None:
    from slimmable.checkpoint import load_model, model_checkpoint, save_checkpoint

    model = _perturb(_small(slim_embed=True))
    save_checkpoint(tmp_path / "vit.pt", model_checkpoint(model))
    loaded = load_model(tmp_path / "vit.pt").model.eval()
    assert type(loaded) is SlimVisionTransformer and loaded.widths == model.widths
    x = _x()
    with torch.no_grad(), model.use_width(0.25), loaded.use_width(0.25):
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_channel_plan_builds_head_rules_and_takes_a_norm_factory() -> None:
    from slimmable.models import ChannelPlan
    from slimmable.models.vit import layer_norm
    from slimmable.nn import SlimLayerNorm, head_count, make_divisible

    plan = ChannelPlan((0.25, 0.5, 1.0), make_divisible, norm=layer_norm)
    assert plan.heads(8).channels == (2, 4, 8) and plan.norm_kind == "custom"
    assert type(plan.norm(None, 16)) is nn.LayerNorm and isinstance(plan.norm(plan.rule(16), 16), SlimLayerNorm)
    # a universally slimmable plan: whole groups of 2 query heads for any width in the range, rounded as an S-Net's
    # (0.3: 1.2 groups; one group would be 17% below, more than the 10% the rounding allows, so two)
    rule = ChannelPlan((), make_divisible, width_range=(0.25, 1.0)).heads(8, group=2)
    ws = (0.25, 0.3, 0.5, 0.8, 1.0)
    assert [rule(w) for w in ws] == [head_count(8, w, 2) for w in ws] == [2, 4, 4, 6, 8]
    with pytest.raises(ValueError, match="nor a norm layer factory"):
        ChannelPlan((1.0,), make_divisible, norm="layer")
