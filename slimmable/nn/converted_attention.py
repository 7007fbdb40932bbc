"""Attention layers of torchvision and timm, converted: their heads slim, each head keeps its size and scale.

:func:`slimmable.convert` replaces each attention module it recognises (by exact type, see
:func:`attention_support`) by one of the layers here. Each is a :class:`~slimmable.nn.SlimMultiheadAttention` (one
attention computation for the whole project): at ``h`` active heads it uses the first ``h`` heads of each of the
packed q, k and v blocks, the first ``h * head_dim`` input columns of the output projection and, for windowed
attention, the first ``h`` columns of the per-head relative position bias table. The residual stream a layer reads
and writes keeps its width. Each layer takes over the original's parameters, buffers and children under their
original names, so the original state dict loads.

On export (:meth:`to_dense`) a timm layer becomes timm's own class with ``num_heads`` updated (timm's ``Attention``
and ``WindowAttention`` take ``head_dim`` apart from ``dim``). torchvision's ``nn.MultiheadAttention`` and
``ShiftedWindowAttention`` tie ``head_dim`` to ``dim // num_heads``, so fewer heads of the same size over the full
stream are not one of them: those export as :class:`MultiheadSelfAttention` and :class:`ShiftedWindowSelfAttention`,
plain modules of torch operations called as the original is.

Original → converted → dense form:

* ``nn.MultiheadAttention`` (self-attention, no masks) → :class:`SlimTorchMultiheadAttention` →
  :class:`MultiheadSelfAttention`;
* torchvision ``ShiftedWindowAttention`` (Swin v1) → :class:`SlimShiftedWindowAttention` →
  :class:`ShiftedWindowSelfAttention`;
* timm ``Attention`` → :class:`SlimTimmAttention` → timm ``Attention``;
* timm ``WindowAttention`` (Swin) → :class:`SlimTimmWindowAttention` → timm ``WindowAttention``.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention import HeadTensor, SelfAttention, SlimMultiheadAttention, _attend, head_rule
from .layers import _param, _take

__all__ = [
    "MultiheadSelfAttention",
    "ShiftedWindowSelfAttention",
    "SlimShiftedWindowAttention",
    "SlimTimmAttention",
    "SlimTimmWindowAttention",
    "SlimTorchMultiheadAttention",
    "attention_support",
    "convert_attention",
]


def _class(module: str, name: str) -> type | None:
    """``module.name`` when that module is already imported (a model of that library exists), else ``None``."""
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


def _is(m: nn.Module, module: str, name: str) -> bool:
    cls = _class(module, name)
    return cls is not None and type(m) is cls


def attention_support(m: nn.Module) -> str | None:
    """Whether :func:`convert_attention` converts ``m``: ``None`` when it does, else why not (``""`` for a module
    that is not a recognised attention type at all). The converter traces a recognised type as one module.

    Types are matched exactly (a subclass may compute something else)."""
    if type(m) is nn.MultiheadAttention:
        if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
            return "nn.MultiheadAttention with separate key/value sizes, key/value biases or zero attention"
        return None
    if _is(m, "timm.layers.attention", "Attention"):
        if getattr(m, "gate", None) is not None:
            return "timm Attention with a gate (gated=True)"
        if not isinstance(m.norm, nn.Identity):
            return "timm Attention with scale_norm (a norm over all heads)"
        if m.proj.out_features != m.qkv.in_features or m.qkv.out_features != 3 * m.num_heads * m.head_dim:
            return "timm Attention with dim_out != dim"
        return None
    if _is(m, "timm.models.swin_transformer", "WindowAttention"):
        return None
    if _is(m, "torchvision.models.swin_transformer", "ShiftedWindowAttentionV2"):
        return "Swin v2 attention (cosine attention, position bias from an MLP) is not converted yet"
    if _is(m, "torchvision.models.swin_transformer", "ShiftedWindowAttention"):
        if m.qkv.out_features != 3 * m.qkv.in_features or m.proj.out_features != m.qkv.in_features:
            return "ShiftedWindowAttention with other projection sizes"
        return None
    return ""


def convert_attention(m: nn.Module, widths: Sequence[float]) -> SlimMultiheadAttention:
    """The slimmable layer for attention module ``m`` at ``widths`` (it takes over ``m``'s tensors).

    Raises:
        ValueError: ``m`` is not supported (:func:`attention_support` says why).
    """
    why = attention_support(m)
    if why is not None:
        raise ValueError(why or f"{type(m).__name__} is not an attention layer slimmable can convert")
    if type(m) is nn.MultiheadAttention:
        return SlimTorchMultiheadAttention(m, widths)
    if _is(m, "timm.layers.attention", "Attention"):
        return SlimTimmAttention(m, widths)
    if _is(m, "timm.models.swin_transformer", "WindowAttention"):
        return SlimTimmWindowAttention(m, widths)
    return SlimShiftedWindowAttention(m, widths)


def _relative_bias(table: torch.Tensor, index: torch.Tensor, heads: int, length: int) -> torch.Tensor:
    """The relative position bias ``(1, heads, L, L)`` of the first ``heads`` heads (columns of ``table``)."""
    bias = table[:, :heads][index.reshape(-1)].view(length, length, heads)
    return bias.permute(2, 0, 1).unsqueeze(0)


def _table_heads(layer: SelfAttention) -> HeadTensor:
    """The relative position bias table ``(T, num_heads)`` as a per-head tensor (a column per query head)."""
    return HeadTensor(layer.relative_position_bias_table, 1, (layer.num_heads // layer.num_kv_heads,), "other")


def _with_mask(bias: torch.Tensor, mask: torch.Tensor | None, n: int) -> torch.Tensor:
    """``bias`` ``(1, h, L, L)`` plus a per-window mask ``(nW, L, L)`` for ``n`` windows (batch-major)."""
    if mask is None:
        return bias
    per_window = bias + mask.unsqueeze(1).to(bias.dtype)  # (nW, h, L, L)
    return per_window.unsqueeze(0).expand(n // mask.shape[0], -1, -1, -1, -1).flatten(0, 1)


# -- nn.MultiheadAttention -------------------------------------------------------------------------------------------


class MultiheadSelfAttention(SelfAttention):
    """:class:`~slimmable.nn.SelfAttention` called as ``nn.MultiheadAttention`` is for self-attention:
    ``(query, key, value, ...)`` returning ``(output, None)``; ``key`` and ``value`` are the query (not read),
    masks are not supported. The dense form of :class:`SlimTorchMultiheadAttention`.

    Args:
        *args: as :class:`~slimmable.nn.SelfAttention`.
        batch_first: inputs are ``(N, L, C)`` (else ``(L, N, C)``).
        dropout: dropout on the attention weights in training.
        **kwargs: as :class:`~slimmable.nn.SelfAttention`.
    """

    def __init__(self, *args: object, batch_first: bool = True, dropout: float = 0.0, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.batch_first, self.dropout = batch_first, float(dropout)

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        x = query if self.batch_first else query.transpose(0, 1)
        qkv, proj = self.qkv, self.proj
        y = _attend(
            x, qkv.weight, qkv.bias, proj.weight, proj.bias, self.num_heads, self.num_kv_heads, self.head_dim,
            self.scale, dropout_p=self.dropout if self.training else 0.0,
        )  # fmt: skip
        return (y if self.batch_first else y.transpose(0, 1)), None


class SlimTorchMultiheadAttention(SlimMultiheadAttention):
    """``nn.MultiheadAttention`` used for self-attention, its heads slimmable; keeps ``in_proj_weight``,
    ``in_proj_bias`` and ``out_proj`` (same state-dict keys) and the call ``(query, key, value, ...)`` →
    ``(output, None)`` (attention weights are never returned; the converter checks they are not used).

    Args:
        mha: the original module (self-attention, one packed input projection, no key/value biases).
        widths: the model's widths (heads per width by :func:`~slimmable.nn.head_rule`).
    """

    def __init__(self, mha: nn.MultiheadAttention, widths: Sequence[float]) -> None:
        e, h = mha.embed_dim, mha.num_heads
        super().__init__(
            e, h, e // h, None, mha.in_proj_bias is not None, mha.out_proj.bias is not None,
            head_rule=head_rule(widths, h), device="meta",
        )  # fmt: skip
        del self.qkv, self.proj
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj
        self.batch_first, self.dropout = mha.batch_first, float(mha.dropout)

    def _projections(self) -> tuple[nn.Parameter, nn.Parameter | None, nn.Parameter, nn.Parameter | None]:
        return self.in_proj_weight, self.in_proj_bias, self.out_proj.weight, self.out_proj.bias

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        x = query if self.batch_first else query.transpose(0, 1)
        y = self._attend_active(x)
        return (y if self.batch_first else y.transpose(0, 1)), None

    def _attend_active(self, x: torch.Tensor) -> torch.Tensor:
        h = self.active_heads
        qkv_w, qkv_b, proj_w, proj_b = self._active(x.shape[-1])
        p = self.dropout if self.training else 0.0
        return _attend(x, qkv_w, qkv_b, proj_w, proj_b, h, h, self.head_dim, self.scale, dropout_p=p)

    def to_dense(self, in_channels: int, *, fresh_stats: bool = False) -> MultiheadSelfAttention:
        """:class:`MultiheadSelfAttention` with the active heads (copies of their rows and columns)."""
        h = self.active_heads
        dense = MultiheadSelfAttention(
            int(in_channels), h, self.head_dim, None, self.in_proj_bias is not None,
            self.out_proj.bias is not None, self.active_out, self.scale, batch_first=self.batch_first,
            dropout=self.dropout, device="meta",
        )  # fmt: skip
        dense.qkv.weight, dense.qkv.bias, dense.proj.weight, dense.proj.bias = self._dense_tensors(in_channels)
        return dense.eval()


# -- layers of another library that export as that library's class ---------------------------------------------------


class _LibraryAttention(SlimMultiheadAttention):
    """Takes over every child, parameter and buffer of ``original`` under its name; :meth:`_library_dense` builds
    an instance of the original's class with other sizes (its plain attributes copied, then updated), without
    calling its constructor, so it does not depend on the library version's signature."""

    def _take_over(self, original: nn.Module) -> None:
        del self.qkv, self.proj
        for name, child in original.named_children():
            setattr(self, name, child)
        for name, p in original.named_parameters(recurse=False):
            setattr(self, name, p)
        for name, b in original.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in original._non_persistent_buffers_set)
        self._library_class = type(original)
        own = set(vars(nn.Module()))
        self._library_attrs = {k: v for k, v in vars(original).items() if k not in own and not k.startswith("_")}

    def _library_dense(self, in_channels: int, updates: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
        """An instance of the original's class at the current setting: ``qkv``/``proj`` with the active weights,
        other children copied, attributes ``updates``, parameters or buffers ``tensors`` (already sliced)."""
        cls = self._library_class
        dense = cls.__new__(cls)
        nn.Module.__init__(dense)
        for k, v in {**copy.deepcopy(self._library_attrs), **updates}.items():
            setattr(dense, k, v)
        qkv_w, qkv_b, proj_w, proj_b = self._dense_tensors(in_channels)
        for name, child in self.named_children():
            if name in ("qkv", "proj"):
                w, b = (qkv_w, qkv_b) if name == "qkv" else (proj_w, proj_b)
                lin = nn.Linear(w.shape[1], w.shape[0], b is not None, device="meta")
                lin.weight, lin.bias = w, b
                setattr(dense, name, lin)
            else:
                setattr(dense, name, copy.deepcopy(child))
        for name, t in tensors.items():
            if isinstance(t, nn.Parameter):
                setattr(dense, name, t)
            else:
                dense.register_buffer(name, t, persistent=name not in self._non_persistent_buffers_set)
        return dense.eval()

    def _other_params(self) -> list[nn.Parameter]:
        """Parameters of the children other than the projections (timm's per-head ``q_norm``/``k_norm``): used
        whole at every width."""
        return [p for name, c in self.named_children() if name not in ("qkv", "proj") for p in c.parameters()]

    def active_params(self, in_channels: int) -> int:
        return super().active_params(in_channels) + sum(p.numel() for p in self._other_params())

    def active_slices(self, in_channels: int) -> list[tuple[nn.Parameter, tuple]]:
        whole = [(p, tuple(slice(0, n) for n in p.shape)) for p in self._other_params()]
        return super().active_slices(in_channels) + whole

    def load_dense(self, dense: nn.Module) -> None:
        if getattr(dense, "num_heads", None) != self.active_heads or not hasattr(dense, "qkv"):
            raise ValueError(
                f"{type(self).__name__} at {self.active_heads} heads loads its dense form with as many heads, got "
                f"{type(dense).__name__} with {getattr(dense, 'num_heads', None)}"
            )
        self._load_projections(dense.qkv.weight, dense.qkv.bias, dense.proj.weight, dense.proj.bias)


class SlimTimmAttention(_LibraryAttention):
    """timm's ``Attention`` (ViT, DeiT, ...) with slimmable heads; its ``q_norm``/``k_norm`` act per head and so
    at any head count. Exports as timm's ``Attention`` with ``num_heads`` (and ``attn_dim``) updated.

    Args:
        attn: the original module (no gate, no ``scale_norm``, ``dim_out == dim``).
        widths: the model's widths (heads per width by :func:`~slimmable.nn.head_rule`).
    """

    def __init__(self, attn: nn.Module, widths: Sequence[float]) -> None:
        super().__init__(
            attn.qkv.in_features, attn.num_heads, attn.head_dim, None, attn.qkv.bias is not None,
            attn.proj.bias is not None, head_rule=head_rule(widths, attn.num_heads), device="meta",
        )  # fmt: skip
        self._take_over(attn)
        self.scale = float(attn.scale)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if is_causal:
            raise ValueError("SlimTimmAttention does not support is_causal=True (converted for self-attention)")
        h = self.active_heads
        qkv_w, qkv_b, proj_w, proj_b = self._active(x.shape[-1])
        q_norm = None if isinstance(self.q_norm, nn.Identity) else self.q_norm
        k_norm = None if isinstance(self.k_norm, nn.Identity) else self.k_norm
        y = _attend(
            x, qkv_w, qkv_b, proj_w, proj_b, h, h, self.head_dim, self.scale, attn_bias=attn_mask,
            dropout_p=self.attn_drop.p if self.training else 0.0, q_norm=q_norm, k_norm=k_norm,
        )  # fmt: skip
        return self.proj_drop(y)

    def to_dense(self, in_channels: int, *, fresh_stats: bool = False) -> nn.Module:
        """timm's ``Attention`` with the active heads."""
        h = self.active_heads
        updates = {"num_heads": h}
        if "attn_dim" in self._library_attrs:
            updates["attn_dim"] = h * self.head_dim
        return self._library_dense(in_channels, updates, {})


class SlimTimmWindowAttention(_LibraryAttention):
    """timm's Swin ``WindowAttention`` with slimmable heads; the relative position bias of the first ``h`` heads
    (columns of ``relative_position_bias_table``). Called as the original, ``(windows, mask)`` with windows
    ``(B * nW, L, C)`` and a mask ``(nW, L, L)`` or ``None``. Exports as timm's ``WindowAttention`` with
    ``num_heads`` updated.

    Args:
        attn: the original module.
        widths: the model's widths.
    """

    def __init__(self, attn: nn.Module, widths: Sequence[float]) -> None:
        heads = attn.num_heads
        super().__init__(
            attn.qkv.in_features, heads, attn.qkv.out_features // (3 * heads), None, attn.qkv.bias is not None,
            attn.proj.bias is not None, head_rule=head_rule(widths, heads), device="meta",
        )  # fmt: skip
        self._take_over(attn)
        self.scale = float(attn.scale)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        h = self.active_heads
        qkv_w, qkv_b, proj_w, proj_b = self._active(x.shape[-1])
        bias = _relative_bias(self.relative_position_bias_table, self.relative_position_index, h, x.shape[1])
        y = _attend(
            x, qkv_w, qkv_b, proj_w, proj_b, h, h, self.head_dim, self.scale,
            attn_bias=_with_mask(bias, mask, x.shape[0]), dropout_p=self.attn_drop.p if self.training else 0.0,
        )  # fmt: skip
        return self.proj_drop(y)

    def head_tensors(self) -> list[HeadTensor]:
        """As :meth:`~slimmable.nn.SelfAttention.head_tensors`, and the relative position bias table's columns."""
        return [*super().head_tensors(), _table_heads(self)]

    def to_dense(self, in_channels: int, *, fresh_stats: bool = False) -> nn.Module:
        """timm's ``WindowAttention`` with the active heads and their relative position bias."""
        h, table = self.active_heads, self.relative_position_bias_table
        sliced = _param(_take(table, table.shape[0], h), table)
        index = self.relative_position_index.detach().clone()
        tensors = {"relative_position_bias_table": sliced, "relative_position_index": index}
        return self._library_dense(in_channels, {"num_heads": h}, tensors)

    def active_params(self, in_channels: int) -> int:
        return super().active_params(in_channels) + self.relative_position_bias_table.shape[0] * self.active_heads

    def active_slices(self, in_channels: int) -> list[tuple[nn.Parameter, tuple]]:
        table = (self.relative_position_bias_table, (slice(None), slice(0, self.active_heads)))
        return [*super().active_slices(in_channels), table]


# -- torchvision's Swin (v1) -----------------------------------------------------------------------------------------


def _shift_mask(hp: int, wp: int, window: Sequence[int], shift: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """The additive mask ``(nW, L, L)`` of shifted windows: -100 between tokens that the cyclic shift brought
    together from different regions of the ``hp x wp`` map (the value torchvision's Swin uses), else 0."""

    def bands(n: int, w: int, s: int) -> torch.Tensor:  # region of each row (column): 0, 1 or 2
        i = torch.arange(n, device=like.device)
        return (i >= n - w).long() + (i >= n - s).long()

    region = bands(hp, window[0], shift[0])[:, None] * 3 + bands(wp, window[1], shift[1])[None, :]
    region = region.view(hp // window[0], window[0], wp // window[1], window[1]).permute(0, 2, 1, 3)
    region = region.reshape(-1, window[0] * window[1])
    return (region[:, None, :] != region[:, :, None]).to(like.dtype) * -100.0


def _windowed(
    x: torch.Tensor,
    window: Sequence[int],
    shift: Sequence[int],
    attend: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
) -> torch.Tensor:
    """Shifted-window attention over ``x`` ``(B, H, W, C)``: pad to whole windows, shift cyclically, attend within
    each window (``attend(windows (B * nW, L, C), mask (nW, L, L) or None)``), undo all three."""
    b, h, w, _ = x.shape
    wh, ww = window
    x = F.pad(x, (0, 0, 0, (-w) % ww, 0, (-h) % wh))
    hp, wp = x.shape[1], x.shape[2]
    # one window along a dimension: nothing to shift there
    sh, sw = (0 if wh >= hp else shift[0]), (0 if ww >= wp else shift[1])
    shifted = sh + sw > 0
    if shifted:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    c = x.shape[-1]
    windows = x.view(b, hp // wh, wh, wp // ww, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, c)
    mask = _shift_mask(hp, wp, window, (sh, sw), x) if shifted else None
    y = attend(windows, mask)
    c = y.shape[-1]
    y = y.view(b, hp // wh, wp // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    if shifted:
        y = torch.roll(y, shifts=(sh, sw), dims=(1, 2))
    return y[:, :h, :w].contiguous()


class ShiftedWindowSelfAttention(SelfAttention):
    """Plain (shifted) window attention of torchvision's Swin over ``(B, H, W, C)`` maps, with ``head_dim`` apart
    from ``dim``: the dense form of :class:`SlimShiftedWindowAttention`. Keeps torchvision's names
    (``qkv``, ``proj``, ``relative_position_bias_table`` ``(T, num_heads)``, ``relative_position_index``).

    Args:
        dim, num_heads, head_dim: as :class:`~slimmable.nn.SelfAttention`.
        window_size, shift_size: the window and the cyclic shift (``[h, w]``).
        table_size: rows of the relative position bias table.
        qkv_bias, proj_bias: biases of the projections.
        attention_dropout, dropout: dropout on the attention weights and on the output, in training.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        window_size: Sequence[int],
        shift_size: Sequence[int],
        table_size: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attention_dropout: float = 0.0,
        dropout: float = 0.0,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(dim, num_heads, head_dim, None, qkv_bias, proj_bias, device=device)
        self.window_size, self.shift_size = list(window_size), list(shift_size)
        self.attention_dropout, self.dropout = float(attention_dropout), float(dropout)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table_size, num_heads, device=device))
        area = self.window_size[0] * self.window_size[1]
        self.register_buffer("relative_position_index", torch.zeros(area * area, dtype=torch.long, device=device))

    def _attend_windows(
        self,
        x: torch.Tensor,
        heads: int,
        projections: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None],
    ) -> torch.Tensor:
        length = self.window_size[0] * self.window_size[1]
        bias = _relative_bias(self.relative_position_bias_table, self.relative_position_index, heads, length)
        p = self.attention_dropout if self.training else 0.0

        def attend(windows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            return _attend(
                windows, *projections, heads, heads, self.head_dim, self.scale,
                attn_bias=_with_mask(bias, mask, windows.shape[0]), dropout_p=p,
            )  # fmt: skip

        y = _windowed(x, self.window_size, self.shift_size, attend)
        return F.dropout(y, self.dropout, self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv, proj = self.qkv, self.proj
        return self._attend_windows(x, self.num_heads, (qkv.weight, qkv.bias, proj.weight, proj.bias))

    def head_tensors(self) -> list[HeadTensor]:
        """As :meth:`~slimmable.nn.SelfAttention.head_tensors`, and the relative position bias table's columns."""
        return [*super().head_tensors(), _table_heads(self)]


class SlimShiftedWindowAttention(SlimMultiheadAttention):
    """torchvision's Swin (v1) ``ShiftedWindowAttention`` with slimmable heads; keeps its names (same state-dict
    keys) and its call ``(B, H, W, C)`` → ``(B, H, W, C)``. Exports as :class:`ShiftedWindowSelfAttention`.

    Args:
        attn: the original module.
        widths: the model's widths.
    """

    def __init__(self, attn: nn.Module, widths: Sequence[float]) -> None:
        dim, heads = attn.qkv.in_features, attn.num_heads
        super().__init__(
            dim, heads, dim // heads, None, attn.qkv.bias is not None, attn.proj.bias is not None,
            head_rule=head_rule(widths, heads), device="meta",
        )  # fmt: skip
        self.qkv, self.proj = attn.qkv, attn.proj
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index)
        self.window_size, self.shift_size = list(attn.window_size), list(attn.shift_size)
        self.attention_dropout, self.dropout = float(attn.attention_dropout), float(attn.dropout)

    _attend_windows = ShiftedWindowSelfAttention._attend_windows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._attend_windows(x, self.active_heads, self._active(x.shape[-1]))

    def head_tensors(self) -> list[HeadTensor]:
        """As :meth:`~slimmable.nn.SelfAttention.head_tensors`, and the relative position bias table's columns."""
        return [*super().head_tensors(), _table_heads(self)]

    def to_dense(self, in_channels: int, *, fresh_stats: bool = False) -> ShiftedWindowSelfAttention:
        """:class:`ShiftedWindowSelfAttention` with the active heads and their relative position bias."""
        h, table = self.active_heads, self.relative_position_bias_table
        dense = ShiftedWindowSelfAttention(
            int(in_channels), h, self.head_dim, self.window_size, self.shift_size, table.shape[0],
            self.qkv.bias is not None, self.proj.bias is not None, self.attention_dropout, self.dropout,
            device="meta",
        )  # fmt: skip
        dense.qkv.weight, dense.qkv.bias, dense.proj.weight, dense.proj.bias = self._dense_tensors(in_channels)
        dense.relative_position_bias_table = _param(_take(table, table.shape[0], h), table)
        dense.relative_position_index = self.relative_position_index.detach().clone()
        return dense.eval()

    def load_dense(self, dense: nn.Module) -> None:
        if not isinstance(dense, ShiftedWindowSelfAttention) or dense.num_heads != self.active_heads:
            raise ValueError(
                f"SlimShiftedWindowAttention loads a ShiftedWindowSelfAttention of {self.active_heads} heads"
            )
        super().load_dense(dense)
        with torch.no_grad():
            self.relative_position_bias_table[:, : self.active_heads].copy_(dense.relative_position_bias_table)

    def active_params(self, in_channels: int) -> int:
        return super().active_params(in_channels) + self.relative_position_bias_table.shape[0] * self.active_heads

    def active_slices(self, in_channels: int) -> list[tuple[nn.Parameter, tuple]]:
        table = (self.relative_position_bias_table, (slice(None), slice(0, self.active_heads)))
        return [*super().active_slices(in_channels), table]
