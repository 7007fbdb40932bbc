"""Slimmable layers made by :func:`slimmable.convert` from an existing model's layers.

A converted layer keeps the original layer's parameter names (the original ``state_dict`` loads into it) and
takes, per width, a precomputed table: the active output channels (a :class:`WidthTable`) and the *input index*,
the positions in the full-width input that the active input channels hold. After a concatenation the active
channels are not one prefix (``cat(a[:, :ca], b[:, :cb])`` holds positions ``0..ca-1`` and ``A..A+cb-1``), so a
consumer picks those weight columns. Tables are fixed at conversion; :meth:`set_width` picks the entry and
``forward`` only slices or gathers.

Index tensors are non-persistent buffers: they follow ``.to(device)`` but never enter the state dict.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import SlimModule
from .channels import ChannelRule, WidthRange, WidthTable, width_key
from .layers import SlimConv2d, SlimLinear, USBatchNorm2d, _dense_bn, _param, _put, _SlimOut

__all__ = [
    "ChannelLayerNorm",
    "ChannelSelect",
    "ConvertedBatchNorm2d",
    "ConvertedBatchNormAct2d",
    "ConvertedUSBatchNorm2d",
    "ConvertedUSBatchNormAct2d",
    "IndexSelect",
    "IndexedSlimConv2d",
    "IndexedSlimLinear",
    "NormAct",
    "SlimGroupNorm",
    "SlimGroupNormAct",
    "SlimLayerNorm",
]

#: an input index per width: ``None`` where the active input channels are a prefix
IndexTable = Mapping[float, "torch.Tensor | None"]


class _InIndex:
    """Mixin: the per-width input index as non-persistent buffers ``in_index_<i>`` (``i`` = position in
    :attr:`index_widths`); :attr:`active_index` is the active slot (``None``: a prefix)."""

    index_widths: tuple[float, ...]
    index_slots: tuple[int | None, ...]
    active_index: int | None

    def _init_index(self, table: IndexTable | None) -> None:
        table = dict(table or {})
        self.index_widths = tuple(sorted(width_key(w) for w in table))
        slots: list[int | None] = []
        n = 0
        for w in self.index_widths:
            idx = table[w] if w in table else table[next(k for k in table if width_key(k) == w)]
            if idx is None:
                slots.append(None)
            else:
                self.register_buffer(f"in_index_{n}", torch.as_tensor(idx, dtype=torch.long), persistent=False)
                slots.append(n)
                n += 1
        self.index_slots = tuple(slots)
        self.active_index = None

    def _index_slot(self, width: float) -> int | None:
        if not self.index_widths:
            return None
        k = width_key(width)
        if k not in self.index_widths:
            raise ValueError(f"width {width:g} not in widths {tuple(self.index_widths)}")
        return self.index_slots[self.index_widths.index(k)]

    def _index(self) -> torch.Tensor | None:
        i = self.active_index
        return None if i is None else self._buffers[f"in_index_{i}"]


class _IndexedOut(_InIndex):
    """Mixin of layers with slimmable outputs (:class:`_SlimOut`) and an input index."""

    def _resolve(self, width: float) -> tuple:
        return (*_SlimOut._resolve(self, width), self._index_slot(width))

    def _apply_state(self, state: object) -> None:
        *base, self.active_index = state  # type: ignore[misc]
        _SlimOut._apply_state(self, tuple(base))

    def _get_state(self) -> object:
        return (*_SlimOut._get_state(self), self.active_index)


class IndexedSlimConv2d(_IndexedOut, SlimConv2d):
    """A :class:`SlimConv2d` whose active input channels may be any fixed subset per width (after a concat).

    With ``groups == 1`` it uses ``weight[:c_out, index]``; a depthwise convolution uses ``weight[index]`` (its
    output holds the same positions as its input). Grouped convolutions take a prefix (``index`` must be ``None``).

    Args:
        conv: the original ``nn.Conv2d`` (its parameters are taken over, not copied).
        out_rule: active output channels per width; ``None`` keeps all (a depthwise conv: always ``None``).
        in_index: width → input index (positions of the active input channels), ``None`` entries for a prefix.
    """

    def __init__(self, conv: nn.Conv2d, out_rule: ChannelRule | None, in_index: IndexTable | None = None) -> None:
        depthwise = conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            out_rule=None if depthwise else out_rule,
            depthwise=depthwise,
            device="meta",
        )
        self.padding_mode = conv.padding_mode
        self.weight = conv.weight
        self.bias = conv.bias
        self._init_index(in_index)
        if conv.groups > 1 and not depthwise and any(s is not None for s in self.index_slots):
            raise ValueError("a grouped convolution takes a prefix of its input; give no input index")

    def _weights(self, cin: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        idx = self._index()
        if idx is None:
            cout, groups = self._dense_sizes(cin)
            w = self.weight[:cout, : cin // groups]
            return w, None if self.bias is None else self.bias[:cout], groups
        if self.depthwise:
            return self.weight.index_select(0, idx), None if self.bias is None else self.bias.index_select(0, idx), cin
        cout = int(self.active_out)
        w = self.weight[:cout].index_select(1, idx)
        return w, None if self.bias is None else self.bias[:cout], 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active_index is None:
            return super().forward(x)
        w, b, groups = self._weights(x.shape[1])
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, groups)

    def to_dense(self, in_channels: int, *, fresh_stats: bool = False) -> nn.Conv2d:
        """``nn.Conv2d`` holding the active weights (gathered along the input index where there is one)."""
        w, b, groups = self._weights(int(in_channels))
        conv = nn.Conv2d(
            int(in_channels), w.shape[0], self.kernel_size, self.stride, self.padding, self.dilation, groups,
            b is not None, self.padding_mode, device="meta",
        )  # fmt: skip
        conv.weight = _param(w.detach().clone(memory_format=torch.contiguous_format), self.weight)
        if b is not None:
            conv.bias = _param(b.detach().clone(), self.bias)
        return conv.eval()

    def load_dense(self, dense: nn.Module) -> None:
        idx = self._index()
        if idx is None:
            return super().load_dense(dense)
        if not isinstance(dense, nn.Conv2d):
            raise ValueError(f"IndexedSlimConv2d loads an nn.Conv2d, got {type(dense).__name__}")
        with torch.no_grad():
            if self.depthwise:
                self.weight.index_copy_(0, idx, dense.weight)
                if self.bias is not None:
                    self.bias.index_copy_(0, idx, dense.bias)
            else:
                cout = dense.out_channels
                self.weight[:cout].index_copy_(1, idx, dense.weight)
                if self.bias is not None:
                    _put(self.bias, dense.bias, "IndexedSlimConv2d.bias")
        self.clear_weight_memo()

    def active_slices(self, in_channels: int) -> list[tuple[nn.Parameter, tuple]]:
        """As :meth:`SlimConv2d.active_slices`; with an input index the index tensor stands in the tuple."""
        idx = self._index()
        if idx is None:
            return super().active_slices(in_channels)
        if self.depthwise:
            return [(p, (idx,)) for p in (self.weight, self.bias) if p is not None]
        rows = slice(0, int(self.active_out))
        out: list[tuple[nn.Parameter, tuple]] = [(self.weight, (rows, idx))]
        return out + ([(self.bias, (rows,))] if self.bias is not None else [])


class IndexedSlimLinear(_IndexedOut, SlimLinear):
    """A :class:`SlimLinear` whose active input features may be any fixed subset per width (after a concat, or
    ``flatten`` of a concat: blocks of ``H*W`` features per channel).

    Args:
        linear: the original ``nn.Linear`` (parameters taken over).
        out_rule: active output features per width; ``None`` keeps all.
        in_index: width → input feature index, ``None`` entries for a prefix.
    """

    def __init__(self, linear: nn.Linear, out_rule: ChannelRule | None, in_index: IndexTable | None = None) -> None:
        super().__init__(
            linear.in_features, linear.out_features, linear.bias is not None, out_rule=out_rule, device="meta"
        )
        self.weight = linear.weight
        self.bias = linear.bias
        self._init_index(in_index)

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        cout = int(self.active_out)
        w = self.weight[:cout].index_select(1, self._index())
        return w, None if self.bias is None else self.bias[:cout]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active_index is None:
            return super().forward(x)
        w, b = self._weights()
        return F.linear(x, w, b)

    def to_dense(self, in_channels: int, *, fresh_stats: bool = False) -> nn.Linear:
        if self.active_index is None:
            return super().to_dense(in_channels, fresh_stats=fresh_stats)
        w, b = self._weights()
        lin = nn.Linear(int(in_channels), w.shape[0], b is not None, device="meta")
        lin.weight = _param(w.detach().clone(), self.weight)
        if b is not None:
            lin.bias = _param(b.detach().clone(), self.bias)
        return lin.eval()

    def load_dense(self, dense: nn.Module) -> None:
        idx = self._index()
        if idx is None:
            return super().load_dense(dense)
        if not isinstance(dense, nn.Linear):
            raise ValueError(f"IndexedSlimLinear loads an nn.Linear, got {type(dense).__name__}")
        with torch.no_grad():
            self.weight[: dense.out_features].index_copy_(1, idx, dense.weight)
            if self.bias is not None:
                _put(self.bias, dense.bias, "IndexedSlimLinear.bias")
        self.clear_weight_memo()

    def active_slices(self, in_channels: int) -> list[tuple[nn.Parameter, tuple]]:
        idx = self._index()
        if idx is None:
            return super().active_slices(in_channels)
        rows = slice(0, int(self.active_out))
        out: list[tuple[nn.Parameter, tuple]] = [(self.weight, (rows, idx))]
        return out + ([(self.bias, (rows,))] if self.bias is not None else [])


class ConvertedBatchNorm2d(nn.BatchNorm2d, SlimModule):
    """Switchable BatchNorm that keeps the original ``nn.BatchNorm2d`` as its full-width switch.

    The widest width normalises with the module's own ``weight``/``bias``/``running_*`` (the original's keys, so
    pretrained weights load as they are); each narrower width has a private ``BatchNorm2d`` in ``switches``
    (S-Nets' switchable BN), started from the original's affine and statistics at the channels that width keeps.
    Loading a state dict without ``switches.*`` entries (the original model's) starts them again from the
    loaded full-width tensors.

    Args:
        bn: the original affine ``nn.BatchNorm2d`` with running statistics (its tensors are taken over).
        index: width → positions of the channels that width keeps (a prefix given as ``arange(c)``); the
            widest width must keep all channels.
    """

    def __init__(self, bn: nn.BatchNorm2d, index: Mapping[float, torch.Tensor]) -> None:
        if not (bn.affine and bn.track_running_stats):
            raise ValueError("ConvertedBatchNorm2d needs an affine BatchNorm2d with running statistics")
        super().__init__(bn.num_features, bn.eps, bn.momentum, device="meta")
        self.weight, self.bias = bn.weight, bn.bias
        self.running_mean, self.running_var = bn.running_mean, bn.running_var
        self.num_batches_tracked = bn.num_batches_tracked
        self.training = bn.training
        ws = sorted(width_key(w) for w in index)
        full = [w for w in ws if len(index[w]) == bn.num_features]
        if not full or full[-1] != ws[-1]:
            raise ValueError(f"the widest width {ws[-1]:g} must keep all {bn.num_features} channels")
        self.rule = WidthTable.build(ws, [len(index[w]) for w in ws])
        self.switch_widths = tuple(ws[:-1])
        self._switch_index = [torch.as_tensor(index[w], dtype=torch.long) for w in self.switch_widths]
        self.switches = nn.ModuleList(
            nn.BatchNorm2d(len(i), bn.eps, bn.momentum, device=bn.weight.device, dtype=bn.weight.dtype)
            for i in self._switch_index
        )
        self._fill_switches()
        self.switches.train(bn.training)
        self.width = ws[-1]
        self.switch: int | None = None  # None: the full-width BN (self)
        self._register_load_state_dict_pre_hook(self._fill_missing_switches)

    @torch.no_grad()
    def _fill_switches(self) -> None:
        for idx, sw in zip(self._switch_index, self.switches):
            idx = idx.to(self.weight.device)
            sw.weight.copy_(self.weight.index_select(0, idx))
            sw.bias.copy_(self.bias.index_select(0, idx))
            sw.running_mean.copy_(self.running_mean.index_select(0, idx))
            sw.running_var.copy_(self.running_var.index_select(0, idx))
            sw.num_batches_tracked.copy_(self.num_batches_tracked)

    def _fill_missing_switches(self, state_dict: dict, prefix: str, *args: object) -> None:
        # An original (unconverted) state dict has only the full-width tensors: derive the switches from them.
        if not self.switches or f"{prefix}switches.0.weight" in state_dict or f"{prefix}weight" not in state_dict:
            return
        for i, idx in enumerate(self._switch_index):
            for name in ("weight", "bias", "running_mean", "running_var"):
                src = state_dict.get(prefix + name)
                if src is not None:
                    state_dict[f"{prefix}switches.{i}.{name}"] = src.index_select(0, idx.to(src.device))
            if prefix + "num_batches_tracked" in state_dict:
                state_dict[f"{prefix}switches.{i}.num_batches_tracked"] = state_dict[prefix + "num_batches_tracked"]

    @property
    def channel_rules(self) -> tuple[ChannelRule, ...]:
        return (self.rule,)

    def _resolve(self, width: float) -> tuple[float, int | None]:
        i = self.rule.index(width)
        return (width_key(width), None if i == len(self.switch_widths) else i)

    def _apply_state(self, state: object) -> None:
        self.width, self.switch = state  # type: ignore[misc]

    def _get_state(self) -> object:
        return (self.width, self.switch)

    def _active(self) -> nn.BatchNorm2d:
        return self if self.switch is None else self.switches[self.switch]

    def to_dense(self, in_channels: int, *, fresh_stats: bool = False) -> nn.BatchNorm2d:
        bn = self._active()
        if bn.num_features != int(in_channels):
            raise ValueError(f"the active switch normalises {bn.num_features} channels but receives {in_channels}")
        return _dense_bn(bn.num_features, bn.eps, bn.momentum, bn.weight, bn.bias, None if fresh_stats else bn)

    def load_dense(self, dense: nn.Module) -> None:
        if not isinstance(dense, nn.BatchNorm2d):
            raise ValueError(f"ConvertedBatchNorm2d loads an nn.BatchNorm2d, got {type(dense).__name__}")
        bn = self._active()
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                getattr(bn, name).copy_(getattr(dense, name))

    def active_params(self, in_channels: int) -> int:
        return 2 * int(in_channels)

    def active_slices(self, in_channels: int) -> list[tuple[nn.Parameter, tuple[slice, ...]]]:
        bn = self._active()
        return [(bn.weight, (slice(None),)), (bn.bias, (slice(None),))]

    def stat_layers(self) -> list[nn.modules.batchnorm._BatchNorm]:
        return [self._active()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.switch is None:
            return super().forward(x)
        return self.switches[self.switch](x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, widths={self.rule.describe()}"


class ConvertedUSBatchNorm2d(USBatchNorm2d):
    """A universally slimmable :class:`~slimmable.nn.USBatchNorm2d` made from an original ``nn.BatchNorm2d``.

    The original's affine becomes the shared (sliced) affine; every statistics width starts from the original's
    running statistics of the channels it keeps, so the widest width (1.0) normalises exactly as the original. Other
    widths are re-estimated by BN calibration (:func:`slimmable.train.calibrate_bn`), as in US-Nets. The original's
    state dict loads: its ``running_mean`` / ``running_var`` / ``num_batches_tracked`` fill every statistics slot.

    Args:
        bn: the original affine ``nn.BatchNorm2d`` with running statistics (its affine is taken over).
        rule: channels for any width of the range (:class:`WidthRange`), ``rule.max_channels == bn.num_features``.
        stat_widths: the widths that keep running statistics.
    """

    def __init__(self, bn: nn.BatchNorm2d, rule: WidthRange, stat_widths: Sequence[float]) -> None:
        if not (bn.affine and bn.track_running_stats) or rule.max_channels != bn.num_features:
            raise ValueError("ConvertedUSBatchNorm2d needs an affine BatchNorm2d with statistics of the rule's size")
        dev, dtype = bn.weight.device, bn.weight.dtype
        super().__init__(rule, stat_widths, bn.eps, bn.momentum, device=dev, dtype=dtype)
        self.weight, self.bias = bn.weight, bn.bias
        self.train(bn.training)
        self._fill_slots(bn.running_mean, bn.running_var, bn.num_batches_tracked)
        self._register_load_state_dict_pre_hook(self._from_original)

    @torch.no_grad()
    def _fill_slots(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor | None) -> None:
        for slot in self.bn:
            c = slot.num_features
            slot.running_mean.copy_(mean[:c])
            slot.running_var.copy_(var[:c])
            if count is not None:
                slot.num_batches_tracked.copy_(count)

    def _from_original(self, state_dict: dict, prefix: str, *args: object) -> None:
        # An original (unconverted) state dict holds one set of statistics: every slot starts from it.
        mean, var = state_dict.pop(f"{prefix}running_mean", None), state_dict.pop(f"{prefix}running_var", None)
        count = state_dict.pop(f"{prefix}num_batches_tracked", None)
        if mean is None or var is None or f"{prefix}bn.0.running_mean" in state_dict:
            return
        for i, slot in enumerate(self.bn):
            c = slot.num_features
            state_dict[f"{prefix}bn.{i}.running_mean"] = mean[:c]
            state_dict[f"{prefix}bn.{i}.running_var"] = var[:c]
            state_dict[f"{prefix}bn.{i}.num_batches_tracked"] = count if count is not None else slot.num_batches_tracked


class _SelectAffine(_InIndex):
    """Mixin of norm layers with a per-channel affine: the active affine is ``weight[index]`` or a prefix."""

    def _affine(self, c: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        w, b = self.weight, self.bias
        if w is None:
            return None, None
        idx = self._index()
        if idx is None:
            return w[:c], None if b is None else b[:c]
        return w.index_select(0, idx), None if b is None else b.index_select(0, idx)

    def _resolve(self, width: float) -> tuple[float, int | None]:
        return (width_key(width), self._index_slot(width))

    def _apply_state(self, state: object) -> None:
        self.width, self.active_index = state  # type: ignore[misc]

    def _get_state(self) -> object:
        return (self.width, self.active_index)

    def active_params(self, in_channels: int) -> int:
        return 0 if self.weight is None else (2 if self.bias is not None else 1) * int(in_channels)


def _put_affine(dst: nn.Module, dense: nn.Module) -> None:
    if dst.weight is None:
        return
    with torch.no_grad():
        idx = dst._index()
        for name in ("weight", "bias"):
            t, s = getattr(dst, name), getattr(dense, name)
            if t is None or s is None:
                continue
            if idx is None:
                _put(t, s, type(dst).__name__)
            else:
                t.index_copy_(0, idx, s)


class ChannelLayerNorm(nn.LayerNorm):
    """A plain LayerNorm over dimension 1 of ``(N, C, ...)`` inputs (torchvision's ``LayerNorm2d``); the dense
    form of a channels-first :class:`SlimLayerNorm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.movedim(1, -1)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).movedim(-1, 1)


class SlimLayerNorm(_SelectAffine, nn.LayerNorm, SlimModule):
    """LayerNorm over a slimmable channel dimension: the statistics are taken over the active channels.

    Args:
        norm: the original ``nn.LayerNorm`` over one dimension (parameters taken over).
        in_index: width → positions of the active channels (``None`` entries: a prefix).
        channel_dim: ``-1`` (``nn.LayerNorm``) or ``1`` (channels-first, torchvision's ``LayerNorm2d``).
    """

    def __init__(self, norm: nn.LayerNorm, in_index: IndexTable | None = None, channel_dim: int = -1) -> None:
        if len(norm.normalized_shape) != 1:
            raise ValueError(f"SlimLayerNorm normalises one dimension, got normalized_shape {norm.normalized_shape}")
        super().__init__(norm.normalized_shape, norm.eps, norm.elementwise_affine, device="meta")
        self.weight, self.bias = norm.weight, norm.bias
        self.channel_dim = channel_dim
        self._init_index(in_index)
        self.width = max(self.index_widths) if self.index_widths else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_dim == 1:
            x = x.movedim(1, -1)
        c = x.shape[-1]
        w, b = self._affine(c)
        y = F.layer_norm(x, (c,), w, b, self.eps)
        return y.movedim(-1, 1) if self.channel_dim == 1 else y

    def to_dense(self, in_channels: int, *, fresh_stats: bool = False) -> nn.LayerNorm:
        c = int(in_channels)
        cls = ChannelLayerNorm if self.channel_dim == 1 else nn.LayerNorm
        out = cls(c, self.eps, self.elementwise_affine, device="meta")
        w, b = self._affine(c)
        if w is not None:
            out.weight = _param(w.detach().clone(), self.weight)
            out.bias = None if b is None else _param(b.detach().clone(), self.bias)
        return out.eval()

    def load_dense(self, dense: nn.Module) -> None:
        _put_affine(self, dense)


class SlimGroupNorm(_SelectAffine, nn.GroupNorm, SlimModule):
    """GroupNorm with a fixed number of groups over the active channels (their count stays divisible by it).

    Args:
        norm: the original ``nn.GroupNorm`` (parameters taken over).
        in_index: width → positions of the active channels (``None`` entries: a prefix).
    """

    def __init__(self, norm: nn.GroupNorm, in_index: IndexTable | None = None) -> None:
        super().__init__(norm.num_groups, norm.num_channels, norm.eps, norm.affine, device="meta")
        self.weight, self.bias = norm.weight, norm.bias
        self._init_index(in_index)
        self.width = max(self.index_widths) if self.index_widths else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self._affine(x.shape[1])
        return F.group_norm(x, self.num_groups, w, b, self.eps)

    def to_dense(self, in_channels: int, *, fresh_stats: bool = False) -> nn.GroupNorm:
        c = int(in_channels)
        out = nn.GroupNorm(self.num_groups, c, self.eps, self.affine, device="meta")
        w, b = self._affine(c)
        if w is not None:
            out.weight, out.bias = _param(w.detach().clone(), self.weight), _param(b.detach().clone(), self.bias)
        return out.eval()

    def load_dense(self, dense: nn.Module) -> None:
        _put_affine(self, dense)


class NormAct(nn.Module):
    """``act(drop(norm(x)))``: the dense form of a converted norm-act layer (timm's ``BatchNormAct2d``).

    Args:
        norm: the dense norm layer.
        drop: the dropout (or ``nn.Identity``) after it.
        act: the activation after that.
    """

    def __init__(self, norm: nn.Module, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.norm, self.drop, self.act = norm, drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self.norm(x)))


class _ActAfter:
    """Mixin of converted norms that keep the original's ``drop`` and ``act`` children (same state-dict keys) and
    apply them after normalising; the activation is elementwise, so it runs on any number of channels."""

    drop: nn.Module
    act: nn.Module

    def _init_act(self, drop: nn.Module, act: nn.Module) -> None:
        self.drop, self.act = drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))  # type: ignore[misc]

    def to_dense(self, in_channels: int, *, fresh_stats: bool = False) -> NormAct:
        norm = super().to_dense(in_channels, fresh_stats=fresh_stats)  # type: ignore[misc]
        return NormAct(norm, copy.deepcopy(self.drop), copy.deepcopy(self.act)).eval()

    def load_dense(self, dense: nn.Module) -> None:
        super().load_dense(dense.norm if isinstance(dense, NormAct) else dense)  # type: ignore[misc]


class ConvertedBatchNormAct2d(_ActAfter, ConvertedBatchNorm2d):
    """:class:`ConvertedBatchNorm2d` followed by the original's dropout and activation (timm's ``BatchNormAct2d``).

    Args:
        bn: the original norm-act layer, an ``nn.BatchNorm2d`` subclass (its tensors are taken over).
        index: width → positions of the channels that width keeps (see :class:`ConvertedBatchNorm2d`).
        drop: the dropout applied after normalising (``nn.Identity`` for none).
        act: the elementwise activation applied last.
    """

    def __init__(self, bn: nn.BatchNorm2d, index: Mapping[float, torch.Tensor], drop: nn.Module, act: nn.Module):
        super().__init__(bn, index)
        self._init_act(drop, act)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, then {type(self.act).__name__}"


class ConvertedUSBatchNormAct2d(_ActAfter, ConvertedUSBatchNorm2d):
    """:class:`ConvertedUSBatchNorm2d` followed by the original's dropout and activation (timm's ``BatchNormAct2d``).

    Args:
        bn: the original norm-act layer, an ``nn.BatchNorm2d`` subclass (its affine is taken over).
        rule: channels for any width of the range.
        stat_widths: the widths that keep running statistics.
        drop: the dropout applied after normalising (``nn.Identity`` for none).
        act: the elementwise activation applied last.
    """

    def __init__(
        self, bn: nn.BatchNorm2d, rule: WidthRange, stat_widths: Sequence[float], drop: nn.Module, act: nn.Module
    ) -> None:
        super().__init__(bn, rule, stat_widths)
        self._init_act(drop, act)


class SlimGroupNormAct(_ActAfter, SlimGroupNorm):
    """:class:`SlimGroupNorm` followed by the original's dropout and activation (timm's ``GroupNormAct``).

    Args:
        norm: the original norm-act layer, an ``nn.GroupNorm`` subclass (parameters taken over).
        in_index: width → positions of the active channels (``None`` entries: a prefix).
        drop: the dropout applied after normalising (``nn.Identity`` for none).
        act: the elementwise activation applied last.
    """

    def __init__(self, norm: nn.GroupNorm, in_index: IndexTable | None, drop: nn.Module, act: nn.Module) -> None:
        super().__init__(norm, in_index)
        self._init_act(drop, act)


class IndexSelect(nn.Module):
    """A plain module returning ``x.index_select(dim, index)``: the dense form of :class:`ChannelSelect`."""

    def __init__(self, dim: int, index: torch.Tensor) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("index", index.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(self.dim, self.index)


class ChannelSelect(_InIndex, SlimModule):
    """Picks the active channels of a tensor the model uses directly (a parameter such as ConvNeXt's layer scale
    or a positional embedding), so that it meets a slimmed activation. Holds no parameters.

    Args:
        dim: the dimension of the tensor that holds the channels.
        index: width → positions of the active channels (``None`` entries: all of them).
    """

    def __init__(self, dim: int, index: IndexTable) -> None:
        super().__init__()
        self.select_dim = dim
        self._init_index(index)
        self.width = max(self.index_widths)

    _resolve = _SelectAffine._resolve
    _apply_state = _SelectAffine._apply_state
    _get_state = _SelectAffine._get_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self._index()
        return x if idx is None else x.index_select(self.select_dim, idx)

    def to_dense(self, in_channels: int, *, fresh_stats: bool = False) -> nn.Module:
        idx = self._index()
        return nn.Identity() if idx is None else IndexSelect(self.select_dim, idx)

    def load_dense(self, dense: nn.Module) -> None:
        """Nothing to load: the selected tensor belongs to the model."""

    def active_params(self, in_channels: int) -> int:
        return 0

    def active_slices(self, in_channels: int) -> list:
        return []


def index_table(widths: Sequence[float], index: Sequence[torch.Tensor | None]) -> dict[float, torch.Tensor | None]:
    """``{width: index}`` with widths normalised as :func:`width_key` does."""
    return {width_key(w): i for w, i in zip(widths, index)}
