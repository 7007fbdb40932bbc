"""Slimmable layers: convolution, linear, switchable, universally slimmable and shared BatchNorm.

Convolutions and linear layers share weights across widths by taking the first ``c`` channels. Input channels
always follow the incoming tensor (``x.shape[1]``), so a layer needs only a rule for its *output* channels;
depthwise convolutions follow their input on both sides.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import SlimModule
from .channels import ChannelRule, WidthRange, WidthTable, width_key

__all__ = [
    "SharedBatchNorm2d",
    "SlimConv2d",
    "SlimLinear",
    "SwitchableBatchNorm2d",
    "USBatchNorm2d",
    "create_norm",
]


class _WeightMemo:
    """Mixin of slimmable layers that slice their weights: contiguous copies of the sliced weights for inference.

    A sliced weight is a strided view (or, for a packed projection, a concatenation); oneDNN then re-lays it out on
    every call, a measurable part of a narrow network's CPU latency. Without autograd the contiguous copy is
    memoised, keyed by the slice and validated against the source tensor's storage and version counter, so
    optimizer steps, ``load_state_dict`` and ``.to()`` all invalidate it; ``train()``/``eval()`` drop it, and
    :meth:`clear_weight_memo` does so after writes autograd cannot see (``.data.copy_``, in-place collectives). The
    memo holds at most one copy per width (less than one extra weight set for the usual width lists) and never
    enters the state dict. The class using it sets ``self._weight_memo = {}`` in its constructor.
    """

    _weight_memo: dict

    #: keep contiguous copies of sliced weights for inference (see :meth:`_memoised`)
    cache_inference_weights: bool = True

    def train(self, mode: bool = True):  # type: ignore[override]
        # Writes that bypass autograd's version counter (``.data.copy_``, collectives such as ``dist.broadcast``)
        # cannot be detected by the memo's stamp; dropping it on every train()/eval() switch covers training loops.
        self._weight_memo.clear()
        return super().train(mode)  # type: ignore[misc]

    def clear_weight_memo(self) -> None:
        """Drop the memoised sliced weights (after writing the weights in a way autograd does not see)."""
        self._weight_memo.clear()

    def _memoised(self, key: Hashable, source: torch.Tensor, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``make()``, a tensor sliced from ``source``; when gradients are off, a contiguous copy of it memoised
        under ``key`` and stamped with ``source``'s storage and version."""
        if (
            self.cache_inference_weights
            and not torch.compiler.is_compiling()  # first: dynamo cannot trace is_inference() (a graph break)
            and not torch.jit.is_tracing()
            and not (source.requires_grad and torch.is_grad_enabled())
            and not source.is_inference()  # no version counter to validate a memo against
        ):
            stamp = (source.data_ptr(), source._version, source.dtype, source.device)
            hit = self._weight_memo.get(key)
            if hit is not None and hit[0] == stamp:
                return hit[1]
            copy = make().contiguous()
            self._weight_memo[key] = (stamp, copy)
            return copy
        return make()

    def _memoised_group(
        self,
        key: Hashable,
        sources: tuple[torch.Tensor | None, ...],
        make: Callable[[], tuple[torch.Tensor | None, ...]],
    ) -> tuple[torch.Tensor | None, ...]:
        """:meth:`_memoised` for the tensors one call needs together (``make()`` slices them from ``sources``;
        ``None`` entries stay ``None``): the conditions are checked once and one stamp covers every source.

        At batch 1 a small transformer's narrow width spends more time validating memos than multiplying: a check
        costs ~1 µs, a slice ~2 µs, and a block runs 5 of them. One check per layer and call keeps it near its dense
        export's speed."""
        first = sources[0]
        assert first is not None
        if (
            not self.cache_inference_weights
            or torch.compiler.is_compiling()  # first: dynamo cannot trace is_inference() (a graph break)
            or torch.jit.is_tracing()
            or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in sources))
        ):
            return make()
        stamp: list = [first.dtype, first.device]
        try:
            for t in sources:
                if t is not None:
                    stamp.append(t.data_ptr())
                    stamp.append(t._version)
        except RuntimeError:  # an inference tensor: no version counter to validate a memo against
            return make()
        hit = self._weight_memo.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        copies = tuple(None if t is None else t.contiguous() for t in make())
        self._weight_memo[key] = (stamp, copies)
        return copies


