"""Transformer layers: attention heads slim (head size and scale kept), packed q/k/v rows picked per head, grouped
key/value heads, the patch embedding; each width equals its dense form, torch's attention and plain-op references."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from slimmable.export import export_width
from slimmable.nn import (
    PatchEmbed,
    SelfAttention,
    SlimMultiheadAttention,
    SlimPatchEmbed,
    WidthTable,
    head_count,
    head_rule,
    record_input_channels,
    set_width,
    use_width,
)
from slimmable.search import count_active_params, count_macs

WIDTHS = (0.25, 0.5, 0.75, 1.0)


def _randomize(m: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return m.eval()


def _tokens(n: int = 2, length: int = 10, dim: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, length, dim, generator=torch.Generator().manual_seed(seed))


def _reference(x: torch.Tensor, m: SlimMultiheadAttention, heads: int, cout: int) -> torch.Tensor:
    """Attention of ``x`` with plain ops on ``m``'s tensors: the first ``heads`` heads of each of q, k and v (key
    and value heads shared by groups), softmax(q k^T / sqrt(head_dim)) v, the first columns of the projection."""
    d, big_h, big_g = m.head_dim, m.num_heads, m.num_kv_heads
    group = big_h // big_g
    g = heads // group
    cin = x.shape[-1]
    w, b = m.qkv.weight, m.qkv.bias
    wq, bq = w[: heads * d, :cin], b[: heads * d]
    wk, bk = w[big_h * d : (big_h + g) * d, :cin], b[big_h * d : (big_h + g) * d]
    wv, bv = w[(big_h + big_g) * d : (big_h + big_g + g) * d, :cin], b[(big_h + big_g) * d : (big_h + big_g + g) * d]
    n, length, _ = x.shape
    q = (x @ wq.T + bq).reshape(n, length, heads, d).permute(0, 2, 1, 3)
    k = (x @ wk.T + bk).reshape(n, length, g, d).permute(0, 2, 1, 3).repeat_interleave(group, dim=1)
    v = (x @ wv.T + bv).reshape(n, length, g, d).permute(0, 2, 1, 3).repeat_interleave(group, dim=1)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = (att @ v).permute(0, 2, 1, 3).reshape(n, length, heads * d)
    return out @ m.proj.weight[:cout, : heads * d].T + m.proj.bias[:cout]


def test_head_count_rounds_as_channels_do_and_refuses_more_heads_than_built() -> None:
    # 3 heads: the nearest whole head, never more than 10% below, at least one
    assert [head_count(3, w) for w in (0.1, 0.25, 1 / 3, 0.5, 2 / 3, 0.75, 1.0)] == [1, 1, 1, 2, 2, 3, 3]
    assert [head_count(8, w) for w in WIDTHS] == [2, 4, 6, 8]
    # grouped key/value heads: whole groups of 4 query heads (2 groups: 0.5, 1, 1.5 -> 2 rounded half up, 2)
    assert [head_count(8, w, group=4) for w in WIDTHS] == [4, 4, 8, 8]
    assert head_rule(WIDTHS, 4).channels == (1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"width 1.5 needs 5 attention heads but the model has 3") as err:
        head_rule((0.5, 1.5), 3)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="groups of 3"):
        head_rule(WIDTHS, 8, group=3)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "slim_out"),
    [(4, None, False), (4, None, True), (8, 2, False), (8, 2, True)],
)
def test_every_width_equals_dense_form_and_plain_op_reference(heads, kv_heads, slim_out) -> None:
    dim, d = 32, 8
    group = heads // (kv_heads or heads)
    rule = head_rule(WIDTHS, heads, group)
    out_rule = WidthTable.build(WIDTHS, [c * d * 32 // (heads * d) for c in rule.channels]) if slim_out else None
    m = _randomize(SlimMultiheadAttention(dim, heads, d, kv_heads, head_rule=rule, out_rule=out_rule))
    for w in WIDTHS:
        m.set_width(w)
        h = rule(w)
        cin = out_rule(w) if slim_out else dim  # a slimmed stream comes in narrowed too
        cout = out_rule(w) if slim_out else dim
        x = _tokens(dim=cin)
        with torch.no_grad():
            y = m(x)
            ref = _reference(x, m, h, cout)
            dense = m.to_dense(cin)
            assert type(dense) is SelfAttention and dense.num_heads == h and dense.head_dim == d
            assert dense.num_kv_heads == h // group and dense.scale == d**-0.5
            torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(dense(x), y, atol=1e-6, rtol=1e-6)
        assert y.shape == (2, 10, cout)
        assert m.active_params(cin) == sum(p.numel() for p in dense.parameters())
        # the active slices are exactly the dense tensors
        for (p, index), q in zip(m.active_slices(cin), dense.parameters()):
            torch.testing.assert_close(p[index], q, rtol=0, atol=0)


def test_full_width_equals_torch_multihead_attention() -> None:
    dim, heads = 48, 4
    m = _randomize(SlimMultiheadAttention(dim, heads, head_rule=head_rule(WIDTHS, heads)))
    ref = nn.MultiheadAttention(dim, heads, batch_first=True).eval()
    with torch.no_grad():  # torchvision's in_proj and timm's qkv share one layout: [q heads; k heads; v heads]
        ref.in_proj_weight.copy_(m.qkv.weight)
        ref.in_proj_bias.copy_(m.qkv.bias)
        ref.out_proj.weight.copy_(m.proj.weight)
        ref.out_proj.bias.copy_(m.proj.bias)
    x = _tokens(dim=dim)
    m.set_width(1.0)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x, x, x, need_weights=False)[0], atol=1e-5, rtol=1e-5)


def test_scale_and_head_size_stay_at_every_width() -> None:
    m = SlimMultiheadAttention(64, 4, head_rule=head_rule(WIDTHS, 4))
    for w in WIDTHS:
        m.set_width(w)
        dense = m.to_dense(64)
        assert (dense.head_dim, dense.scale) == (16, 0.25)


def test_load_dense_inverts_to_dense_and_writes_the_active_rows() -> None:
    m = _randomize(SlimMultiheadAttention(32, 4, 8, 2, head_rule=head_rule(WIDTHS, 4, group=2)))
    m.set_width(0.5)  # 2 query heads, 1 key/value head
    before = copy.deepcopy(m.state_dict())
    m.load_dense(m.to_dense(32))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    dense = m.to_dense(32)
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(1.0)
    m.load_dense(dense)
    changed = (m.qkv.weight != before["qkv.weight"]).any(dim=1).nonzero().flatten().tolist()
    # rows of q heads 0-1 (0..15), k head 0 (32..39), v head 0 (48..55)
    assert changed == [*range(16), *range(32, 40), *range(48, 56)]
    x = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(m(x), dense(x), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="1 heads of 8"):
        m.set_width(1.0)
        m.load_dense(SelfAttention(32, 1, 8))


def test_macs_count_both_attention_products_and_equal_flop_counter() -> None:
    m = _randomize(SlimMultiheadAttention(32, 4, head_rule=head_rule(WIDTHS, 4)))
    x = _tokens(n=1, length=17)
    for w in WIDTHS:
        m.set_width(w)
        h = m.active_heads
        assert m.macs(17, 32) == 17 * 32 * 3 * h * 8 + 17 * h * 8 * 32 + 2 * h * 17 * 17 * 8
        # the project's count (its formula for the CPU attention kernel) and torch's own count of the math path
        assert count_macs(m, x) == m.macs(17, 32)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            m.to_dense(32)(x)
        assert counter.get_total_flops() // 2 == m.macs(17, 32)
        assert count_active_params(m, x) == m.active_params(32)


def test_inference_memo_is_used_and_invalidated_by_updates() -> None:
    m = _randomize(SlimMultiheadAttention(32, 4, head_rule=head_rule(WIDTHS, 4)))
    m.set_width(0.5)
    x = _tokens()
    with torch.no_grad():
        a = m(x)
        assert m._weight_memo
        m(x)
        m.qkv.weight.mul_(2.0)  # bumps the version: the memo is stale
        b = m(x)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, _reference(x, m, 2, 32).detach(), atol=1e-5, rtol=1e-5)


def test_one_memo_per_setting_covers_every_projection_tensor() -> None:
    # the four tensors are memoised together under one stamp: a write to any of them (a bias too) invalidates it
    out = WidthTable.build(WIDTHS, [8, 16, 24, 32])
    m = _randomize(SlimMultiheadAttention(32, 4, head_rule=head_rule(WIDTHS, 4), out_rule=out))
    m.set_width(0.5)
    x = _tokens(dim=16)
    with torch.no_grad():
        a = m(x)
        assert list(m._weight_memo) == [("attn", 2, 16, 16)]
        m.proj.bias.add_(1.0)
        torch.testing.assert_close(m(x), a + 1.0)
        m.qkv.bias.zero_()
        torch.testing.assert_close(m(x), _reference(x, m, 2, 16), atol=1e-5, rtol=1e-5)
    with torch.inference_mode():  # a model built in inference mode: no version counters, so no memo, same result
        inf = _randomize(SlimMultiheadAttention(32, 4, head_rule=head_rule(WIDTHS, 4), out_rule=out))
        inf.set_width(0.5)
        torch.testing.assert_close(inf(x), _reference(x, inf, 2, 16), atol=1e-5, rtol=1e-5)
        assert not inf._weight_memo


def test_gradients_reach_only_the_active_heads() -> None:
    m = SlimMultiheadAttention(32, 4, head_rule=head_rule(WIDTHS, 4)).train()
    m.set_width(0.5)
    m(_tokens()).sum().backward()
    rows = m.qkv.weight.grad.abs().sum(dim=1) > 0
    active = torch.zeros(96, dtype=torch.bool)
    for a in (0, 32, 64):
        active[a : a + 16] = True
    assert torch.equal(rows, active)
    assert (m.proj.weight.grad[:, 16:] == 0).all() and (m.proj.weight.grad[:, :16] != 0).any()


def test_patch_embed_every_width_equals_dense_and_positions_interpolate() -> None:
    rule = WidthTable.build(WIDTHS, [8, 16, 24, 32])
    m = _randomize(SlimPatchEmbed(28, 4, 1, 32, out_rule=rule))
    x = torch.randn(2, 1, 28, 28)
    for w in WIDTHS:
        m.set_width(w)
        c = rule(w)
        with torch.no_grad():
            y = m(x)
            dense = m.to_dense(1)
            assert type(dense) is PatchEmbed and dense.embed_dim == c
            torch.testing.assert_close(dense(x), y, rtol=0, atol=0)
            # by hand: conv of the first c filters, class token first, positions added
            ref = F.conv2d(x, m.proj.weight[:c], m.proj.bias[:c], stride=4).flatten(2).transpose(1, 2)
            ref = torch.cat([m.cls_token[..., :c].expand(2, -1, -1), ref], dim=1) + m.pos_embed[..., :c]
            torch.testing.assert_close(y, ref, rtol=0, atol=0)
        assert y.shape == (2, 50, c)
        assert m.active_params(1) == sum(p.numel() for p in dense.parameters())
    with torch.no_grad():  # another image side: the 7x7 grid of positions resized to 8x8
        assert m(torch.randn(1, 1, 32, 32)).shape == (1, 65, 32)


def test_a_model_of_these_layers_exports_and_records_token_features() -> None:
    rule = head_rule(WIDTHS, 4)
    model = nn.Sequential(
        SlimPatchEmbed(16, 4, 3, 32), SlimMultiheadAttention(32, 4, head_rule=rule), nn.LayerNorm(32)
    ).eval()
    _randomize(model)
    x = torch.randn(2, 3, 16, 16)
    assert record_input_channels(model, x) == {"0": 3, "1": 32}
    for w in WIDTHS:
        dense = export_width(model, w, example=x)
        with torch.no_grad(), use_width(model, w):
            torch.testing.assert_close(dense(x), model(x), atol=1e-6, rtol=1e-6)
        assert dense[1].num_heads == rule(w)
    with pytest.raises(ValueError, match=r"width 0.6 not in widths \(0.25, 0.5, 0.75, 1\)"):
        set_width(model, 0.6)
