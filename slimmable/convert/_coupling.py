"""Coupled channels of a traced model.

Every tensor in the graph gets a *layout*: the dimension that holds slimmable channels and the segments that
dimension is made of. A segment ``(group, unit)`` holds ``unit * count(group, w)`` channels at width ``w``, the
first ones of its ``unit * size(group)`` full-width channels. A convolution's or linear layer's output is one
new group (unit 1); a concatenation joins segment lists; ``flatten`` multiplies units by ``H*W`` (a linear layer
after it takes blocks of ``H*W`` features per channel); adding or multiplying two tensors ties their groups
(union-find). A group that meets something the analysis does not understand (an unknown operation or module, the
model's output, the input) is *frozen*: it keeps all its channels at every width, and so does everything tied
to it.

Channel split (``chunk``) and the reshape of a channel shuffle keep their structure: a concatenation of ``k``
equal parts split in ``k`` gives the parts back; a single slimmed prefix split in ``k`` gives ``k`` equal parts
of the active channels (the narrower network of the same architecture).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..nn.converted_attention import attention_support
from ._equiv import Equivalent, equivalent, is_elementwise
from ._trace import LEAF_TYPES

#: why the residual stream of a transformer keeps its width: by design, not a failure of the analysis
KEPT_STREAM = "residual stream (embedding dimension) kept at full width by design; attention heads and MLP units slim"

Seg = tuple[int, Fraction]  # (group id, unit)


@dataclass(frozen=True)
class Layout:
    """The slimmable dimension ``dim`` of a tensor (non-negative) and its segments."""

    dim: int
    segs: tuple[Seg, ...]


@dataclass
class Group:
    """Channels that must keep equal counts at every width (tied by adds, multiplies, shuffles)."""

    size: int
    producers: list[str] = field(default_factory=list)
    divisor: int = 1
    frozen: str | None = None  # why, when frozen


class Groups:
    """Union-find over channel groups."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.info: list[Group] = []

    def new(self, size: int, producer: str | None = None, frozen: str | None = None) -> int:
        g = len(self.parent)
        self.parent.append(g)
        self.info.append(Group(size, [producer] if producer else [], 1, frozen))
        return g

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def get(self, g: int) -> Group:
        return self.info[self.find(g)]

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return True
        ia, ib = self.info[ra], self.info[rb]
        if ia.size != ib.size:
            return False
        self.parent[rb] = ra
        ia.producers += ib.producers
        ia.divisor = math.lcm(ia.divisor, ib.divisor)
        ia.frozen = ia.frozen or ib.frozen
        return True

    def freeze(self, g: int, why: str) -> None:
        info = self.get(g)
        if info.frozen is None:
            info.frozen = why

    def need_multiple(self, seg: Seg, m: int) -> None:
        """Counts of ``seg`` (``unit * count``) must be multiples of ``m``."""
        g, unit = seg
        q = m * unit.denominator
        d = q // math.gcd(unit.numerator, q)
        info = self.get(g)
        info.divisor = math.lcm(info.divisor, d)

    def roots(self) -> list[int]:
        return [g for g in range(len(self.parent)) if self.find(g) == g]


_UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.PReLU,
    nn.ELU, nn.Mish, nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Hardtanh, nn.Softplus,
)  # fmt: skip
_UNARY_FUNCTIONS = {
    F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.dropout, F.leaky_relu,
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d, F.max_pool2d, F.hardtanh, F.elu, F.mish,
    torch.relu, torch.sigmoid, torch.tanh, operator.neg, torch.nn.functional.interpolate, torch.clone,
    torch.exp, torch.abs, torch.sqrt, torch.rsqrt, torch.softmax, F.softmax,
}  # fmt: skip
_UNARY_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "contiguous", "clone", "float", "to", "detach", "exp", "abs",
    "sqrt", "rsqrt", "type_as", "half", "bfloat16", "softmax",
}  # fmt: skip
_BINARY = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul, operator.isub,
    torch.add, torch.sub, torch.mul, torch.div,
}  # fmt: skip
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_META_FUNCTIONS = {getattr, operator.floordiv, operator.truediv, operator.mul, operator.add, operator.sub}
_META_METHODS = {"size", "dim"}


