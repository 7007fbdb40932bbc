"""Slimmable transformer layers: multi-head self-attention whose heads slim, the patch/token embedding, the MLP.

A width runs the first ``h`` attention heads of the shared weights. Each head keeps its size (``head_dim``) and
so its softmax scale ``head_dim ** -0.5``: a narrower width drops whole heads, it never shrinks one. The query,
key and value projections are *packed* in one weight laid out as timm's ``qkv`` ``Linear`` and torchvision's
``nn.MultiheadAttention.in_proj_weight``: ``[q heads; k heads; v heads]`` rows of ``head_dim`` each, so at ``h``
heads the layer takes the first ``h`` heads of each of the three blocks. Grouped-query attention (fewer key/value
heads, each serving ``num_heads // num_kv_heads`` query heads) slims in whole groups.

Each slimmable layer here subclasses the plain module it becomes on export (:class:`SelfAttention`,
:class:`PatchEmbed`): same parameter names, same computation, the slimmable one slicing its tensors first.
:func:`slim_mlp` builds the MLP from two :class:`~slimmable.nn.SlimLinear` layers (its hidden units slim like a
convolution's channels). A LayerNorm over a slimmed residual stream is :class:`~slimmable.nn.SlimLayerNorm`.

Widths map to head counts by :func:`head_rule` (the project's rounding, see there).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import SlimModule
from .channels import ChannelRule, WidthTable, make_divisible, normalize_widths, width_key
from .layers import SlimLinear, _param, _put, _take, _WeightMemo

__all__ = [
    "HeadTensor",
    "PatchEmbed",
    "SelfAttention",
    "SlimMultiheadAttention",
    "SlimPatchEmbed",
    "head_count",
    "head_rule",
    "slim_mlp",
]


def head_count(num_heads: int, width: float, group: int = 1) -> int:
    """Attention heads active at ``width``: ``num_heads * width`` in whole groups of ``group`` heads, rounded as
    the project rounds channels (:func:`~slimmable.nn.make_divisible` with divisor 1: to the nearest whole group,
    never more than 10% below, at least one group).

    Args:
        num_heads: query heads at full width.
        width: the width multiplier.
        group: query heads per key/value head (grouped-query attention); 1 for ordinary attention.
    """
    return make_divisible(num_heads * width / group, 1) * group


def head_rule(widths: Sequence[float], num_heads: int, group: int = 1) -> WidthTable:
    """The active query heads of each width (:func:`head_count`), as a channel rule in units of heads.

    Raises:
        ValueError: ``group`` does not divide ``num_heads``, or a width needs more heads than ``num_heads`` (a
            transformer's widths run a fraction of its heads, so at most 1.0).
    """
    if group < 1 or num_heads % group:
        raise ValueError(f"{num_heads} attention heads cannot be split into groups of {group} (one per key/value head)")
    ws = normalize_widths(widths)
    for w in ws:
        if head_count(num_heads, w, group) > num_heads:
            raise ValueError(
                f"width {w:g} needs {head_count(num_heads, w, group)} attention heads but the model has {num_heads}; "
                "a transformer's widths run a fraction of its heads (at most 1.0)"
            )
    return WidthTable.build(ws, lambda w: head_count(num_heads, w, group))


def _attend(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None,
    heads: int,
    kv_heads: int,
    head_dim: int,
    scale: float,
    *,
    attn_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    q_norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
    k_norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Self-attention of ``x`` ``(N, L, C)`` with packed ``[q; k; v]`` projection rows (``heads``, ``kv_heads`` and
    ``kv_heads`` heads of ``head_dim``), the output projected by ``proj_weight``.

    ``attn_bias`` (broadcastable to ``(N, heads, L, L)``) is added to the attention logits (a relative position
    bias, a window mask); ``dropout_p`` drops attention weights; ``q_norm``/``k_norm`` act on each head's queries
    and keys ``(N, heads, L, head_dim)`` (timm's ``qk_norm``)."""
    n, length, _ = x.shape
    qkv = F.linear(x, qkv_weight, qkv_bias)
    q, k, v = qkv.split((heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), dim=-1)
    q = q.unflatten(-1, (heads, head_dim)).transpose(1, 2)  # (N, heads, L, head_dim)
    k = k.unflatten(-1, (kv_heads, head_dim)).transpose(1, 2)
    v = v.unflatten(-1, (kv_heads, head_dim)).transpose(1, 2)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    # optional arguments only where they are needed: older torch and exporters know the plain call
    extra: dict = {"enable_gqa": True} if kv_heads != heads else {}
    if attn_bias is not None:
        extra["attn_mask"] = attn_bias.to(q.dtype)
    if dropout_p:
        extra["dropout_p"] = float(dropout_p)
    out = F.scaled_dot_product_attention(q, k, v, scale=scale, **extra).transpose(1, 2)
    if attn_bias is not None:
        # torch.export's decomposition of the masked kernel gives this output other strides than the kernel:
        # without the copy, the reshape below becomes a view that fails there (a dynamic batch of windows)
        out = out.clone(memory_format=torch.contiguous_format)
    return F.linear(out.reshape(n, length, heads * head_dim), proj_weight, proj_bias)


@dataclass(frozen=True)
class HeadTensor:
    """A tensor of an attention layer that holds per-head entries along ``dim``, as :meth:`SelfAttention.head_tensors`
    gives it: ``dim`` is ``len(units)`` consecutive blocks (the q, k and v rows of the packed projection; one block
    elsewhere), block ``i`` made of ``num_kv_heads`` groups of ``units[i]`` entries, group ``j`` belonging to key/value
    head ``j`` and the query heads it serves. Reordering whole groups the same way in every such tensor of a layer
    leaves its output unchanged (attention sums the heads' outputs through the output projection).

    Attributes:
        tensor: the parameter or buffer (the layer's own, not a copy).
        dim: the dimension holding the heads.
        units: entries per group in each block.
        kind: ``"qkv"`` (the rows of the q/k/v projection weight), ``"proj"`` (the input columns of the output
            projection weight) or ``"other"`` (biases, a relative position bias table).
    """

    tensor: torch.Tensor
    dim: int
    units: tuple[int, ...]
    kind: str


class SelfAttention(nn.Module):
    """Plain multi-head self-attention over tokens: a packed ``qkv`` projection, scaled dot-product attention
    (``F.scaled_dot_product_attention``), an output projection. The dense form of :class:`SlimMultiheadAttention`.

    Args:
        dim: input features.
        num_heads: query heads.
        head_dim: features per head (default ``dim // num_heads``).
        num_kv_heads: key/value heads (grouped-query attention; default ``num_heads``); divides ``num_heads``.
        qkv_bias, proj_bias: biases of the two projections.
        out_dim: output features (default ``dim``).
        scale: the softmax scale (default ``head_dim ** -0.5``).

    Attributes:
        qkv: ``nn.Linear(dim, (num_heads + 2 * num_kv_heads) * head_dim)``; rows: the query heads, then the key
            heads, then the value heads (timm's ``qkv``, torchvision's ``in_proj_weight``).
        proj: ``nn.Linear(num_heads * head_dim, out_dim)``.

    Shape:
        ``(N, L, dim)`` → ``(N, L, out_dim)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int | None = None,
        num_kv_heads: int | None = None,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        out_dim: int | None = None,
        scale: float | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}; give head_dim")
            head_dim = dim // num_heads
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads {num_kv_heads} must divide num_heads {num_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5 if scale is None else float(scale)
        out_dim = dim if out_dim is None else out_dim
        kw = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(dim, (num_heads + 2 * num_kv_heads) * head_dim, bias=qkv_bias, **kw)
        self.proj = nn.Linear(num_heads * head_dim, out_dim, bias=proj_bias, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv, proj = self.qkv, self.proj
        return _attend(
            x, qkv.weight, qkv.bias, proj.weight, proj.bias, self.num_heads, self.num_kv_heads, self.head_dim,
            self.scale,
        )  # fmt: skip

    def _projections(self) -> tuple[nn.Parameter, nn.Parameter | None, nn.Parameter, nn.Parameter | None]:
        """The full-width ``(qkv weight, qkv bias, proj weight, proj bias)``; a converted layer keeping another
        library's parameter names (``in_proj_weight``, ``out_proj``) overrides this alone."""
        # from the module dicts: nn.Module.__getattr__ costs a Python lookup per read, on every call of a slim layer
        modules = self._modules
        qkv, proj = modules["qkv"]._parameters, modules["proj"]._parameters  # type: ignore[union-attr]
        return qkv["weight"], qkv["bias"], proj["weight"], proj["bias"]

    def head_tensors(self) -> list[HeadTensor]:
        """Every tensor holding per-head entries, at the size built (:class:`HeadTensor`): the q, k and v rows of
        the packed projection (weight and bias) and the output projection's input columns; layers with other
        per-head tensors (a relative position bias table) add theirs. :func:`slimmable.sort_channels` reorders whole
        heads (key/value heads with their query heads) through these."""
        qkv_w, qkv_b, proj_w, _ = self._projections()
        d, per_group = self.head_dim, self.num_heads // self.num_kv_heads
        rows = (per_group * d, d, d)  # [q heads; k heads; v heads]: a key/value head serves per_group query heads
        out = [HeadTensor(qkv_w, 0, rows, "qkv"), HeadTensor(proj_w, 1, (per_group * d,), "proj")]
        return out + ([HeadTensor(qkv_b, 0, rows, "other")] if qkv_b is not None else [])

    def extra_repr(self) -> str:
        kv = f", num_kv_heads={self.num_kv_heads}" if self.num_kv_heads != self.num_heads else ""
        return f"num_heads={self.num_heads}{kv}, head_dim={self.head_dim}"


class SlimMultiheadAttention(_WeightMemo, SelfAttention, SlimModule):
    """:class:`SelfAttention` whose number of heads depends on the width; input features follow the input.

    At ``h`` active heads (``g`` key/value heads) it uses rows ``[0, h)``, ``[H, H + g)`` and ``[H + G, H + G + g)``
    heads of the packed ``qkv`` weight (``H``, ``G``: the heads built) and the first ``h * head_dim`` input columns
    of ``proj``; ``head_dim`` and the scale never change. Without autograd the sliced weights are memoised as
    contiguous copies (as :class:`~slimmable.nn.SlimLinear` does), so a narrow width runs at its dense speed.

    Args:
        dim, num_heads, head_dim, num_kv_heads, qkv_bias, proj_bias: as :class:`SelfAttention`, at full width.
        head_rule: active query heads per width (:func:`head_rule`; with grouped key/value heads a multiple of
            ``num_heads // num_kv_heads``); ``None`` keeps every head.
        out_rule: active output features per width (a slimmed residual stream); ``None`` keeps ``dim``.

    Shape:
        ``(N, L, C_in_active)`` → ``(N, L, C_out_active)``.
    """

    channel_dim = -1

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int | None = None,
        num_kv_heads: int | None = None,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        *,
        head_rule: ChannelRule | None = None,
        out_rule: ChannelRule | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, num_heads, head_dim, num_kv_heads, qkv_bias, proj_bias, device=device, dtype=dtype)
        self.dim = dim
        self.head_rule = head_rule
        # not ``out_rule``: that attribute marks layers whose output set_channels may set alone, and the residual
        # stream this layer writes to is tied to every block's
        self.out_dim_rule = out_rule
        self.group = num_heads // self.num_kv_heads
        if head_rule is not None and head_rule.max_channels > num_heads:
            raise ValueError(f"head_rule reaches {head_rule.max_channels} heads but the layer has {num_heads}")
        if out_rule is not None and out_rule.max_channels > dim:
            raise ValueError(f"out_rule reaches {out_rule.max_channels} features but the layer has {dim}")
        self.active_heads, self.active_out = num_heads, dim
        self._weight_memo: dict = {}

    @property
    def channel_rules(self) -> tuple[ChannelRule | None, ...]:
        return (self.head_rule, self.out_dim_rule)

    @property
    def active_kv_heads(self) -> int:
        return self.active_heads // self.group

    def _resolve(self, width: float) -> tuple[float, int, int]:
        h = self.num_heads if self.head_rule is None else int(self.head_rule(width))
        if h > self.num_heads or h < 1 or h % self.group:
            raise ValueError(
                f"width {width:g} needs {h} attention heads; the layer has {self.num_heads} in groups of {self.group}"
            )
        c = self.dim if self.out_dim_rule is None else int(self.out_dim_rule(width))
        if c > self.dim:
            raise ValueError(f"width {width:g} needs {c} output features, more than the {self.dim} built")
        return (width_key(width), h, c)

    def _apply_state(self, state: object) -> None:
        self.width, self.active_heads, self.active_out = state  # type: ignore[misc]

    def _get_state(self) -> object:
        return (self.width, self.active_heads, self.active_out)

    # -- the active tensors ---------------------------------------------------------------------------------------

    def _row_blocks(self, heads: int) -> list[tuple[int, int]]:
        """``(start, stop)`` rows of the q, k and v heads used at ``heads`` query heads."""
        d, h_all, g_all, g = self.head_dim, self.num_heads, self.num_kv_heads, heads // self.group
        return [(0, heads * d), (h_all * d, (h_all + g) * d), ((h_all + g_all) * d, (h_all + g_all + g) * d)]

    def _qkv_rows(self, t: torch.Tensor, heads: int, cols: int | None) -> torch.Tensor:
        """The active rows of the packed ``t`` (weight or bias) and, for the weight, its first ``cols`` columns."""
        parts = [t[a:b] if cols is None else t[a:b, :cols] for a, b in self._row_blocks(heads)]
        return torch.cat(parts)

    def _row_index(self, heads: int) -> torch.Tensor:
        return torch.cat([torch.arange(a, b) for a, b in self._row_blocks(heads)]).to(self._projections()[0].device)

    def _active(self, cin: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """``(qkv weight, qkv bias, proj weight, proj bias)`` at the current setting for ``cin`` input features."""
        h, cout = self.active_heads, self.active_out
        full = self._projections()
        if h == self.num_heads and cin == self.dim and cout == self.dim:
            return full
        # one memo for the four tensors (see _memoised_group): this runs on every call of every block
        return self._memoised_group(("attn", h, cin, cout), full, lambda: self._slice_projections(full, h, cin, cout))  # type: ignore[return-value]

    def _slice_projections(
        self,
        full: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None],
        h: int,
        cin: int,
        cout: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """The active rows and columns of the full-width ``(qkv weight, qkv bias, proj weight, proj bias)``; the
        tensors a width does not narrow are returned as they are (slicing costs time on every call)."""
        qkv_w, qkv_b, proj_w, proj_b = full
        if h != self.num_heads or cin != self.dim:
            qkv_w = self._qkv_rows(qkv_w, h, cin)
        if qkv_b is not None and h != self.num_heads:
            qkv_b = self._qkv_rows(qkv_b, h, None)
        cols = h * self.head_dim
        if h != self.num_heads or cout != self.dim:
            proj_w = proj_w[:cout, :cols]
        if proj_b is not None and cout != self.dim:
            proj_b = proj_b[:cout]
        return qkv_w, qkv_b, proj_w, proj_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.active_heads
        qkv_w, qkv_b, proj_w, proj_b = self._active(x.shape[-1])
        return _attend(x, qkv_w, qkv_b, proj_w, proj_b, h, h // self.group, self.head_dim, self.scale)

    # -- the layer protocol ---------------------------------------------------------------------------------------

    def _dense_tensors(
        self, in_channels: int
    ) -> tuple[nn.Parameter, nn.Parameter | None, nn.Parameter, nn.Parameter | None]:
        """Copies of the active ``(qkv weight, qkv bias, proj weight, proj bias)`` as new parameters."""
        cin, h, cout = int(in_channels), self.active_heads, self.active_out
        qkv_w, qkv_b, proj_w, proj_b = self._projections()
        w = _param(self._qkv_rows(qkv_w.detach(), h, cin).clone(), qkv_w)
        b = None if qkv_b is None else _param(self._qkv_rows(qkv_b.detach(), h, None).clone(), qkv_b)
        pw = _param(_take(proj_w, cout, h * self.head_dim), proj_w)
        pb = None if proj_b is None else _param(_take(proj_b, cout), proj_b)
        return w, b, pw, pb

    def to_dense(self, in_channels: int, *, fresh_stats: bool = False) -> SelfAttention:
        """:class:`SelfAttention` with ``num_heads`` = the active heads, holding copies of the active rows."""
        cin, h, cout = int(in_channels), self.active_heads, self.active_out
        _, qkv_b, _, proj_b = self._projections()
        dense = SelfAttention(
            cin, h, self.head_dim, h // self.group, qkv_b is not None, proj_b is not None, cout, self.scale,
            device="meta",
        )  # fmt: skip
        dense.qkv.weight, dense.qkv.bias, dense.proj.weight, dense.proj.bias = self._dense_tensors(cin)
        return dense.eval()

    def load_dense(self, dense: nn.Module) -> None:
        if not isinstance(dense, SelfAttention):
            raise ValueError(f"SlimMultiheadAttention loads a SelfAttention, got {type(dense).__name__}")
        if (dense.num_heads, dense.head_dim, dense.proj.out_features) != (
            self.active_heads,
            self.head_dim,
            self.active_out,
        ):
            raise ValueError(
                f"the dense attention has {dense.num_heads} heads of {dense.head_dim} and {dense.proj.out_features} "
                f"outputs, this layer {self.active_heads} of {self.head_dim} and {self.active_out} at its setting"
            )
        self._load_projections(dense.qkv.weight, dense.qkv.bias, dense.proj.weight, dense.proj.bias)

    def _load_projections(
        self, qkv_w: torch.Tensor, qkv_b: torch.Tensor | None, proj_w: torch.Tensor, proj_b: torch.Tensor | None
    ) -> None:
        """Write dense projections (as :meth:`_dense_tensors` gives them) into the active rows and columns."""
        own_w, own_b, own_pw, own_pb = self._projections()
        cin = qkv_w.shape[1]
        with torch.no_grad():
            start = 0
            for a, b in self._row_blocks(self.active_heads):
                rows = slice(start, start + b - a)
                own_w[a:b, :cin].copy_(qkv_w[rows])
                if own_b is not None and qkv_b is not None:
                    own_b[a:b].copy_(qkv_b[rows])
                start += b - a
        name = type(self).__name__
        _put(own_pw, proj_w, f"{name} output projection weight")
        if own_pb is not None and proj_b is not None:
            _put(own_pb, proj_b, f"{name} output projection bias")
        self.clear_weight_memo()

    def active_params(self, in_channels: int) -> int:
        h, g, cout = self.active_heads, self.active_kv_heads, self.active_out
        _, qkv_b, _, proj_b = self._projections()
        rows = (h + 2 * g) * self.head_dim
        qkv = rows * int(in_channels) + (rows if qkv_b is not None else 0)
        return qkv + cout * h * self.head_dim + (cout if proj_b is not None else 0)

    def active_slices(self, in_channels: int) -> list[tuple[nn.Parameter, tuple]]:
        """The active ``qkv`` rows as an index tensor (three blocks), ``proj`` as leading slices."""
        idx = self._row_index(self.active_heads)
        qkv_w, qkv_b, proj_w, proj_b = self._projections()
        cout, cols = slice(0, self.active_out), slice(0, self.active_heads * self.head_dim)
        out: list[tuple[nn.Parameter, tuple]] = [(qkv_w, (idx, slice(0, int(in_channels))))]
        if qkv_b is not None:
            out.append((qkv_b, (idx,)))
        out.append((proj_w, (cout, cols)))
        return out + ([(proj_b, (cout,))] if proj_b is not None else [])

    def macs(self, tokens: int, in_channels: int) -> int:
        """Multiply-accumulates of one sequence of ``tokens`` tokens with ``in_channels`` features at the current
        setting: the projections plus the two attention products (``QK^T`` and ``AV``, each ``tokens^2 * head_dim``
        per head), which grow with the square of the token count. Biases and the softmax are not counted, as
        ``torch.utils.flop_counter`` does not."""
        h, g, d, t = self.active_heads, self.active_kv_heads, self.head_dim, int(tokens)
        projections = t * int(in_channels) * (h + 2 * g) * d + t * h * d * self.active_out
        return projections + 2 * h * t * t * d

    def extra_repr(self) -> str:
        s, rule = super().extra_repr(), self.head_rule
        if rule is None:
            return s
        return f"{s}, heads={rule.channels}" if isinstance(rule, WidthTable) else f"{s}, widths={rule.describe()}"


def _resize_pos(pos: torch.Tensor, prefix: int, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Position embeddings ``(1, prefix + gh * gw, C)`` for a ``size`` grid of patches (bicubic on the grid part)."""
    if tuple(size) == tuple(grid):
        return pos
    lead, rest = pos[:, :prefix], pos[:, prefix:]
    rest = rest.reshape(1, grid[0], grid[1], -1).permute(0, 3, 1, 2)
    rest = F.interpolate(rest, size=size, mode="bicubic", align_corners=False)
    return torch.cat([lead, rest.flatten(2).transpose(1, 2)], dim=1)


def _embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cls_token: torch.Tensor | None,
    pos_embed: torch.Tensor,
    patch_size: int,
    grid: tuple[int, int],
) -> torch.Tensor:
    y = F.conv2d(x, weight, bias, stride=patch_size)  # (N, C, h, w)
    size = (y.shape[-2], y.shape[-1])
    tokens = y.flatten(2).transpose(1, 2)  # (N, h * w, C)
    prefix = 0
    if cls_token is not None:
        tokens = torch.cat([cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        prefix = 1
    return tokens + _resize_pos(pos_embed, prefix, grid, size)


class PatchEmbed(nn.Module):
    """Plain patch embedding of a vision transformer: non-overlapping ``patch_size`` patches projected by a
    convolution, an optional class token in front, learned position embeddings added. The dense form of
    :class:`SlimPatchEmbed`.

    The position embeddings are learned for ``img_size``; another input size (a grid of another shape) gets them
    interpolated bicubically, as DeiT fine-tunes at a new resolution.

    Args:
        img_size: the image side the position embeddings are learned for.
        patch_size: the patch side (the convolution's kernel and stride).
        in_chans: image channels.
        embed_dim: token features.
        class_token: put a learned class token in front of the patch tokens.

    Shape:
        ``(N, in_chans, H, W)`` → ``(N, 1 + (H // patch_size) * (W // patch_size), embed_dim)``.
    """

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        class_token: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if img_size < patch_size or patch_size < 1:
            raise ValueError(f"patch_size {patch_size} must be in 1..img_size ({img_size})")
        self.img_size, self.patch_size = int(img_size), int(patch_size)
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.embed_dim = embed_dim
        kw = {"device": device, "dtype": dtype}
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size, **kw)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **kw)) if class_token else None
        prefix = 1 if class_token else 0
        self.pos_embed = nn.Parameter(torch.zeros(1, prefix + self.grid[0] * self.grid[1], embed_dim, **kw))

    @property
    def num_patches(self) -> int:
        """Patch tokens at ``img_size``."""
        return self.grid[0] * self.grid[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.proj
        return _embed(x, proj.weight, proj.bias, self.cls_token, self.pos_embed, self.patch_size, self.grid)

    def extra_repr(self) -> str:
        return f"img_size={self.img_size}, patch_size={self.patch_size}"


class SlimPatchEmbed(PatchEmbed, SlimModule):
    """:class:`PatchEmbed` whose token features depend on the width (a slimmed residual stream): it uses the first
    ``c`` output channels of the projection and the first ``c`` features of the class token and the position
    embeddings. With ``out_rule=None`` it keeps every feature at every width.

    Args:
        img_size, patch_size, in_chans, embed_dim, class_token: as :class:`PatchEmbed`, at full width.
        out_rule: active token features per width; ``None`` keeps ``embed_dim``.
    """

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        class_token: bool = True,
        *,
        out_rule: ChannelRule | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(img_size, patch_size, in_chans, embed_dim, class_token, device=device, dtype=dtype)
        if out_rule is not None and out_rule.max_channels > embed_dim:
            raise ValueError(f"out_rule reaches {out_rule.max_channels} features but the embedding has {embed_dim}")
        self.dim_rule = out_rule
        self.active_out = embed_dim

    @property
    def channel_rules(self) -> tuple[ChannelRule | None, ...]:
        return (self.dim_rule,)

    def _resolve(self, width: float) -> tuple[float, int]:
        c = self.embed_dim if self.dim_rule is None else int(self.dim_rule(width))
        if c > self.embed_dim:
            raise ValueError(f"width {width:g} needs {c} token features, more than the {self.embed_dim} built")
        return (width_key(width), c)

    def _apply_state(self, state: object) -> None:
        self.width, self.active_out = state  # type: ignore[misc]

    def _get_state(self) -> object:
        return (self.width, self.active_out)

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        c, w, b = self.active_out, self.proj.weight, self.proj.bias
        if c == self.embed_dim:
            return w, b, self.cls_token, self.pos_embed
        cls = None if self.cls_token is None else self.cls_token[..., :c]
        return w[:c], None if b is None else b[:c], cls, self.pos_embed[..., :c]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b, cls, pos = self._tensors()
        return _embed(x, w, b, cls, pos, self.patch_size, self.grid)

    def to_dense(self, in_channels: int, *, fresh_stats: bool = False) -> PatchEmbed:
        """:class:`PatchEmbed` with ``embed_dim`` = the active features, holding copies of the active tensors."""
        c = self.active_out
        dense = PatchEmbed(
            self.img_size, self.patch_size, int(in_channels), c, self.cls_token is not None, device="meta"
        )
        dense.proj.weight = _param(_take(self.proj.weight, c, int(in_channels)), self.proj.weight)
        if self.proj.bias is not None:
            dense.proj.bias = _param(_take(self.proj.bias, c), self.proj.bias)
        else:
            dense.proj.bias = None
        if self.cls_token is not None:
            dense.cls_token = _param(_take(self.cls_token, 1, 1, c), self.cls_token)
        dense.pos_embed = _param(_take(self.pos_embed, *self.pos_embed.shape[:2], c), self.pos_embed)
        return dense.eval()

    def load_dense(self, dense: nn.Module) -> None:
        if not isinstance(dense, PatchEmbed):
            raise ValueError(f"SlimPatchEmbed loads a PatchEmbed, got {type(dense).__name__}")
        if dense.embed_dim != self.active_out:
            raise ValueError(f"the dense embedding has {dense.embed_dim} features, this layer {self.active_out}")
        for name, t in dense.named_parameters():
            _put(self.get_parameter(name), t.detach(), f"SlimPatchEmbed.{name}")

    def active_params(self, in_channels: int) -> int:
        c, (kh, kw) = self.active_out, self.proj.kernel_size
        conv = c * int(in_channels) * kh * kw + (c if self.proj.bias is not None else 0)
        return conv + (c if self.cls_token is not None else 0) + self.pos_embed.shape[1] * c


def slim_mlp(
    dim: int,
    hidden: int,
    *,
    hidden_rule: ChannelRule | None,
    out_rule: ChannelRule | None = None,
    act_layer: Callable[[], nn.Module] = nn.GELU,
    drop: float = 0.0,
) -> nn.Sequential:
    """A transformer's MLP, ``fc1 → act → drop1 → fc2 → drop2``, with slimmable hidden units.

    ``fc1`` takes the active input features and gives ``hidden_rule(width)`` hidden units; ``fc2`` reads them and
    gives ``out_rule(width)`` outputs (``None``: all ``dim``). On export both become ``nn.Linear`` and the container
    stays an ``nn.Sequential`` (keys ``fc1.*``, ``fc2.*``, as timm's ``Mlp``).
    """
    return nn.Sequential(
        OrderedDict(
            fc1=SlimLinear(dim, hidden, out_rule=hidden_rule),
            act=act_layer(),
            drop1=nn.Dropout(drop),
            fc2=SlimLinear(hidden, dim, out_rule=out_rule),
            drop2=nn.Dropout(drop),
        )
    )
