"""``convert``: an existing model as a slimmable one (a ``torch.fx`` graph module of slimmable layers)."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx, nn

from .._utils import input_channels, unwrap_model
from ..nn import (
    SlimModule,
    WidthRange,
    Widths,
    WidthTable,
    get_widths,
    make_divisible,
    normalize_widths,
    set_width,
    use_width,
)
from ..nn.converted import (
    ChannelSelect,
    ConvertedBatchNorm2d,
    ConvertedBatchNormAct2d,
    ConvertedUSBatchNorm2d,
    ConvertedUSBatchNormAct2d,
    IndexedSlimConv2d,
    IndexedSlimLinear,
    SlimGroupNorm,
    SlimGroupNormAct,
    SlimLayerNorm,
)
from ..nn.converted_attention import convert_attention
from ._coupling import KEPT_STREAM, Analysis, Layout, analyse
from ._trace import propagate_shapes, trace
from .report import ConversionReport, GroupReport
from .sort import IMPORTANCES, sort_channels

__all__ = ["SlimGraphModule", "convert"]

_logger = logging.getLogger(__name__)

_EXTRA_ATTRS = (
    "_widths",
    "conversion_report",
    "model_name",
    "model_kwargs",
    "example_input_size",
    "feature_info",
    "out_indices",
    "out_names",
)


class SlimGraphModule(fx.GraphModule):
    """The model :func:`convert` returns: the original's graph with slimmable layers, same parameter names.

    Attributes:
        conversion_report: a :class:`~slimmable.convert.ConversionReport`.
        example_input_size: ``(C, H, W)`` of the input it was traced with: the default input of
            :func:`~slimmable.export.export_width` and the other probes (a model such as ConvNeXt, or one that
            flattens a fixed feature map into a ``Linear``, cannot run on any smaller input).
        feature_info: the stages found on the traced graph, shallow to deep (:class:`~slimmable.models.FeatureInfo`:
            the graph node's name, the stride, the channel rule per width): for each stride, the last map computed at
            it (maps of 1x1 pixels, such as squeeze-excitation's and the pooled head's, are not stages).
        out_indices, out_names: after :meth:`as_features_only`: the stages the forward returns and their keys.
    """

    _widths: tuple[float, ...] = ()
    example_input_size: tuple[int, int, int] | None = None
    feature_info: list = []  # a class default: convert sets each instance's list
    out_indices: tuple[int, ...] | None = None
    out_names: tuple[str, ...] = ()

    @property
    def widths(self) -> tuple[float, ...]:
        """The widths it runs at; universally slimmable: the widths with BN statistics, read off the layers (BN
        calibration adding a width shows here)."""
        found = get_widths(self)
        return found.switches if found.is_range else self._widths

    @property
    def width_range(self) -> tuple[float, float] | None:
        """``(lo, 1.0)`` of a universally slimmable conversion (any width in it), else ``None``."""
        return get_widths(self).range

    def set_width(self, width: float) -> None:
        """Switch every slimmable layer to ``width`` (see :func:`slimmable.set_width`)."""
        set_width(self, width)

    def use_width(self, width: float) -> contextlib.AbstractContextManager[nn.Module]:
        """Run at ``width`` inside a ``with`` block (see :func:`slimmable.use_width`)."""
        return use_width(self, width)

    def get_widths(self) -> Widths:
        """The widths every slimmable layer supports (see :func:`slimmable.get_widths`)."""
        return get_widths(self)

    @property
    def out_feature_info(self) -> list:
        """The :class:`~slimmable.models.FeatureInfo` of each map a features-only model returns (every stage
        before :meth:`as_features_only`), in the order of :attr:`out_names`."""
        indices = range(len(self.feature_info)) if self.out_indices is None else self.out_indices
        return [self.feature_info[i] for i in indices]

    def _stage_graph(self, picked: Sequence[int], names: Sequence[str]) -> fx.Graph:
        """A copy of the graph returning ``{name: stage map}`` for the stages ``picked`` (what follows them is dead
        code: the owning module removes it)."""
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        graph.graph_copy(self.graph, env)
        nodes = {n.name: n for n in self.graph.nodes}
        outputs = OrderedDict((name, env[nodes[self.feature_info[i].name]]) for i, name in zip(picked, names))
        graph.output(outputs)
        return graph

    def _check_out_indices(self, out_indices: Sequence[int] | None) -> list[int]:
        n = len(self.feature_info)
        if not n:
            raise ValueError(f"{type(self).__name__} has no feature stages (no spatial maps found when converting it)")
        wanted = list(range(n)) if out_indices is None else [int(i) for i in out_indices]
        picked = [i % n for i in wanted if -n <= i < n]
        if not picked or len(set(picked)) != len(wanted):
            names = [f.name for f in self.feature_info]
            raise ValueError(f"out_indices {wanted} must be distinct positions in the {n} stages {names}")
        return picked

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C_in, H, W)`` → the last stage's map at the current width (``feature_info[-1]``).

        Builds the trunk's graph on each call; for repeated use make a features-only model
        (``create_model(name, features_only=True)`` or :meth:`as_features_only`).
        """
        last = len(self.feature_info) - 1
        runner = fx.GraphModule(self, self._stage_graph(self._check_out_indices([last]), ["x"]))
        runner.graph.eliminate_dead_code()
        runner.recompile()
        return runner(x)["x"]

    def as_features_only(
        self, out_indices: Sequence[int] | None = None, out_names: Sequence[str] | None = None
    ) -> SlimGraphModule:
        """Make this model a backbone, in place: its forward returns ``{name: map}`` of the stages ``out_indices``.

        What runs only after the last stage used (global pooling, the classifier) is removed from the graph and its
        modules deleted, as torchvision's ``IntermediateLayerGetter`` drops them; the other parameter names stay.

        Args:
            out_indices: positions in :attr:`feature_info` (negative from the end); default every stage.
            out_names: the key of each map (default the stage names).

        Returns:
            ``self``; its forward gives ``OrderedDict(out_name → (N, C_i, H / s_i, W / s_i))`` in stage order.

        Raises:
            ValueError: bad or repeated indices, names that do not pair with them, or a model without stages.
        """
        order = self._check_out_indices(out_indices)
        names = [self.feature_info[i].name for i in order] if out_names is None else [str(n) for n in out_names]
        if isinstance(out_names, str) or len(names) != len(order) or len(set(names)) != len(names):
            raise ValueError(f"out_names {out_names!r} must be {len(order)} distinct names, one per out_indices entry")
        by_index = sorted(zip(order, names))
        self.graph = self._stage_graph([i for i, _ in by_index], [n for _, n in by_index])
        self.graph.eliminate_dead_code()
        self.recompile()
        self.delete_all_unused_submodules()
        self.out_indices = tuple(i for i, _ in by_index)
        self.out_names = tuple(n for _, n in by_index)
        return self

    def __deepcopy__(self, memo: dict) -> SlimGraphModule:
        res = super().__deepcopy__(memo)
        for name in _EXTRA_ATTRS:
            if name in self.__dict__:
                setattr(res, name, copy.deepcopy(self.__dict__[name], memo))
        return res


def convert(
    model: nn.Module,
    widths: Sequence[float] | None = None,
    example_input: torch.Tensor | None = None,
    width_range: tuple[float, float] | None = None,
    *,
    stat_widths: Sequence[float] | None = None,
    check: bool = True,
    sort: str | None = None,
    sort_data: Iterable[Any] | None = None,
) -> SlimGraphModule:
    """A slimmable copy of ``model``; ``model`` itself is not modified.

    The model is traced with ``torch.fx`` (in eval mode: Python branches on ``self.training`` take their eval
    side, e.g. GoogLeNet's auxiliary heads are left out of the graph but kept as modules so the original state
    dict still loads). Coupled channels are found on the graph (see :mod:`slimmable.convert._coupling`);
    ``nn.Conv2d``, ``nn.Linear``, ``nn.BatchNorm2d`` (switchable, each width starting from the original
    statistics), ``nn.GroupNorm`` and ``nn.LayerNorm`` become slimmable layers with the same parameter names;
    squeeze-excitation blocks slim through their convolutions and multiply. What cannot be analysed keeps its
    channels at every width, with everything tied to it, and the report says why.

    Args:
        model: any ``nn.Module`` taking one image tensor ``(N, C, H, W)``.
        widths: the widths of the result; the largest must be 1.0 (the original model). Default
            ``(0.25, 0.5, 0.75, 1.0)``.
        example_input: an input for tracing shapes, default ``randn(1, C, H, W)`` with the model's input channels
            and the image size it names (torchvision's ``image_size``, timm's ``patch_embed.img_size`` or its
            ``pretrained_cfg``), else 224 x 224; give one when the model needs another size. Conditions on sizes
            in the model's code (its own shape assertions) are resolved on it.
        width_range: ``(lo, 1.0)``: a universally slimmable result instead of switches (US-Nets), running at any
            width in the range. Channels follow the US rule (``make_divisible(channels * width)`` in multiples of the
            group's divisor, computed per width); BN becomes universally slimmable BN (shared affine, statistics per
            ``stat_widths``, each starting from the original's), to be calibrated for other widths
            (:func:`slimmable.train.calibrate_bn`) and trained with the sandwich rule. Channels that are not a
            prefix at every width (a concatenation of slimmed tensors, a fixed channel range) and attention layers
            are refused.
        stat_widths: with ``width_range``: the widths keeping BN statistics (default ``(lo, 1.0)``; must hold 1.0).
        check: compare the result at width 1.0 with the original on ``example_input`` (recorded in the report).
        sort: reorder each channel group by importance before the widths are used, so that each width keeps the most
            important channels: ``"magnitude"``, ``"bn"`` or ``"taylor"`` (see :func:`slimmable.sort_channels`);
            ``None`` keeps the original order. The report's ``sort`` says what was sorted.
        sort_data: ``(inputs, targets)`` batches for ``sort="taylor"``.

    Returns:
        A :class:`SlimGraphModule` at width 1.0 in ``model``'s training mode, with ``widths``, ``width_range`` and
        ``conversion_report`` attributes.

    Raises:
        ValueError: bad widths or range, both ``widths`` and ``width_range``, a model whose own forward cannot be
            traced, a model that refuses the example input (the message gives its own check, with the example's
            values), an unknown ``sort``, ``sort="taylor"`` without ``sort_data``, or (``width_range``) channels
            that are not a prefix at every width.
    """
    if sort is not None and sort not in IMPORTANCES:
        raise ValueError(f"sort {sort!r} is not one of {IMPORTANCES} (or None: keep the channel order)")
    if sort == "taylor" and sort_data is None:
        raise ValueError("sort='taylor' needs sort_data: an iterable of (inputs, targets) batches")
    span = None
    if width_range is not None:
        if widths is not None:
            raise ValueError("give widths (switches) or width_range (any width in a range), not both")
        if sort is not None:
            raise ValueError("sort orders the channels of switch widths; convert(width_range=...) takes no sort yet")
        span = _check_range(width_range)
        ws = normalize_widths(stat_widths if stat_widths is not None else span)
        outside = [w for w in ws if not span[0] <= w <= span[1]]
        if outside or ws[-1] != 1.0:
            raise ValueError(
                f"stat_widths {ws} must lie in width_range {span} and hold 1.0 (the original's statistics)"
            )
    else:
        if stat_widths is not None:
            raise ValueError("stat_widths are the BN statistics widths of a width_range; give width_range too")
        ws = normalize_widths(widths if widths is not None else (0.25, 0.5, 0.75, 1.0))
    if ws[-1] != 1.0:
        raise ValueError(f"the largest of widths {ws} must be 1.0 (the original model); add 1.0")
    src = unwrap_model(model)
    was_training = src.training
    work = copy.deepcopy(src).eval()
    if example_input is None:
        example_input = torch.randn(1, input_channels(src), *_default_image_size(src))
    p = next(iter(work.parameters()), None)
    if p is not None:
        example_input = example_input.to(p.device)
    gm, leaves = trace(work, example=example_input)
    notes = _training_branches(work, gm, leaves, example_input)
    reference = propagate_shapes(gm, example_input)
    stages = _find_stages(gm, example_input)
    an = analyse(gm, leaves)
    rules = _range_rules(an, span) if span is not None else None
    counts = _channel_counts(an, ws) if rules is None else _range_counts(an, rules, ws)
    built = _Builder(gm, an, ws, counts, rules)
    converted = built.apply()
    out = SlimGraphModule(gm, gm.graph, class_name=type(src).__name__)
    _restore_unused(out, work)
    out._widths = ws
    out.example_input_size = tuple(int(d) for d in example_input.shape[1:])
    out.feature_info = built.feature_info(stages)
    report = built.report(type(src).__name__, out, leaves)
    report.notes.extend(notes)
    if span is not None:
        report.notes.append(
            f"universally slimmable: any width in [{span[0]:g}, 1]; channels listed at the BN statistics widths "
            f"({', '.join(f'{w:g}' for w in ws)}); calibrate BN statistics for others (calibrate_bn)"
        )
    out.conversion_report = report
    if converted:
        set_width(out, 1.0)
    if sort is not None:
        report.sort = sort_channels(out, sort, data=sort_data, example_input=example_input)
    if check and isinstance(reference, torch.Tensor):
        out.eval()
        with torch.no_grad():
            y = out(example_input)
        report.max_abs_diff = float((y - reference).abs().max())
    out.train(was_training)
    return out


def _default_image_size(model: nn.Module) -> tuple[int, int]:
    """The image size ``model`` says it takes (torchvision's ``image_size``, timm's ``patch_embed.img_size`` or
    ``pretrained_cfg['input_size']``), else 224 x 224."""
    for owner, attr in ((model, "image_size"), (model, "img_size"), (getattr(model, "patch_embed", None), "img_size")):
        size = getattr(owner, attr, None) if owner is not None else None
        if isinstance(size, int):
            return size, size
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) for v in size):
            return int(size[0]), int(size[1])
    cfg = getattr(model, "pretrained_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if isinstance(size, (tuple, list)) and len(size) == 3:
        return int(size[1]), int(size[2])
    return 224, 224


def _training_branches(work: nn.Module, gm: fx.GraphModule, leaves: dict[str, str], example: torch.Tensor) -> list[str]:
    """A note when the forward branches on ``self.training``: the graph (traced in eval mode) then differs from
    a trace in training mode, and the converted model follows the eval branch in training too."""
    work.train()
    try:
        train_gm, _ = trace(work, known_leaves=leaves, example=example)
    except ValueError:
        return ["the model cannot be traced in training mode; the graph follows its eval-mode forward"]
    finally:
        work.eval()
    if train_gm.code == gm.code:
        return []
    eval_ops = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    only_train = sorted({str(n.target) for n in train_gm.graph.nodes if n.op == "call_module"} - eval_ops)
    extra = f" (training-only modules kept but unused: {', '.join(only_train[:5])})" if only_train else ""
    return [
        "the forward branches on self.training; the converted model follows the eval-mode graph in training "
        f"mode too{extra}"
    ]


def _find_stages(gm: fx.GraphModule, example: torch.Tensor) -> list[tuple[fx.Node, int]]:
    """``(node, stride)`` of each stage of the traced graph: for each stride, the last map computed at it outside
    the block that leaves it (a MobileNet block's expansion runs at the old stride inside the block that
    downsamples: the stage is the block before it, as torchvision's and timm's backbones take it).

    Maps of 1x1 pixels (squeeze-excitation, global pooling) are left out, so the pooled head never counts.
    """
    side = int(example.shape[-2])
    stride: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        shape = getattr(node.meta.get("tensor_meta"), "shape", None)
        if node.op in ("placeholder", "output") or shape is None or len(shape) != 4:
            continue
        h, w = int(shape[-2]), int(shape[-1])
        if h * w > 1 and side % h == 0:
            stride[node] = side // h
    out = []
    for s in sorted(set(stride.values())):
        at = [n for n in stride if stride[n] == s]
        inside = set().union(*(_module_paths(n) for n in at))  # modules computing some map at this stride
        leaving = set()  # the innermost such module around each step to a coarser map: a block leaving the stride
        for d in stride:
            if stride[d] > s and any(stride.get(a) == s for a in d.all_input_nodes):
                leaving.update(next(([p] for p in reversed(_module_paths(d, ordered=True)) if p in inside), []))
        kept = [n for n in at if not set(_module_paths(n)) & leaving]
        out.append(((kept or at)[-1], s))
    return out


def _module_paths(node: fx.Node, ordered: bool = False) -> list[str] | set[str]:
    """The qualified names of the modules the traced call of ``node`` is inside (outermost first)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] if isinstance(v, tuple) else str(k) for k, v in stack.items()]
    return paths if ordered else set(paths)


def _check_range(width_range: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in width_range)
    except (TypeError, ValueError) as err:
        raise ValueError(f"width_range must be (lo, 1.0), got {width_range!r}") from err
    if not (0 < lo < hi and hi == 1.0):
        raise ValueError(f"width_range {tuple(width_range)} must be (lo, 1.0) with 0 < lo < 1 (1.0: the original)")
    return (lo, hi)


def _divisor(info: object, c: int) -> int:
    """The multiple a group's channels take: its own divisor, or multiples of 8 where the group is large enough (the
    MobileNets' rounding)."""
    d = info.divisor  # type: ignore[attr-defined]
    d8 = math.lcm(d, 8)
    return d8 if c % d8 == 0 and c // d8 >= 4 else d


def _range_rules(an: Analysis, span: tuple[float, float]) -> dict[int, WidthRange]:
    """The US channel rule of every group root (frozen groups: none); freezes groups the range cannot split."""
    g = an.groups
    out = {}
    for r in g.roots():
        info = g.info[r]
        c = info.size
        d = info.divisor
        if info.frozen is None and (c % d or c < 2 or c // d < 2):
            info.frozen = f"{c} channels cannot split into multiples of {d}"
        if info.frozen is None:
            rule = WidthRange(c, span[0], span[1], divisor=_divisor(info, c))
            low = rule(span[0])
            if low < rule.divisor or low % info.divisor:  # the US rounding falls below one multiple at the low end
                info.frozen = f"{c} channels give {low} at width {span[0]:g}, not a multiple of {rule.divisor}"
            else:
                out[r] = rule
                continue
        out[r] = None  # type: ignore[assignment]
    return out


def _range_counts(
    an: Analysis, rules: dict[int, WidthRange | None], widths: tuple[float, ...]
) -> dict[int, tuple[int, ...]]:
    """Channels at each statistics width of every group root (the report, the BN slots)."""
    return {r: tuple(rule(w) if rule else an.groups.info[r].size for w in widths) for r, rule in rules.items()}


def _channel_counts(an: Analysis, widths: tuple[float, ...]) -> dict[int, tuple[int, ...]]:
    """Channels per width of every group root (frozen: all at every width)."""
    g = an.groups
    out = {}
    for r in g.roots():
        info = g.info[r]
        c = info.size
        d = info.divisor
        if info.frozen is None and (c % d or c < 2 or c // d < 2):
            info.frozen = f"{c} channels cannot split into multiples of {d}"
        if info.frozen is not None:
            out[r] = tuple(c for _ in widths)
            continue
        d = _divisor(info, c)
        counts, prev = [], d
        for w in widths:
            n = min(c, max(d, make_divisible(c * w, d, min_value=d)))
            n = max(n, prev)
            counts.append(n)
            prev = n
        counts[-1] = c
        out[r] = tuple(counts)
    return out


class _Builder:
    def __init__(
        self,
        gm: fx.GraphModule,
        an: Analysis,
        widths: tuple[float, ...],
        counts: dict,
        rules: dict[int, WidthRange | None] | None = None,
    ) -> None:
        self.gm, self.an, self.widths, self.counts = gm, an, widths, counts
        #: universally slimmable: each group root's channel rule (``widths`` are then the BN statistics widths)
        self.rules = rules
        self.g = an.groups
        self.converted: set[str] = set()
        self.selected_params: set[str] = set()

    def seg_count(self, seg: tuple, i: int) -> int:
        g, unit = seg
        n = self.counts[self.g.find(g)][i] * unit
        assert n.denominator == 1, "a count that is not whole survived the divisor constraints"
        return int(n)

    def slim(self, lay: object) -> bool:
        return isinstance(lay, Layout) and any(self.g.get(g).frozen is None for g, _ in lay.segs)

    def index(self, lay: Layout, i: int) -> torch.Tensor:
        parts, off = [], 0
        for s in lay.segs:
            full = int(self.g.get(s[0]).size * s[1])
            parts.append(torch.arange(off, off + self.seg_count(s, i)))
            off += full
        return torch.cat(parts)

    def index_table(self, lay: object, prefix_as_none: bool = True) -> dict[float, torch.Tensor | None]:
        if not self.slim(lay):
            return {}
        if self.rules is not None:  # any width: a prefix at every width, no table
            self.require_prefix(lay)
            return {}
        table = {}
        for i, w in enumerate(self.widths):
            idx = self.index(lay, i)
            prefix = bool(torch.equal(idx, torch.arange(len(idx))))
            table[w] = None if prefix and prefix_as_none else idx
        return table

    def out_rule(self, lay: object) -> WidthTable | WidthRange | None:
        if not self.slim(lay) or len(lay.segs) != 1:
            return None
        if self.rules is not None:
            g, unit = lay.segs[0]
            if unit != 1:
                raise ValueError(
                    f"convert(width_range=...): a layer produces {unit} x the channels of a slimmed group; convert "
                    "this model with switch widths (widths=...)"
                )
            return self.rules[self.g.find(g)]
        return WidthTable.build(self.widths, [self.seg_count(lay.segs[0], i) for i in range(len(self.widths))])

    def prefix_table(self) -> dict[float, None]:
        """A prefix input at every width: one entry per switch, none for a range (any width)."""
        return {} if self.rules is not None else {w: None for w in self.widths}

    def feature_info(self, stages: list[tuple[fx.Node, int]]) -> list:
        """A :class:`~slimmable.models.FeatureInfo` per stage: its channels per width from its layout."""
        from ..models._base import FeatureInfo

        out = []
        for node, stride in stages:
            channels = int(node.meta["tensor_meta"].shape[1])
            lay = self.an.layouts.get(node)
            rule: WidthTable | WidthRange | None = None
            if self.slim(lay) and lay.dim == 1:
                if len(lay.segs) == 1 and lay.segs[0][1] == 1:
                    rule = self.out_rule(lay)
                elif self.rules is not None:
                    continue  # the channels of several groups at any width: no rule (not a stage of a US model)
                else:
                    counts = [sum(self.seg_count(sg, i) for sg in lay.segs) for i in range(len(self.widths))]
                    rule = WidthTable.build(self.widths, counts)
            elif self.slim(lay):
                continue  # channels slim along another dimension: not a channel-first map
            out.append(FeatureInfo(node.name, stride, rule, channels))
        return out

    def require_prefix(self, lay: Layout, where: str = "") -> None:
        """Universally slimmable: the active channels must be a prefix at every width, i.e. only the last segment
        of the tensor slims (an index per width cannot be tabulated for a range)."""
        if any(self.g.get(g).frozen is None for g, _ in lay.segs[:-1]):
            raise ValueError(
                f"convert(width_range=...): {where or 'a layer'} takes channels that are not a prefix at every width "
                "(a concatenation of slimmed tensors or a fixed channel range); convert this model with switch widths "
                "(widths=...)"
            )

    def apply(self) -> bool:
        modules = dict(self.gm.named_modules())
        calls: dict[str, int] = {}
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        for node in list(self.gm.graph.nodes):
            if node.op == "call_module" and calls[node.target] == 1:
                new = self.replacement(node, modules[node.target])
                if new is not None:
                    _set(self.gm, node.target, new)
                    self.converted.add(node.target)
        self.rewrite_channel_ranges()
        for node, lay in self.an.params.items():
            if not self.slim(lay):
                continue
            if self.rules is not None:
                raise ValueError(
                    f"convert(width_range=...): the tensor {node.target} meets slimmed channels (a per-width "
                    "selection); convert this model with switch widths (widths=...)"
                )
            parent, _, attr = node.target.rpartition(".")
            name = f"{parent}.{attr}_select" if parent else f"{attr}_select"
            table: dict[float, torch.Tensor | None] = {w: self.index(lay, i) for i, w in enumerate(self.widths)}
            table[self.widths[-1]] = None
            self.gm.add_submodule(name, ChannelSelect(lay.dim, table))
            with self.gm.graph.inserting_after(node):
                sel = self.gm.graph.call_module(name, (node,))
            node.replace_all_uses_with(sel)
            sel.args = (node,)
            self.converted.add(name)
            self.selected_params.add(node.target)
        self.gm.graph.lint()
        self.gm.recompile()
        return bool(self.converted)

    def range_table(self, segs: tuple, i0: int, i1: int) -> dict[float, torch.Tensor | None]:
        """Per width, the positions in the active (compact) tensor of the channels of segments ``[i0, i1)``."""
        table: dict[float, torch.Tensor | None] = {}
        for k, w in enumerate(self.widths):
            counts = [self.seg_count(s, k) for s in segs]
            table[w] = torch.arange(sum(counts[:i0]), sum(counts[:i1]))
        return table

    def select(self, src: fx.Node, dim: int, table: dict, before: fx.Node, name: str) -> fx.Node:
        self.gm.add_submodule(name, ChannelSelect(dim, table))
        with self.gm.graph.inserting_before(before):
            sel = self.gm.graph.call_module(name, (src,))
        self.converted.add(name)
        return sel

    def rewrite_channel_ranges(self) -> None:
        """Constant channel sizes in the graph (``split(16)``, ``x[:, :c]``) become what they are at each width."""
        for i, (node, rw) in enumerate(self.an.rewrites.items()):
            src = node.args[0]
            if rw[0] != "chunk" and self.rules is not None:
                raise ValueError(
                    f"convert(width_range=...): {node.name} takes a fixed channel range ({rw[0]}); convert this model "
                    "with switch widths (widths=...)"
                )
            if rw[0] == "chunk":
                _, k, dim = rw
                node.op, node.target, node.args, node.kwargs = "call_function", torch.chunk, (src, k, dim), {}
            elif rw[0] == "select":
                _, dim, segs, (i0, i1) = rw
                sel = self.select(src, dim, self.range_table(segs, i0, i1), node, f"channel_range_{i}")
                node.replace_all_uses_with(sel)
                self.gm.graph.erase_node(node)
            else:  # split into parts at concatenation boundaries: each part a selection of the input
                _, dim, segs, ranges = rw
                for user in list(node.users):
                    i0, i1 = ranges[user.args[1]]
                    name = f"channel_range_{i}_{user.args[1]}"
                    sel = self.select(src, dim, self.range_table(segs, i0, i1), user, name)
                    user.replace_all_uses_with(sel)
                    self.gm.graph.erase_node(user)
                self.gm.graph.erase_node(node)

    def replacement(self, node: fx.Node, m: nn.Module) -> nn.Module | None:
        env = self.an.layouts
        x = node.args[0] if node.args else None
        lin = env.get(x) if isinstance(x, fx.Node) else None
        lout = env.get(node)
        if str(node.target) in self.an.attention:
            if self.rules is not None:
                raise ValueError(
                    f"convert(width_range=...): {node.target} is attention, whose heads slim at switch widths only; "
                    "convert this model with switch widths (widths=...)"
                )
            return convert_attention(m, self.widths)
        eq = self.an.equivalents.get(str(node.target))
        kind = eq.base if eq is not None else type(m)
        if eq is not None and eq.with_act:
            return self.norm_act(m, kind, lout)
        if kind is nn.Conv2d:
            depthwise = m.groups == m.in_channels == m.out_channels and m.groups > 1
            rule = None if depthwise else self.out_rule(lout)
            table = self.index_table(lin) if (m.groups == 1 or depthwise) else {}
            if m.groups > 1 and not depthwise and self.slim(lin):
                table = self.prefix_table()
            if rule is None and not self.slim(lin):
                return None
            return IndexedSlimConv2d(m, rule, table or self.prefix_table())
        if kind is nn.Linear:
            rule = self.out_rule(lout)
            if isinstance(lin, Layout) and lin.dim != len(node.meta["tensor_meta"].shape) - 1:
                lin = None
            if rule is None and not self.slim(lin):
                return None
            return IndexedSlimLinear(m, rule, self.index_table(lin) or self.prefix_table())
        if kind is nn.BatchNorm2d and self.slim(lout) and lout.dim == 1:
            if self.rules is not None:
                return ConvertedUSBatchNorm2d(m, self.norm_rule(lout, node), self.widths)
            return ConvertedBatchNorm2d(m, self.index_table(lout, prefix_as_none=False))
        if kind is nn.GroupNorm and self.slim(lout) and lout.dim == 1:
            return SlimGroupNorm(m, self.index_table(lout))
        if isinstance(m, nn.LayerNorm) and self.slim(lout):
            nd = len(node.meta["tensor_meta"].shape)
            if type(m) is nn.LayerNorm and lout.dim == nd - 1:
                return SlimLayerNorm(m, self.index_table(lout), channel_dim=-1)
            if node.target in self.an.channel_first_norms and lout.dim == 1:
                return SlimLayerNorm(m, self.index_table(lout), channel_dim=1)
        return None

    def norm_rule(self, lout: Layout, node: fx.Node | None) -> WidthRange:
        """A universally slimmable BN's rule: its channels are one slimmed group (a prefix at every width)."""
        where = str(node.target) if node is not None else "a norm layer"
        self.require_prefix(lout, where)
        rule = self.out_rule(lout)
        if rule is None:
            raise ValueError(
                f"convert(width_range=...): {where} normalises more than one channel group; convert this model with "
                "switch widths (widths=...)"
            )
        return rule

    def norm_act(self, m: nn.Module, kind: type[nn.Module], lout: object) -> nn.Module | None:
        """A norm followed by its own dropout and activation (timm's ``BatchNormAct2d``, ``GroupNormAct``)."""
        if not (self.slim(lout) and lout.dim == 1):
            return None
        if kind is nn.BatchNorm2d and self.rules is not None:
            return ConvertedUSBatchNormAct2d(m, self.norm_rule(lout, None), self.widths, m.drop, m.act)
        if kind is nn.BatchNorm2d:
            return ConvertedBatchNormAct2d(m, self.index_table(lout, prefix_as_none=False), m.drop, m.act)
        if kind is nn.GroupNorm:
            return SlimGroupNormAct(m, self.index_table(lout), m.drop, m.act)
        return None

    def report(self, name: str, out: nn.Module, leaves: dict[str, str]) -> ConversionReport:
        groups, frozen, kept = [], [], []
        for r in self.g.roots():
            info = self.g.info[r]
            if not info.producers:
                continue
            if info.frozen is None:
                groups.append(GroupReport(info.size, self.counts[r], tuple(info.producers)))
            elif info.frozen == KEPT_STREAM:
                kept.append((tuple(info.producers), info.frozen))
            else:
                frozen.append((tuple(info.producers), info.frozen))
        mods = dict(out.named_modules())
        heads = []
        for path in sorted(self.an.attention, key=list(mods).index):
            rule = mods[path].head_rule
            heads.append(GroupReport(mods[path].num_heads, tuple(int(rule(w)) for w in self.widths), (path,)))
        seen, ops = set(), []
        for where, why in self.an.frozen_ops:
            if (where, why) not in seen:
                seen.add((where, why))
                ops.append((where, why))
        n_params = n_frozen = 0
        for pname, p in out.named_parameters():
            n_params += p.numel()
            owner = pname.rpartition(".")[0]
            slim = isinstance(mods.get(owner), SlimModule) or _inside_slim(owner, mods)
            if not slim and pname not in self.selected_params:
                n_frozen += p.numel()
        report = ConversionReport(name, self.widths, groups, frozen, ops, dict(leaves), n_params, n_frozen)
        report.attention, report.kept_groups = heads, kept
        return report


def _inside_slim(path: str, mods: dict[str, nn.Module]) -> bool:
    parts = path.split(".")
    return any(isinstance(mods.get(".".join(parts[:i])), SlimModule) for i in range(1, len(parts)))


def _set(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _restore_unused(out: nn.Module, work: nn.Module) -> None:
    """Put back submodules the graph does not use (training-only heads), so that the original state dict loads."""
    have = set(out.state_dict())
    for name, mod in work.named_modules():
        if not name:
            continue
        keys = {f"{name}.{k}" for k in mod.state_dict()}
        if keys and not keys & have and _missing_parent_chain(out, name):
            out.add_submodule(name, mod)
            have |= keys


def _missing_parent_chain(out: nn.Module, name: str) -> bool:
    try:
        out.get_submodule(name)
    except AttributeError:
        return True
    return False