def _tmeta(node: fx.Node) -> Any:
    return node.meta.get("tensor_meta")


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    tm = _tmeta(node)
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def _is_tensor_node(x: Any) -> bool:
    return isinstance(x, fx.Node) and _shape(x) is not None


def _where(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack), "") if stack else ""
    if isinstance(path, str) and path.startswith("L__self__"):  # dynamo-style keys: fall back to the value
        path = ""
    if not path and stack:
        path = str(list(stack.values())[-1][0]) if isinstance(list(stack.values())[-1], tuple) else ""
    return path or "the model's forward"


def _op_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return f"Tensor.{t}"
    if node.op == "call_module":
        return str(t)
    return getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)


@dataclass
class Analysis:
    """Result of :func:`analyse`."""

    groups: Groups
    layouts: dict[fx.Node, Any]  # Layout | None | tuple (multi-output) | "meta"
    params: dict[fx.Node, Layout]  # get_attr nodes to slice, with the layout they must take
    frozen_ops: list[tuple[str, str]]  # (where, why) of operations and modules that froze channels
    channel_first_norms: set[str]
    equivalents: dict[str, Equivalent] = field(default_factory=dict)  # leaf module path -> what it computes
    # nodes whose constant channel sizes become per-width ones: ("chunk", k, dim), ("select", dim, segs, (i, j)),
    # ("split", dim, segs, ((i, j), ...))
    rewrites: dict[fx.Node, tuple] = field(default_factory=dict)
    attention: set[str] = field(default_factory=set)  # attention modules to replace by slimmable ones (heads slim)


