"""Converted attention layers (torchvision's and timm's, heads slimmable): at full width equal to the original and
holding its state-dict keys; at every width equal to their dense form, whose parameters are the active ones."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttention

from slimmable.nn.converted_attention import attention_support, convert_attention

timm = pytest.importorskip("timm", reason="timm is not installed: pip install 'slimmable[timm]'")

WIDTHS = (0.25, 0.5, 0.75, 1.0)
X = torch.randn(2, 10, 64)
WINDOWS = torch.randn(8, 16, 64)
MASK = torch.zeros(4, 16, 16).masked_fill(torch.rand(4, 16, 16) > 0.5, -100.0)
MAP = torch.randn(2, 9, 7, 64)  # (B, H, W, C): padded to whole windows inside


def _table(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        m.relative_position_bias_table.normal_(0, 1.0)
    return m


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], torch.Tensor]]] = {
    "mha_batch_first": (lambda: nn.MultiheadAttention(64, 4, batch_first=True), lambda m: m(X, X, X)[0]),
    "mha_seq_first": (lambda: nn.MultiheadAttention(64, 4), lambda m: m(X.transpose(0, 1), X.transpose(0, 1),
                                                                         X.transpose(0, 1))[0]),
    "timm_attention": (lambda: timm.layers.Attention(64, 4, qkv_bias=True), lambda m: m(X)),
    "timm_qk_norm": (lambda: timm.layers.Attention(64, 4, qk_norm=True, norm_layer=nn.LayerNorm), lambda m: m(X)),
    "timm_window": (lambda: _table(timm.models.swin_transformer.WindowAttention(64, 4, window_size=4)),
                    lambda m: m(WINDOWS, mask=MASK)),
    "tv_window": (lambda: _table(ShiftedWindowAttention(64, [4, 4], [0, 0], 4)), lambda m: m(MAP)),
    "tv_shifted_window": (lambda: _table(ShiftedWindowAttention(64, [4, 4], [2, 2], 4)), lambda m: m(MAP)),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_full_width_equals_the_original_and_every_width_its_dense_form(case: str) -> None:
    build, call = CASES[case]
    torch.manual_seed(0)
    original = build().eval()
    assert attention_support(original) is None
    slim = convert_attention(copy.deepcopy(original), WIDTHS).eval()
    assert set(slim.state_dict()) == set(original.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(call(slim), call(original), atol=1e-5, rtol=1e-5)
        for w, heads in zip(WIDTHS, (1, 2, 3, 4)):
            slim.set_width(w)
            dense = slim.to_dense(64)
            assert dense.num_heads == heads == slim.active_heads
            torch.testing.assert_close(call(dense), call(slim), atol=1e-6, rtol=1e-5)
            assert slim.active_params(64) == sum(p.numel() for p in dense.parameters())
            if w < 1.0:
                assert not torch.allclose(call(slim), call(original), atol=1e-3)


def test_timm_layers_export_as_timm_classes_and_load_back() -> None:
    torch.manual_seed(0)
    slim = convert_attention(timm.layers.Attention(64, 4, qkv_bias=True), WIDTHS).eval()
    slim.set_width(0.5)
    dense = slim.to_dense(64)
    assert type(dense) is timm.layers.Attention and dense.attn_dim == 2 * 16 and dense.head_dim == 16
    with torch.no_grad():
        dense.qkv.weight.mul_(2.0)
    slim.load_dense(dense)
    torch.testing.assert_close(slim(X), dense(X))


def test_unsupported_attention_says_why() -> None:
    gated = timm.layers.Attention(64, 4, gated=True)
    assert "gate" in attention_support(gated)
    assert attention_support(nn.Linear(4, 4)) == ""
    with pytest.raises(ValueError, match="gate"):
        convert_attention(gated, WIDTHS)