class _SlimOut(_WeightMemo, SlimModule):
    """Shared width logic of layers with a slimmable output dimension (conv, linear)."""

    out_rule: ChannelRule | None
    active_out: int

    @property
    def max_out(self) -> int:
        raise NotImplementedError

    @property
    def channel_rules(self) -> tuple[ChannelRule | None, ...]:
        return (self.out_rule,)

    def _resolve(self, width: float) -> tuple[float, int]:
        c = self.out_rule(width) if self.out_rule is not None else self.max_out
        if c > self.max_out:
            raise ValueError(f"width {width:g} needs {c} channels, more than the {self.max_out} built")
        return (width_key(width), c)

    def _apply_state(self, state: object) -> None:
        self.width, self.active_out = state  # type: ignore[misc]

    def _get_state(self) -> object:
        return (self.width, self.active_out)

    def _set_out_channels(self, channels: int) -> None:
        self.width, self.active_out = None, int(channels)

    def _narrow_weight(self, weight: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """``weight[:rows, :cols]``, contiguous and memoised when gradients are off (see :class:`_WeightMemo`)."""
        return self._memoised((rows, cols), weight, lambda: weight[:rows, :cols])


def _weight_and_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    # A layer's own tensors straight from its parameter dict: ``module.weight`` goes through nn.Module.__getattr__,
    # a Python-level lookup per read that adds up over a MobileNet's forward. Parametrized or pruned layers compute
    # ``weight``: the attribute then gives the computed tensor.
    params = module._parameters
    try:
        return params["weight"], params["bias"]
    except KeyError:
        return module.weight, module.bias


def _take(t: torch.Tensor, *sizes: int) -> torch.Tensor:
    """The leading ``sizes`` block of ``t`` as a new contiguous tensor (never a view of the source)."""
    return t.detach()[tuple(slice(0, s) for s in sizes)].clone(memory_format=torch.contiguous_format)


def _param(t: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=like.requires_grad)


@torch.no_grad()
def _put(dst: torch.Tensor, src: torch.Tensor, where: str) -> None:
    """Copy ``src`` into the leading block of ``dst`` of its shape."""
    if src.dim() != dst.dim() or any(a > b for a, b in zip(src.shape, dst.shape)):
        raise ValueError(f"{where}: a tensor of shape {tuple(src.shape)} does not fit into {tuple(dst.shape)}")
    dst[tuple(slice(0, n) for n in src.shape)].copy_(src)


def _check_size(what: str, got: int, want: int) -> None:
    if got != want:
        raise ValueError(f"{what} is {got} but this layer has {want} at its current setting; set the width first")


def _dense_bn(
    num_features: int,
    eps: float,
    momentum: float | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    stats: nn.modules.batchnorm._BatchNorm | None,
) -> nn.BatchNorm2d:
    """A plain ``BatchNorm2d`` of ``num_features`` with the leading part of ``weight``/``bias`` and of ``stats``'s
    running statistics (``None``: fresh statistics, mean 0 and variance 1)."""
    c = num_features
    bn = nn.BatchNorm2d(c, eps, momentum, affine=weight is not None, device="meta")
    if weight is not None and bias is not None:
        bn.weight = _param(_take(weight, c), weight)
        bn.bias = _param(_take(bias, c), bias)
    if stats is None:
        like = weight if weight is not None else torch.empty(0)
        bn.running_mean = torch.zeros(c, device=like.device, dtype=like.dtype)
        bn.running_var = torch.ones(c, device=like.device, dtype=like.dtype)
        bn.num_batches_tracked = torch.zeros((), dtype=torch.long, device=like.device)
    else:
        bn.running_mean = _take(stats.running_mean, c)
        bn.running_var = _take(stats.running_var, c)
        bn.num_batches_tracked = stats.num_batches_tracked.detach().clone()
    return bn.eval()


@torch.no_grad()
def _load_bn_stats(dst: nn.modules.batchnorm._BatchNorm, src: nn.modules.batchnorm._BatchNorm, where: str) -> None:
    _put(dst.running_mean, src.running_mean, where)
    _put(dst.running_var, src.running_var, where)
    dst.num_batches_tracked.copy_(src.num_batches_tracked)


class SlimConv2d(nn.Conv2d, _SlimOut):
    """``nn.Conv2d`` whose active output channels depend on the width; input channels follow the input.

    Args:
        in_channels: input channels at full width.
        out_channels: output channels at full width (the weight's size).
        kernel_size, stride, padding, dilation, bias: as ``nn.Conv2d``.
        groups: a fixed group count (active channels must stay divisible by it).
        out_rule: maps a width to the active output channels; ``None`` keeps the output at ``out_channels``.
        depthwise: a depthwise convolution (``groups`` = channels at every width, output follows input).

    Shape:
        input ``(N, C_in_active, H, W)`` → output ``(N, C_out_active, H', W')``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        out_rule: ChannelRule | None = None,
        depthwise: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if depthwise:
            if in_channels != out_channels:
                raise ValueError(
                    f"a depthwise conv needs in_channels == out_channels, got {in_channels}, {out_channels}"
                )
            groups = in_channels
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, device=device, dtype=dtype
        )
        if out_rule is not None and depthwise:
            raise ValueError("a depthwise conv's output follows its input; give no out_rule")
        self.out_rule = out_rule
        self.depthwise = depthwise
        self.active_out = out_channels
        self._weight_memo: dict = {}
        if out_rule is not None:
            top = out_rule.max_channels
            if top > out_channels:
                raise ValueError(f"out_rule reaches {top} channels but the conv has {out_channels}")

    @property
    def max_out(self) -> int:
        return self.out_channels

    def to_dense(self, in_channels: int, *, fresh_stats: bool = False) -> nn.Conv2d:
        """``nn.Conv2d`` holding ``weight[:active_out, :in_channels // groups]`` (depthwise: ``weight[:in_channels]``
        with ``groups = in_channels``)."""
        cin = int(in_channels)
        cout, groups = self._dense_sizes(cin)
        conv = nn.Conv2d(
            cin,
            cout,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            groups,
            self.bias is not None,
            self.padding_mode,
            device="meta",
        )
        conv.weight = _param(_take(self.weight, cout, cin // groups), self.weight)
        if self.bias is not None:
            conv.bias = _param(_take(self.bias, cout), self.bias)
        return conv.eval()

    def load_dense(self, dense: nn.Module) -> None:
        if not isinstance(dense, nn.Conv2d):
            raise ValueError(f"SlimConv2d loads an nn.Conv2d, got {type(dense).__name__}")
        cout, groups = self._dense_sizes(dense.in_channels)
        _check_size("the dense conv's output channels", dense.out_channels, cout)
        _check_size("the dense conv's groups", dense.groups, groups)
        _put(self.weight, dense.weight, "SlimConv2d.weight")
        if self.bias is not None and dense.bias is not None:
            _put(self.bias, dense.bias, "SlimConv2d.bias")
        self.clear_weight_memo()

    def active_params(self, in_channels: int) -> int:
        cout, groups = self._dense_sizes(int(in_channels))
        kh, kw = self.kernel_size
        return cout * (int(in_channels) // groups) * kh * kw + (cout if self.bias is not None else 0)

    def active_slices(self, in_channels: int) -> list[tuple[nn.Parameter, tuple[slice, ...]]]:
        cout, groups = self._dense_sizes(int(in_channels))
        rows = slice(0, cout)
        out = [(self.weight, (rows, slice(0, int(in_channels) // groups)))]
        return out + ([(self.bias, (rows,))] if self.bias is not None else [])

    def _dense_sizes(self, cin: int) -> tuple[int, int]:
        """``(out_channels, groups)`` of the dense conv for ``cin`` input channels."""
        if self.depthwise:
            return cin, cin
        if cin % self.groups:
            raise ValueError(f"{cin} input channels are not divisible by the conv's {self.groups} groups")
        return int(self.active_out), self.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cin = x.shape[1]
        weight, bias = _weight_and_bias(self)
        if self.depthwise:
            if cin != self.in_channels:  # weight[:cin] of a contiguous (C, 1, k, k) tensor is contiguous already
                weight = weight[:cin]
                bias = None if bias is None else bias[:cin]
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, cin)
        cout = self.active_out
        if cout != self.out_channels or cin != self.in_channels:
            weight = self._narrow_weight(weight, cout, cin // self.groups)
            bias = None if bias is None else bias[:cout]
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.depthwise:
            s += ", depthwise=True"
        if self.out_rule is not None:
            s += f", widths={self.out_rule.describe()}"
        return s


class SlimLinear(nn.Linear, _SlimOut):
    """``nn.Linear`` whose input features follow the input and whose outputs optionally depend on the width.

    Shape:
        input ``(*, F_in_active)`` → output ``(*, F_out_active)``.
    """

    channel_dim = -1  # features are the last dimension

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        out_rule: ChannelRule | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.out_rule = out_rule
        self.active_out = out_features
        self._weight_memo: dict = {}

    @property
    def max_out(self) -> int:
        return self.out_features

    def to_dense(self, in_channels: int, *, fresh_stats: bool = False) -> nn.Linear:
        """``nn.Linear`` holding ``weight[:active_out, :in_channels]``."""
        fin, fout = int(in_channels), int(self.active_out)
        lin = nn.Linear(fin, fout, self.bias is not None, device="meta")
        lin.weight = _param(_take(self.weight, fout, fin), self.weight)
        if self.bias is not None:
            lin.bias = _param(_take(self.bias, fout), self.bias)
        return lin.eval()

    def load_dense(self, dense: nn.Module) -> None:
        if not isinstance(dense, nn.Linear):
            raise ValueError(f"SlimLinear loads an nn.Linear, got {type(dense).__name__}")
        _check_size("the dense linear layer's output features", dense.out_features, int(self.active_out))
        _put(self.weight, dense.weight, "SlimLinear.weight")
        if self.bias is not None and dense.bias is not None:
            _put(self.bias, dense.bias, "SlimLinear.bias")
        self.clear_weight_memo()

    def active_params(self, in_channels: int) -> int:
        fout = int(self.active_out)
        return fout * int(in_channels) + (fout if self.bias is not None else 0)

    def active_slices(self, in_channels: int) -> list[tuple[nn.Parameter, tuple[slice, ...]]]:
        rows = slice(0, int(self.active_out))
        out = [(self.weight, (rows, slice(0, int(in_channels))))]
        return out + ([(self.bias, (rows,))] if self.bias is not None else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fin = x.shape[-1]
        fout = self.active_out
        weight, bias = _weight_and_bias(self)
        if fin == self.in_features and fout == self.out_features:
            return F.linear(x, weight, bias)
        full_w, full_b, out = weight, bias, self.out_features

        def make() -> tuple[torch.Tensor, torch.Tensor | None]:
            b = full_b if full_b is None or fout == out else full_b[:fout]
            return full_w[:fout, :fin], b

        weight, bias = self._memoised_group(("linear", fout, fin), (full_w, full_b), make)
        return F.linear(x, weight, bias)


class SwitchableBatchNorm2d(SlimModule):
    """One ``BatchNorm2d`` per width (the S-Nets' switchable BN): each switch keeps its own statistics and affine.

    ``bn[i]`` belongs to the i-th smallest width, which is the official checkpoints' layout.

    Args:
        rule: the channel count of each width (a :class:`WidthTable`).
        eps, momentum: as ``nn.BatchNorm2d``.
    """

    def __init__(
        self,
        rule: WidthTable,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(rule, WidthTable):
            raise TypeError(f"SwitchableBatchNorm2d needs a WidthTable, got {type(rule).__name__}")
        self.rule = rule
        self.bn = nn.ModuleList(
            nn.BatchNorm2d(c, eps=eps, momentum=momentum, device=device, dtype=dtype) for c in rule.channels
        )
        self.num_features = rule.max_channels
        self.index: int | None = len(self.bn) - 1
        self.width = rule.widths[-1]

    @property
    def channel_rules(self) -> tuple[ChannelRule, ...]:
        return (self.rule,)

    def _resolve(self, width: float) -> tuple[float, int]:
        return (width_key(width), self.rule.index(width))

    def _apply_state(self, state: object) -> None:
        self.width, self.index = state  # type: ignore[misc]

    def _get_state(self) -> object:
        return (self.width, self.index)

    def _set_custom(self) -> None:
        self.width = None

    def _switch_for(self, cin: int) -> int:
        """The switch :meth:`forward` uses for ``cin`` input channels."""
        idx = self.index
        if self.width is None and (idx is None or self.bn[idx].num_features != cin):
            idx = self._index_for_channels(cin)
        assert idx is not None
        if self.bn[idx].num_features != cin:
            raise ValueError(f"switch {idx} normalises {self.bn[idx].num_features} channels but receives {cin}")
        return idx

    def to_dense(self, in_channels: int, *, fresh_stats: bool = False) -> nn.BatchNorm2d:
        """A copy of the switch :meth:`forward` uses (the active one; after ``set_channels`` one of this size)."""
        bn = self.bn[self._switch_for(int(in_channels))]
        return _dense_bn(bn.num_features, bn.eps, bn.momentum, bn.weight, bn.bias, None if fresh_stats else bn)

    def load_dense(self, dense: nn.Module) -> None:
        if not isinstance(dense, nn.BatchNorm2d):
            raise ValueError(f"SwitchableBatchNorm2d loads an nn.BatchNorm2d, got {type(dense).__name__}")
        bn = self.bn[self._switch_for(dense.num_features)]
        bn.load_state_dict(dense.state_dict())

    def active_params(self, in_channels: int) -> int:
        # In eval mode the active switch is applied without calling it as a module: its affine counts here.
        return 2 * int(in_channels) if self.bn[0].affine else 0

    def active_slices(self, in_channels: int) -> list[tuple[nn.Parameter, tuple[slice, ...]]]:
        bn = self.bn[self._switch_for(int(in_channels))]
        return [(p, (slice(None),)) for p in bn.parameters()]

    def stat_layers(self) -> list[nn.modules.batchnorm._BatchNorm]:
        if self.index is None or self.width is None:
            raise ValueError("calibrate_bn needs a uniform width; per-layer channel specs have no switch to fill")
        return [self.bn[self.index]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.index
        # The switches by plain dict lookups: ``self.bn[idx]`` (ModuleList indexing) is slow enough in Python to show
        # in a narrow MobileNet v2's batch-1 CPU latency. ModuleList keys its children "0", "1", ...
        switches = self._modules["bn"]._modules
        if self.width is None and (idx is None or switches[str(idx)].num_features != x.shape[1]):
            idx = self._index_for_channels(x.shape[1])
        bn = switches[str(idx)]
        if bn.training or not bn.track_running_stats:  # the switch's own mode (BN calibration trains it alone)
            return bn(x)
        # Inference: normalise with the switch's statistics directly, skipping a nested module call and reading
        # its tensors from the module's dicts instead of ``bn.weight``-style attribute reads: together a few
        # percent of a narrow MobileNet's batch-1 latency.
        buffers, params = bn._buffers, bn._parameters
        try:
            mean, var, weight, bias = buffers["running_mean"], buffers["running_var"], params["weight"], params["bias"]
        except KeyError:  # a parametrized or pruned switch computes its weight: let the module run
            return bn(x)
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, bn.eps)

    def _index_for_channels(self, c: int) -> int:
        # After set_channels the width is undefined: keep the current switch where its size fits, else use the
        # widest switch with exactly this many channels.
        for i in range(len(self.bn) - 1, -1, -1):
            if self.bn[i].num_features == c:
                return i
        raise ValueError(
            f"no switch of this SwitchableBatchNorm2d has {c} channels (it has {list(self.rule.channels)}); "
            "arbitrary channel counts need a universally slimmable model (USBatchNorm2d) and BN calibration"
        )


class USBatchNorm2d(nn.BatchNorm2d, SlimModule):
    """Universally slimmable BN: one shared affine (sliced), running statistics kept per calibrated width.

    The affine ``weight``/``bias`` have the full size and are sliced like convolution weights; ``bn[i]`` holds
    the statistics (no affine) of the i-th width in ``stat_widths``, the official US checkpoints' layout. At a
    width with no statistics the layer normalises with batch statistics in training mode and refuses to run in
    eval mode (the statistics would be wrong for every width, the very failure S-Nets fix).

    Args:
        rule: channel count for any width in a range (:class:`WidthRange`).
        stat_widths: widths that keep running statistics (trained or calibrated).
    """

    def __init__(
        self,
        rule: WidthRange,
        stat_widths: Sequence[float] = (),
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            rule.max_channels, eps, momentum, affine=True, track_running_stats=False, device=device, dtype=dtype
        )
        self.rule = rule
        self.stat_widths = tuple(width_key(w) for w in stat_widths)
        self.bn = nn.ModuleList(
            nn.BatchNorm2d(rule(w), eps=eps, momentum=momentum, affine=False, device=device, dtype=dtype)
            for w in self.stat_widths
        )
        self.width = width_key(rule.hi)
        self.active_out = rule.max_channels
        self.stat_index: int | None = self.stat_widths.index(self.width) if self.width in self.stat_widths else None

    @property
    def channel_rules(self) -> tuple[ChannelRule, ...]:
        return (self.rule,)

    def _resolve(self, width: float) -> tuple[float, int, int | None]:
        c = self.rule(width)
        k = width_key(width)
        return (k, c, self.stat_widths.index(k) if k in self.stat_widths else None)

    def _apply_state(self, state: object) -> None:
        self.width, self.active_out, self.stat_index = state  # type: ignore[misc]

    def _set_custom(self) -> None:
        # Per-layer channel specs mix widths: no stored statistics fit, so normalise with batch statistics
        # (training mode; AutoSlim's search evaluates candidates this way).
        self.width, self.stat_index = None, None

    def add_stat_width(self, width: float) -> int:
        """Add a statistics slot for ``width`` (used by BN calibration); returns its index.

        Raises:
            ValueError: ``width`` is outside the layer's range.
        """
        k = width_key(width)
        if k in self.stat_widths:
            return self.stat_widths.index(k)
        # Slots stay sorted by width, so a model rebuilt with the same stat_widths has the same state-dict keys.
        widths = sorted((*self.stat_widths, k))
        i = widths.index(k)
        bn = nn.BatchNorm2d(self.rule(k), eps=self.eps, momentum=self.momentum, affine=False, device=self.weight.device)
        self.bn.insert(i, bn)
        self.stat_widths = tuple(widths)
        if self.width is not None:
            self.stat_index = widths.index(self.width) if self.width in widths else None
        return i

    def _get_state(self) -> object:
        return (self.width, self.active_out, self.stat_index)

    adds_stat_widths = True

    def missing_stats(self) -> str | None:
        if self.stat_index is not None:
            return None
        return f"no BN statistics (stored for widths {self.stat_widths})"

    def to_dense(self, in_channels: int, *, fresh_stats: bool = False) -> nn.BatchNorm2d:
        """``nn.BatchNorm2d`` with the shared affine sliced to ``in_channels`` and the statistics of the width."""
        c, idx = int(in_channels), self.stat_index
        if not fresh_stats and (idx is None or self.bn[idx].num_features != c):
            raise ValueError(
                f"no BN statistics for {c} channels (stored for widths {self.stat_widths}); calibrate BN statistics "
                "for these channels first"
            )
        return _dense_bn(c, self.eps, self.momentum, self.weight, self.bias, None if fresh_stats else self.bn[idx])

    def load_dense(self, dense: nn.Module) -> None:
        if not isinstance(dense, nn.BatchNorm2d) or not dense.affine:
            raise ValueError(f"USBatchNorm2d loads an affine nn.BatchNorm2d, got {dense!r}")
        _put(self.weight, dense.weight, "USBatchNorm2d.weight")
        _put(self.bias, dense.bias, "USBatchNorm2d.bias")
        idx = self.stat_index
        if idx is not None and self.bn[idx].num_features == dense.num_features and dense.running_mean is not None:
            _load_bn_stats(self.bn[idx], dense, "USBatchNorm2d statistics")

    def active_params(self, in_channels: int) -> int:
        return 2 * int(in_channels)

    def stat_layers(self) -> list[nn.modules.batchnorm._BatchNorm]:
        if self.width is None or self.stat_index is None:
            raise ValueError(
                "calibrate_bn needs a uniform width with a statistics slot (add_stat_widths first); per-layer "
                "channel specs are calibrated by calibrate_channels"
            )
        return [self.bn[self.stat_index]]

    def calibration_modules(self) -> list[nn.Module]:
        # forward picks stored or batch statistics by this module's own mode: it trains alongside its slot
        return [*self.stat_layers(), self]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        weight, bias = self.weight[:c], self.bias[:c]
        idx = self.stat_index
        if idx is not None and self.bn[idx].num_features == c:
            bn = self.bn[idx]
            factor = 0.0
            if self.training:
                # As nn.BatchNorm2d: momentum None means a cumulative average (used by BN calibration).
                bn.num_batches_tracked.add_(1)
                factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            return F.batch_norm(x, bn.running_mean, bn.running_var, weight, bias, self.training, factor, self.eps)
        if not self.training:
            if self.width is None:
                raise RuntimeError(
                    f"USBatchNorm2d has no statistics for a per-layer channel spec ({c} channels here); stored "
                    "statistics are per uniform width. Re-estimate them for the spec with "
                    "slimmable.train.calibrate_channels (CLI: slimmable calibrate --channels SPEC.json)"
                )
            raise RuntimeError(
                f"USBatchNorm2d has no statistics for width {self.width} ({c} channels); its calibrated widths are "
                f"{self.stat_widths}. Calibrate BN statistics for this width first"
            )
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)


class SharedBatchNorm2d(nn.BatchNorm2d, SlimModule):
    """One BatchNorm2d shared by every width, sliced like a convolution (affine *and* running statistics).

    This is naive slimmable training's BN, kept as the baseline the paper shows failing: each channel's mean and
    variance depend on how many input channels are active, so one set of running statistics is wrong for every
    width at test time. Re-estimating the statistics for a width (:func:`slimmable.train.calibrate_bn`) right
    before evaluating it shows where the failure comes from.
    """

    def __init__(
        self,
        rule: ChannelRule,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(rule.max_channels, eps, momentum, device=device, dtype=dtype)
        self.rule = rule
        self.width = width_key(rule.widths[-1])

    @property
    def channel_rules(self) -> tuple[ChannelRule, ...]:
        return (self.rule,)

    def _resolve(self, width: float) -> float:
        self.rule(width)  # validates
        return width_key(width)

    def _apply_state(self, state: object) -> None:
        self.width = state  # type: ignore[assignment]

    def _get_state(self) -> object:
        return self.width

    def _set_custom(self) -> None:
        self.width = None

    stats_shared_by_widths = True

    def to_dense(self, in_channels: int, *, fresh_stats: bool = False) -> nn.BatchNorm2d:
        """``nn.BatchNorm2d`` with the affine and the shared running statistics sliced to ``in_channels``."""
        c = int(in_channels)
        return _dense_bn(c, self.eps, self.momentum, self.weight, self.bias, None if fresh_stats else self)

    def load_dense(self, dense: nn.Module) -> None:
        if not isinstance(dense, nn.BatchNorm2d) or not dense.affine:
            raise ValueError(f"SharedBatchNorm2d loads an affine nn.BatchNorm2d, got {dense!r}")
        _put(self.weight, dense.weight, "SharedBatchNorm2d.weight")
        _put(self.bias, dense.bias, "SharedBatchNorm2d.bias")
        if dense.running_mean is not None:
            _load_bn_stats(self, dense, "SharedBatchNorm2d statistics")

    def active_params(self, in_channels: int) -> int:
        return 2 * int(in_channels)

    def stat_layers(self) -> list[nn.modules.batchnorm._BatchNorm]:
        return [self]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        factor = 0.0
        if self.training:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        # Slices of the buffers are views: training updates the shared statistics in place.
        return F.batch_norm(
            x,
            self.running_mean[:c],
            self.running_var[:c],
            self.weight[:c],
            self.bias[:c],
            self.training,
            factor,
            self.eps,
        )


def create_norm(rule: ChannelRule | None, channels: int, stat_widths: Sequence[float] = ()) -> nn.Module:
    """Pick the norm layer for a rule: switchable BN for a width table, US BN for a range, plain BN for none."""
    if rule is None:
        return nn.BatchNorm2d(channels)
    if isinstance(rule, WidthTable):
        return SwitchableBatchNorm2d(rule)
    if isinstance(rule, WidthRange):
        return USBatchNorm2d(rule, stat_widths)
    raise TypeError(f"no norm layer for channel rule {type(rule).__name__}")