class _Analyser:
    def __init__(self, gm: fx.GraphModule, leaves: dict[str, str]) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.leaves = leaves
        self.g = Groups()
        self.env: dict[fx.Node, Any] = {}
        self.params: dict[fx.Node, Layout] = {}
        self.frozen_ops: list[tuple[str, str]] = []
        self.module_calls: dict[str, int] = {}
        self.channel_first_norms: set[str] = set()
        self.equivalents: dict[str, Equivalent] = {}
        self.rewrites: dict[fx.Node, tuple] = {}
        self.attention: set[str] = set()

    # -- helpers -----------------------------------------------------------------------------------------------

    def freeze_value(self, v: Any, why: str) -> None:
        if isinstance(v, Layout):
            for g, _ in v.segs:
                self.g.freeze(g, why)
        elif isinstance(v, tuple):
            for x in v:
                self.freeze_value(x, why)

    def freeze_inputs(self, node: fx.Node, why: str) -> None:
        recorded = False
        for a in node.all_input_nodes:
            v = self.env.get(a)
            if self._has_slim(v):
                self.freeze_value(v, f"{why} ({_where(node)})")
                recorded = True
        if recorded:
            self.frozen_ops.append((_where(node), why))

    def _has_slim(self, v: Any) -> bool:
        if isinstance(v, Layout):
            return any(self.g.get(g).frozen is None for g, _ in v.segs)
        if isinstance(v, tuple):
            return any(self._has_slim(x) for x in v)
        return False

    def full_segs(self, size: int) -> tuple[Seg, ...]:
        return ((self.g.new(size, frozen="not slimmable (full channels)"), Fraction(1)),)

    def seg_full(self, seg: Seg) -> Fraction:
        return self.g.get(seg[0]).size * seg[1]

    def same_segs(self, a: tuple[Seg, ...], b: tuple[Seg, ...]) -> bool:
        """Tie two segment lists position by position; ``False`` (nothing tied) when they cannot match."""
        if len(a) != len(b):
            return False
        for (ga, ua), (gb, ub) in zip(a, b):
            if ua != ub or self.g.get(ga).size != self.g.get(gb).size:
                return False
        for (ga, _), (gb, _) in zip(a, b):
            self.g.union(ga, gb)
        return True

    def split_blocks(self, segs: tuple[Seg, ...], k: int) -> tuple[Seg, ...] | None:
        """The segments of each of ``k`` equal parts of ``segs`` (ties the parts), or ``None``."""
        if k == 1:
            return segs
        if len(segs) % k == 0:
            n = len(segs) // k
            blocks = [segs[i * n : (i + 1) * n] for i in range(k)]
            if all(self.same_segs(blocks[0], b) for b in blocks[1:]):
                return blocks[0]
            return None
        if len(segs) == 1:
            g, u = segs[0]
            self.g.need_multiple(segs[0], k)
            return ((g, u / k),)
        return None

    # -- the walk ----------------------------------------------------------------------------------------------

    def run(self) -> Analysis:
        for node in self.gm.graph.nodes:
            try:
                self.env[node] = self.visit(node)
            except Exception as err:  # never crash deep inside: freeze what this node touches, say why
                why = f"{_op_name(node)} not analysed ({type(err).__name__}: {err})"
                self.freeze_inputs(node, why)
                self.frozen_ops.append((_where(node), why))
                self.env[node] = self._unknown_output(node)
        self.mark_kept_stream()
        return Analysis(
            self.g, self.env, self.params, self.frozen_ops, self.channel_first_norms, self.equivalents, self.rewrites,
            self.attention,
        )  # fmt: skip

    def _unknown_output(self, node: fx.Node) -> Any:
        tm = _tmeta(node)
        if isinstance(tm, (tuple, list)) and not hasattr(tm, "shape"):
            return tuple(None for _ in tm)
        return None if tm is not None else "meta"

    def visit(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return None
        if node.op == "get_attr":
            return None
        if node.op == "output":
            for a in node.all_input_nodes:
                self.freeze_value(self.env.get(a), "model output (keeps the original's shape)")
            return None
        if node.op == "call_module":
            return self.visit_module(node)
        return self.visit_function(node)

    def visit_module(self, node: fx.Node) -> Any:
        path = str(node.target)
        m = self.modules[path]
        n_calls = self.module_calls.get(path, 0) + 1
        self.module_calls[path] = n_calls
        x = node.args[0] if node.args else None
        lay = self.env.get(x) if isinstance(x, fx.Node) else None
        stateless = not any(True for _ in m.parameters()) and not any(True for _ in m.buffers())
        if n_calls > 1 and not stateless:
            self.freeze_inputs(node, f"module {path} is called more than once")
            return self._unknown_output(node)
        if path in self.leaves:
            self.freeze_inputs(node, f"cannot be traced: {self.leaves[path]}")
            return self._unknown_output(node)
        if attention_support(m) != "":
            return self.visit_attention(node, m, lay)
        kind = type(m)
        if isinstance(m, LEAF_TYPES) and kind not in (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.GroupNorm):
            x_shape = _shape(x) if isinstance(x, fx.Node) else None
            eq = equivalent(m, x_shape) if x_shape is not None and not node.kwargs and len(node.args) == 1 else None
            if eq is not None:  # a subclass computing the base layer (timm's BatchNormAct2d, Linear, ...)
                self.equivalents[path] = eq
                kind = eq.base
        if kind is nn.Conv2d:
            return self.visit_conv(node, m, lay)
        if kind is nn.Linear:
            shape = _shape(node)
            if lay is not None and lay.dim != len(shape) - 1:
                self.freeze_value(lay, f"linear layer {path} applied along another dimension")
            g = self.g.new(m.out_features, path)
            return Layout(len(shape) - 1, ((g, Fraction(1)),))
        if kind is nn.BatchNorm2d:
            if not (m.affine and m.track_running_stats):
                self.freeze_inputs(node, "BatchNorm without affine or running statistics")
                return None
            return lay
        if kind is nn.GroupNorm:
            if lay is not None:
                if lay.dim != 1:
                    self.freeze_value(lay, f"GroupNorm {path} along another dimension")
                    return None
                for s in lay.segs:
                    self.g.need_multiple(s, m.num_groups)
            return lay
        if isinstance(m, nn.LayerNorm):
            return self.visit_layer_norm(node, m, lay)
        if isinstance(m, _UNARY_MODULES) or type(m).__name__ == "StochasticDepth":
            return lay
        if type(m) is nn.Flatten:
            return self.reshape(node, lay, check_args=False)
        if isinstance(m, LEAF_TYPES):
            why = f"{type(m).__name__} (a subclass with its own forward) is not converted"
            self.freeze_inputs(node, why)
            self.frozen_ops.append((path, why))  # its own channels stay full too, whatever its input
            return self._unknown_output(node)
        if stateless and _is_tensor_node(x) and _shape(node) == _shape(x) and is_elementwise(m, _shape(x)):
            return lay  # an activation the lists above do not name
        self.freeze_inputs(node, f"module {type(m).__name__} is not understood")
        return self._unknown_output(node)

    def mark_kept_stream(self) -> None:
        """Label the frozen groups of the residual stream around converted attention layers as kept by design.

        The stream is often frozen before the first attention layer is reached (a class token concatenated, a
        padding to whole windows): those groups keep their width either way, and the report should not list them
        as failures. From each attention layer's input and output, the walk follows the tensors that hold the
        stream's features (a dimension of that size) through everything but layers that produce new features
        (linear, convolution, attention), whose own output group it labels when it reaches them from that output.
        Only the label changes: what slims stays as the analysis found it."""
        stack: list[tuple[fx.Node, int]] = []
        for node in self.gm.graph.nodes:
            if node.op == "call_module" and str(node.target) in self.attention and _is_tensor_node(node.args[0]):
                c = _shape(node.args[0])[-1]
                stack += [(node.args[0], c)] + [(u, c) for u in node.users]
        seen: set[fx.Node] = set()
        while stack:
            node, c = stack.pop()
            if node in seen or not _is_tensor_node(node) or c not in _shape(node):
                continue
            seen.add(node)
            lay = self.env.get(node)
            if isinstance(lay, Layout):
                for g, _ in lay.segs:
                    info = self.g.get(g)
                    if info.frozen is not None and info.size == c:
                        info.frozen = KEPT_STREAM
            if not self._makes_features(node):
                stack += [(a, c) for a in node.all_input_nodes]
            stack += [(u, c) for u in node.users if not self._makes_features(u)]

    def _makes_features(self, node: fx.Node) -> bool:
        if node.op != "call_module":
            return False
        m = self.modules[str(node.target)]
        return isinstance(m, (nn.Linear, nn.Conv2d)) or attention_support(m) != ""

    def visit_attention(self, node: fx.Node, m: nn.Module, lay: Layout | None) -> Any:
        """An attention module replaced whole by a slimmable one: its heads slim inside it; the residual stream it
        reads and writes (its input and its output) keeps its width (:data:`KEPT_STREAM`)."""
        path = str(node.target)
        why = attention_support(m)
        why = _attention_call(node, m) if why is None else why
        if why is not None:
            self.freeze_inputs(node, f"attention {path} not converted: {why}")
            self.frozen_ops.append((path, f"attention not converted: {why}"))
            return self._unknown_output(node)
        tm = _tmeta(node)
        multi = not hasattr(tm, "shape")  # nn.MultiheadAttention: (output, weights)
        shape = tuple((tm[0] if multi else tm).shape)
        if isinstance(lay, Layout):
            for g, _ in lay.segs:
                self.g.get(g).frozen = KEPT_STREAM  # replaces a reason met earlier (cls token, padding, ...)
        out = Layout(len(shape) - 1, ((self.g.new(shape[-1], path, frozen=KEPT_STREAM), Fraction(1)),))
        self.attention.add(path)
        return (out, None) if multi else out

    def visit_conv(self, node: fx.Node, m: nn.Conv2d, lay: Layout | None) -> Layout:
        path = str(node.target)
        if lay is not None and lay.dim != 1:
            self.freeze_value(lay, f"convolution {path} over a permuted tensor")
            lay = None
        depthwise = m.groups == m.in_channels == m.out_channels and m.groups > 1
        if depthwise:
            return lay if lay is not None else Layout(1, self.full_segs(m.out_channels))
        if m.groups > 1 and lay is not None:
            for s in lay.segs:
                self.g.need_multiple(s, m.groups)
        g = self.g.new(m.out_channels, path)
        if m.groups > 1:
            self.g.need_multiple((g, Fraction(1)), m.groups)
        return Layout(1, ((g, Fraction(1)),))

    def visit_layer_norm(self, node: fx.Node, m: nn.LayerNorm, lay: Layout | None) -> Any:
        path = str(node.target)
        shape = _shape(node)
        if len(m.normalized_shape) != 1:
            self.freeze_inputs(node, "LayerNorm over several dimensions")
            return None
        c = m.normalized_shape[0]
        if type(m) is nn.LayerNorm:
            dim = len(shape) - 1
        elif len(shape) >= 2 and shape[1] == c and _is_channel_first_ln(m, shape):
            dim = 1
            self.channel_first_norms.add(path)
        else:
            self.freeze_inputs(node, f"{type(m).__name__}: normalised dimension not recognised")
            return None
        if lay is not None and lay.dim != dim:
            return lay  # normalises a full dimension; slimmed channels elsewhere pass through
        return lay

    def visit_function(self, node: fx.Node) -> Any:
        t = node.target
        meth = node.op == "call_method"
        args = node.args
        x = args[0] if args else None
        lay = self.env.get(x) if isinstance(x, fx.Node) else None
        if _tmeta(node) is None and not meth and t is not operator.getitem:
            return "meta"  # size arithmetic, asserts
        if (meth and t in _META_METHODS) or (not meth and t is getattr):
            return "meta"
        if (meth and t in _UNARY_METHODS) or (not meth and t in _UNARY_FUNCTIONS):
            others = [a for a in node.all_input_nodes[1:] if self._has_slim(self.env.get(a))]
            if others:
                self.freeze_inputs(node, f"{_op_name(node)} with several slimmed inputs")
                return None
            return lay
        if (meth and t in _BINARY_METHODS) or (not meth and t in _BINARY):
            return self.broadcast(node, [a for a in args[:2]])
        if not meth and t in (torch.cat, torch.concat):
            return self.cat(node)
        if (meth and t in ("flatten", "squeeze", "unsqueeze")) or (
            not meth and t in (torch.flatten, torch.squeeze, torch.unsqueeze)
        ):
            return self.reshape(node, lay, check_args=False)
        if meth and t == "expand_as":
            return self.broadcast(node, list(args[:2]))
        if meth and t == "expand":
            if lay is None:
                return None
            d = lay.dim + len(_shape(node)) - len(_shape(x))
            if _dynamic_arg(node, d):
                return Layout(d, lay.segs)
            self.freeze_inputs(node, "Tensor.expand with a fixed channel count")
            return None
        if (meth and t in ("view", "reshape")) or (not meth and t is torch.reshape):
            return self.reshape(node, lay, check_args=True)
        if (meth and t == "permute") or (not meth and t is torch.permute):
            dims = args[1:] if meth else args[1]
            if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                dims = dims[0]
            if lay is None:
                return None
            nd = len(dims)
            dims = [d % nd for d in dims]
            return Layout(dims.index(lay.dim), lay.segs)
        if (meth and t == "transpose") or (not meth and t is torch.transpose):
            if lay is None:
                return None
            nd = len(_shape(node))
            a, b = args[1] % nd, args[2] % nd
            d = b if lay.dim == a else a if lay.dim == b else lay.dim
            return Layout(d, lay.segs)
        if (meth and t == "chunk") or (not meth and t is torch.chunk):
            return self.chunk(node, lay)
        if (meth and t == "split") or (not meth and t is torch.split):
            return self.split(node, lay)
        if not meth and t is torch.stack:
            return self.stack(node)
        if (meth and t in ("mean", "sum", "amax")) or (not meth and t in (torch.mean, torch.sum, torch.amax)):
            return self.reduce(node, lay)
        if not meth and t is operator.getitem:
            return self.getitem(node)
        self.freeze_inputs(node, f"operation {_op_name(node)} is not understood")
        return self._unknown_output(node)

    def broadcast(self, node: fx.Node, operands: list[Any]) -> Layout | None:
        nd = len(_shape(node))
        slim: list[tuple[fx.Node, int, Layout]] = []
        for a in operands:
            if _is_tensor_node(a) and isinstance(self.env.get(a), Layout):
                lay = self.env[a]
                slim.append((a, lay.dim + nd - len(_shape(a)), lay))
        if not slim:
            return None
        d, segs = slim[0][1], slim[0][2].segs
        for _, da, lay in slim[1:]:
            if da != d or not self.same_segs(segs, lay.segs):
                self.freeze_inputs(node, f"{_op_name(node)} of tensors whose channels do not match")
                return None
        for a in operands:
            if not _is_tensor_node(a) or isinstance(self.env.get(a), Layout):
                continue
            shape = _shape(a)
            k = d - (nd - len(shape))
            if k < 0 or shape[k] == 1:
                continue
            if a.op == "get_attr" and a not in self.params:
                self.params[a] = Layout(k, segs)
                continue
            self.freeze_inputs(node, f"{_op_name(node)} with a tensor of fixed channels")
            return None
        return Layout(d, segs)

    def cat(self, node: fx.Node) -> Layout | None:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        nd = len(_shape(node))
        dim %= nd
        lays = [self.env.get(a) for a in tensors]
        if not any(isinstance(v, Layout) for v in lays):
            return None
        if all(not isinstance(v, Layout) or v.dim == dim for v in lays):
            segs: tuple[Seg, ...] = ()
            for a, v in zip(tensors, lays):
                segs += v.segs if isinstance(v, Layout) else self.full_segs(_shape(a)[dim])
            return Layout(dim, segs)
        first = next(v for v in lays if isinstance(v, Layout))
        if all(isinstance(v, Layout) and v.dim == first.dim and self.same_segs(first.segs, v.segs) for v in lays):
            return first
        self.freeze_inputs(node, "concatenation of tensors whose channels do not match")
        return None

    def chunk(self, node: fx.Node, lay: Layout | None) -> Any:
        k = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks")
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        n_out = len(_tmeta(node))
        if lay is None:
            return tuple(None for _ in range(n_out))
        dim %= len(_shape(node.args[0]))
        if dim != lay.dim:
            return tuple(lay for _ in range(n_out))
        full = sum(self.seg_full(s) for s in lay.segs)
        if full % k or n_out != k:
            self.freeze_inputs(node, f"chunk into {k} unequal parts")
            return tuple(None for _ in range(n_out))
        part = self.split_blocks(lay.segs, k)
        if part is None:
            self.freeze_inputs(node, "chunk whose parts do not match the concatenated parts")
            return tuple(None for _ in range(n_out))
        return tuple(Layout(dim, part) for _ in range(k))

    def split(self, node: fx.Node, lay: Layout | None) -> Any:
        """``split(sizes, dim)``: equal parts of the channels as ``chunk``; unequal ones where they fall on the
        boundaries of concatenated parts."""
        sizes = node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size_or_sections")
        if sizes is None:
            sizes = node.kwargs.get("split_size")
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        n_out = len(_tmeta(node))
        if lay is None:
            return tuple(None for _ in range(n_out))
        dim %= len(_shape(node.args[0]))
        if dim != lay.dim:
            return tuple(lay for _ in range(n_out))
        parts = [int(_shape_of(t)[dim]) for t in _tmeta(node)]
        if len(set(parts)) == 1:
            full = sum(self.seg_full(s) for s in lay.segs)
            block = self.split_blocks(lay.segs, n_out) if full == sum(parts) else None
            if block is not None:
                self.rewrites[node] = ("chunk", n_out, dim)  # equal parts at every width: a chunk, not fixed sizes
                return tuple(Layout(dim, block) for _ in range(n_out))
        out, ranges, start = [], [], 0
        for n in parts:
            r = self.seg_range(lay.segs, start, start + n)
            if r is None:
                self.freeze_inputs(node, f"split into parts {parts} that cut a channel group")
                return tuple(None for _ in range(n_out))
            out.append(Layout(dim, lay.segs[r[0] : r[1]]))
            ranges.append(r)
            start += n
        if not all(u.op == "call_function" and u.target is operator.getitem for u in node.users):
            self.freeze_inputs(node, "split whose parts are used as a tuple")
            return tuple(None for _ in range(n_out))
        # the sizes are constants of the graph: each part becomes a per-width selection of the input
        self.rewrites[node] = ("split", dim, lay.segs, tuple(ranges))
        return tuple(out)

    def seg_range(self, segs: tuple[Seg, ...], start: int, stop: int) -> tuple[int, int] | None:
        """Segments ``[i, j)`` holding the full-width channels ``[start, stop)``, or ``None`` when a bound falls
        inside a segment."""
        total = sum(self.seg_full(s) for s in segs)
        stop = min(stop, total)
        bounds, pos = {}, Fraction(0)
        for i, s in enumerate(segs):
            bounds[pos] = i
            pos += self.seg_full(s)
        bounds[pos] = len(segs)
        if start not in bounds or stop not in bounds or start >= stop:
            return None
        return bounds[start], bounds[stop]

    def stack(self, node: fx.Node) -> Layout | None:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        dim %= len(_shape(node))
        lays = [self.env.get(a) for a in tensors]
        if not any(isinstance(v, Layout) for v in lays):
            return None
        first = next(v for v in lays if isinstance(v, Layout))
        if all(isinstance(v, Layout) and v.dim == first.dim and self.same_segs(first.segs, v.segs) for v in lays):
            return Layout(first.dim + (1 if dim <= first.dim else 0), first.segs)
        self.freeze_inputs(node, "stack of tensors whose channels do not match")
        return None

    def reduce(self, node: fx.Node, lay: Layout | None) -> Layout | None:
        if lay is None:
            return None
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        nd = len(_shape(node.args[0]))
        if dims is None:
            return None
        dims = [d % nd for d in ((dims,) if isinstance(dims, int) else dims)]
        if lay.dim in dims:
            return None  # reduced over the channels (keeps working at any count)
        return Layout(lay.dim if keep else lay.dim - sum(d < lay.dim for d in dims), lay.segs)

    def getitem(self, node: fx.Node) -> Any:
        src, idx = node.args[0], node.args[1]
        v = self.env.get(src)
        if isinstance(v, tuple):
            return v[idx] if isinstance(idx, int) else None
        if v == "meta" or not _is_tensor_node(src):
            return "meta"
        if not isinstance(v, Layout):
            return None
        items = idx if isinstance(idx, tuple) else (idx,)
        nd_in = len(_shape(src))
        n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
        d_in = d_out = 0
        for i in items:
            if i is Ellipsis:
                skip = nd_in - n_real
                if d_in <= v.dim < d_in + skip:
                    return Layout(d_out + v.dim - d_in, v.segs)
                d_in += skip
                d_out += skip
            elif i is None:
                d_out += 1
            elif isinstance(i, slice) and i == slice(None):
                if d_in == v.dim:
                    return Layout(d_out, v.segs)
                d_in += 1
                d_out += 1
            elif isinstance(i, slice) and d_in == v.dim and i.step in (None, 1):
                # a fixed channel range: the whole of it (GhostNet's out[:, :out_chs]) or concatenated parts
                start, stop = i.start or 0, _shape(src)[d_in] if i.stop is None else i.stop
                ok = isinstance(start, int) and isinstance(stop, int) and start >= 0 and stop >= 0
                r = self.seg_range(v.segs, start, stop) if ok else None
                plain = all(j is Ellipsis or j == slice(None) for j in items if j is not i)
                if r is None or (r != (0, len(v.segs)) and not plain):
                    self.freeze_inputs(node, f"indexing into the channels (a fixed range {start}:{stop})")
                    return None
                if r != (0, len(v.segs)):  # a constant range: becomes a per-width selection
                    self.rewrites[node] = ("select", v.dim, v.segs, r)
                return Layout(d_out, v.segs[r[0] : r[1]])
            else:
                if d_in == v.dim:
                    self.freeze_inputs(node, "indexing into the channels")
                    return None
                d_in += 1
                d_out += 0 if isinstance(i, int) else 1
        return Layout(d_out + v.dim - d_in, v.segs)

    def reshape(self, node: fx.Node, lay: Layout | None, check_args: bool) -> Layout | None:
        if lay is None:
            return None
        src = node.args[0]
        in_shape, out_shape = list(_shape(src)), list(_shape(node))
        span = _dim_groups(in_shape, out_shape, lay.dim)
        if span is None:
            self.freeze_inputs(node, f"{_op_name(node)} that mixes the channels with other dimensions")
            return None
        (a, b), (c, e) = span
        pre = math.prod(in_shape[a : lay.dim])
        post = math.prod(in_shape[lay.dim + 1 : b])
        flat = tuple((g, u * post) for g, u in lay.segs) * pre
        total = sum(self.seg_full(s) for s in flat)
        choices = []
        for k in range(c, e):
            if out_shape[k] == 1:
                continue
            pre2, post2 = math.prod(out_shape[c:k]), math.prod(out_shape[k + 1 : e])
            exact = len(flat) % pre2 == 0 and all(u % post2 == 0 for _, u in flat)
            choices.append((not exact, k, pre2, post2))
        for _, k, pre2, post2 in sorted(choices):
            if check_args and not _dynamic_arg(node, k):
                continue
            if total % (pre2 * post2):
                continue
            block = self.split_blocks(flat, pre2)
            if block is None:
                continue
            segs = tuple((g, u / post2) for g, u in block)
            for s in segs:
                if s[1].denominator != 1:
                    self.g.need_multiple(s, 1)
            return Layout(k, segs)
        self.freeze_inputs(node, f"{_op_name(node)} with a fixed channel count")
        return None


def _attention_call(node: fx.Node, m: nn.Module) -> str | None:
    """Why this call of an attention module is not one the slimmable layer computes (self-attention, no masks
    other than a Swin window mask, attention weights unused), or ``None``."""

    def value(v: Any) -> Any:  # a forward argument left at its default (timm's attn_mask=None) is that default
        if isinstance(v, fx.Node) and v.op == "placeholder" and len(v.args) == 1 and not isinstance(v.args[0], fx.Node):
            return v.args[0]
        return v

    args, kw = tuple(value(a) for a in node.args), {k: value(v) for k, v in node.kwargs.items()}
    if isinstance(m, nn.MultiheadAttention):
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights")
        given = dict(zip(names, args)) | dict(kw)
        if not (given.get("key", given["query"]) is given["query"] is given.get("value", given["query"])):
            return "query, key and value differ (not self-attention)"
        if any(given.get(k) is not None for k in ("key_padding_mask", "attn_mask")) or given.get("is_causal"):
            return "called with a mask"
        for user in node.users:
            if not (user.op == "call_function" and user.target is operator.getitem and user.args[1] in (0, 1)):
                return "its output tuple is used whole"
            if user.args[1] == 1 and user.users:
                return "its attention weights are used"
        return None
    extra = list(args[1:]) + [v for k, v in kw.items() if k != "mask"]
    if any(v not in (None, False) for v in extra):
        return f"called with other arguments ({', '.join(map(str, extra))})"
    return None


def _shape_of(tm: Any) -> tuple[int, ...]:
    return tuple(tm.shape)


def _dynamic_arg(node: fx.Node, k: int) -> bool:
    """Whether a ``view``/``reshape`` gives output dimension ``k`` as ``-1`` or a value computed at run time."""
    sizes = node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = sizes[0]
    if k >= len(sizes):
        return False
    s = sizes[k]
    return isinstance(s, fx.Node) or s == -1


def _dim_groups(a: list[int], b: list[int], d: int) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The spans ``[i0, i1)`` of ``a`` and ``[j0, j1)`` of ``b`` with equal products that hold dimension ``d``."""
    i = j = 0
    while i < len(a) and j < len(b):
        i0, j0 = i, j
        pa, pb = a[i], b[j]
        i += 1
        j += 1
        while pa != pb:
            if pa < pb and i < len(a):
                pa *= a[i]
                i += 1
            elif pb < pa and j < len(b):
                pb *= b[j]
                j += 1
            else:
                return None
        if i0 <= d < i:
            return (i0, i), (j0, j)
    return None


def _is_channel_first_ln(m: nn.LayerNorm, shape: tuple[int, ...]) -> bool:
    """Whether a LayerNorm subclass normalises dimension 1 (checked on a random input)."""
    from ..nn.converted import ChannelLayerNorm

    ref = ChannelLayerNorm(m.normalized_shape, m.eps, m.elementwise_affine)
    ref.load_state_dict(m.state_dict(), strict=False)
    x = torch.randn(2, *shape[1:])
    with torch.no_grad():
        try:
            return bool(torch.allclose(m(x), ref(x), atol=1e-5))
        except Exception:
            return False


def analyse(gm: fx.GraphModule, leaves: dict[str, str]) -> Analysis:
    """Walk the shape-annotated graph of ``gm`` and find its coupled channel groups."""
    return _Analyser(gm, leaves).run()
