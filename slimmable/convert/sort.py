"""``sort_channels``: reorder the channels of every coupled group so that the most important come first.

A width keeps the *first* channels of each layer. In weights trained at one width (a pretrained model) those are
arbitrary, so every narrow width starts from a random subset; sorting by importance first gives each narrow width
the channels that matter most.

How it works: the model at its widest width is exported as a plain module (:func:`~slimmable.export.export_width`;
a model without slimmable layers is copied), traced with ``torch.fx`` and analysed with the converter's coupling
analysis (:mod:`slimmable.convert._coupling`), which gives every tensor a *layout*: the dimension holding channels
and the groups it is made of. One permutation per group is then applied to every tensor that holds the group
along some dimension: the rows of the convolutions and linear layers producing it, the columns of those consuming
it (at the group's offset in a concatenation; in blocks of ``H*W`` after ``flatten``), depthwise weights, norm
affines and statistics, and parameters broadcast against it (layer scales). The permuted tensors are written back
into the slimmable layers through their own :meth:`~slimmable.nn.SlimModule.load_dense`.

A group stays in its order, and the report says why, when its channel positions carry meaning the permutation
cannot follow: a grouped convolution or ``GroupNorm`` (channels in runs of consecutive positions), a split of the
whole group into equal parts or a channel shuffle (position ``i`` of each part is not channel ``i``), a module
holding tensors the sort does not know, weights tied between modules, or a group frozen at full width by the
coupling analysis.

Attention heads: each attention layer's heads are one more group, apart from the channel groups (the order of the
heads inside a layer does not change its output, since attention sums the heads through the output projection). The
layer names the tensors holding them (:meth:`~slimmable.nn.SelfAttention.head_tensors`): the q, k and v rows of the
packed projection, the output projection's input columns, a relative position bias table's columns (Swin); with
grouped key/value heads a key/value head moves with the query heads it serves. Another library's attention in a model
not converted (``nn.MultiheadAttention``, timm's and torchvision's ViT and Swin attention) is read through the
slimmable layer :func:`~slimmable.convert` would make of it, sharing its tensors. In a vision transformer each
block's heads and MLP hidden units sort; the embedding stream keeps its order (the report says why).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from .._utils import example_input as make_example
from .._utils import unwrap_model
from ..nn import SwitchableBatchNorm2d, USBatchNorm2d, get_widths, slim_modules, use_width
from ..nn.converted import ConvertedBatchNorm2d, IndexSelect
from ..nn.converted_attention import attention_support, convert_attention
from ._coupling import Analysis, Groups, Layout, Seg, _Analyser, _shape
from ._trace import propagate_shapes, trace
from .report import SortedGroup, SortReport

__all__ = ["IMPORTANCES", "sort_channels"]

_logger = logging.getLogger(__name__)

#: the importance criteria :func:`sort_channels` takes
IMPORTANCES = ("magnitude", "bn", "taylor")

LossFn = Callable[[Any, Any], torch.Tensor]


def sort_channels(
    model: nn.Module,
    importance: str = "magnitude",
    data: Iterable[Any] | None = None,
    *,
    loss_fn: LossFn | None = None,
    max_batches: int | None = None,
    example_input: torch.Tensor | None = None,
) -> SortReport:
    """Permute the channels of every coupled group of ``model``, in place, most important first.

    Works on converted models (:func:`slimmable.convert`), on our families (``slim_resnet18``, ...) and on plain
    models (sort, then convert). Residual streams share one permutation; a concatenation's consumers take each part's
    permutation at its offset; depthwise convolutions, squeeze-excitation gates and ``flatten`` before a linear layer
    follow their group. What cannot follow stays in its order (see the module docs and the report). The widest width
    computes the same function, up to float reassociation: this is checked on an example input, and a model whose
    output would change is restored and an error raised.

    Switchable BatchNorm: the widest width's affine and statistics are permuted with their channels. Each narrower
    width's private BN (its switch) is filled again from the widest one at the channels that width now keeps, as
    :func:`slimmable.convert` starts them; per-width statistics learned before sorting described other channels and
    are discarded. Re-estimate narrow widths' statistics before evaluating them
    (:func:`slimmable.train.calibrate_bn`), or train. A universally slimmable BN keeps its shared affine (permuted) and
    its statistics slots are filled again the same way.

    Attention heads sort as a group per layer (whole heads; with grouped key/value heads, a key/value head with its
    query heads): their q, k and v rows, the output projection's columns and a per-head relative position bias move
    together. Under ``"bn"`` they fall back to magnitude (heads have no norm layer), and the report says so.

    Only the graph the model runs in eval mode is analysed: modules that run only in training mode (GoogLeNet's
    auxiliary heads in an unconverted model) are not permuted.

    Args:
        model: the model (``nn.DataParallel``/DDP/compiled wrappers are unwrapped); modified in place.
        importance: ``"magnitude"``: the L1 norm of the weights producing and consuming each channel (a head: its
            q, k and v rows and its output projection columns), each layer's norms divided by their mean so that
            every layer weighs the same (no data); ``"bn"``: the sum of ``|gamma|`` of the group's norm layers
            (groups without one, and heads, fall back to magnitude, reported); ``"taylor"``: first order,
            ``|sum(activation * gradient)|`` over each batch of ``data`` at the outputs of the group's layers (a head:
            over its output before the output projection, the gradient of a mask of ones on it), summed over
            batches.
        data: ``taylor`` only: an iterable of ``(inputs, targets)`` batches (a ``DataLoader``).
        loss_fn: ``taylor`` only: ``loss_fn(output, targets)``; default cross entropy.
        max_batches: ``taylor`` only: use at most this many batches of ``data``.
        example_input: an input ``(N, C, H, W)`` for tracing shapes and the final check; default the size a converted
            model was traced with, else ``(2, C, 16, 16)``.

    Returns:
        A :class:`~slimmable.convert.SortReport`: the groups sorted (with each new order), those left and why, and
        the largest output change at the widest width.

    Raises:
        ValueError: an unknown ``importance``, ``taylor`` without ``data``, or batches that are not pairs.
        RuntimeError: the permuted model's output differs at the widest width (a bug; the model is restored).
    """
    if importance not in IMPORTANCES:
        raise ValueError(f"importance {importance!r} is not one of {IMPORTANCES}")
    if importance == "taylor" and data is None:
        raise ValueError("importance='taylor' needs data: an iterable of (inputs, targets) batches")
    src = unwrap_model(model)
    x = example_input if example_input is not None else make_example(src, None, batch_size=2)
    p = next(iter(src.parameters()), None)
    if p is not None:
        x = x.to(device=p.device, dtype=p.dtype if p.is_floating_point() else x.dtype)
    widths = get_widths(src)
    top = widths.range[1] if widths.range is not None else (widths.switches[-1] if widths.switches else None)
    with _widest(src, top):
        reference = _outputs(src, x)
        twin = _twin(src, top, x)
        plan = _Plan.build(twin, x, _shared_owners(src))
        scores, criteria = _importance(plan, importance, data, loss_fn, max_batches)
        perms = {r: torch.argsort(s, descending=True, stable=True) for r, s in scores.items()}
        perms = {r: o for r, o in perms.items() if not torch.equal(o, torch.arange(len(o)))}
        backup = {k: v.detach().clone() for k, v in src.state_dict().items()}
        try:
            _write_back(src, twin, plan.apply(perms))
            diff = _max_diff(reference, _outputs(src, x))
        except BaseException:
            src.load_state_dict(backup)  # never leave a half-permuted model
            raise
    if diff is None or diff > 1e-4 * (1.0 + _scale(reference)):
        src.load_state_dict(backup)
        raise RuntimeError(
            f"sort_channels changed the output of {type(src).__name__} at its widest width by {diff} (a bug in the "
            "sort; please report it); the model was restored unsorted"
        )
    report = plan.report(importance, perms, criteria, diff)
    _logger.info("sort_channels(%s): %d groups sorted, %d left", importance, len(report.groups), len(report.left))
    return report


# -- the model at its widest width ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _widest(model: nn.Module, width: float | None) -> Iterator[None]:
    """Run at ``width`` (``None``: a model without slimmable layers); restore the width and training mode on exit."""
    training = model.training
    try:
        with use_width(model, width) if width is not None else contextlib.nullcontext():
            yield
    finally:
        model.train(training)


def _shared_owners(model: nn.Module) -> set[str]:
    """Paths of the modules holding a tensor that another module holds too (tied weights): the exported copy
    unties them, so their groups keep their order."""
    owners: dict[int, set[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        owners.setdefault(id(t), set()).add(name.rpartition(".")[0])
    return {path for paths in owners.values() if len(paths) > 1 for path in paths}


def _twin(model: nn.Module, top: float | None, x: torch.Tensor) -> nn.Module:
    """A plain copy of ``model`` at its widest width (eval mode), with the same module names."""
    if top is None:
        return copy.deepcopy(model).eval()
    from ..export import export_width

    return export_width(model, top, example=x[:1])


@torch.no_grad()
def _outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.eval()
    leaves, _ = tree_flatten(model(x))
    return [t.detach().clone() for t in leaves if isinstance(t, torch.Tensor)]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float | None:
    if len(a) != len(b) or any(s.shape != t.shape for s, t in zip(a, b)):
        return None
    return max((float((s.float() - t.float()).abs().max()) for s, t in zip(a, b) if s.numel()), default=0.0)


def _scale(outs: list[torch.Tensor]) -> float:
    return max((float(t.float().abs().max()) for t in outs if t.numel()), default=0.0)


# -- the analysis ---------------------------------------------------------------------------------------------------


class _SortAnalyser(_Analyser):
    """The converter's analysis, also noting the groups whose channel positions a permutation cannot follow."""

    def __init__(self, gm: fx.GraphModule, leaves: dict[str, str]) -> None:
        super().__init__(gm, leaves)
        self.unsortable: dict[int, str] = {}

    def split_blocks(self, segs: tuple[Seg, ...], k: int) -> tuple[Seg, ...] | None:
        out = super().split_blocks(segs, k)
        if out is not None and k > 1 and len(segs) == 1:
            # One group cut into k equal parts: part j holds channels j*C/k.., each labelled as the whole group.
            self.unsortable.setdefault(
                segs[0][0], "split into equal parts (a chunk or a channel shuffle): part positions are not channels"
            )
        return out

    def visit_module(self, node: fx.Node) -> Any:
        m = self.modules[str(node.target)]
        x = node.args[0] if node.args else None
        lay = self.env.get(x) if isinstance(x, fx.Node) else None
        if isinstance(m, IndexSelect) and isinstance(lay, Layout):
            # a converted channel range (DPN's x[:, :c]) at the widest width: a fixed slice of whole segments
            idx = m.index.tolist()
            nd = len(_shape(x))
            if m.dim % nd == lay.dim and idx and idx == list(range(idx[0], idx[0] + len(idx))):
                r = self.seg_range(lay.segs, idx[0], idx[0] + len(idx))
                if r is not None:
                    return Layout(lay.dim, lay.segs[r[0] : r[1]])
        return super().visit_module(node)


@dataclass
class _Use:
    """A tensor of the traced copy holding channels along ``dim``, laid out as ``segs``."""

    name: str  # qualified name of the parameter or buffer
    dim: int
    segs: tuple[Seg, ...]
    role: str  # "weight" (conv/linear weights: magnitude), "scale" (a norm's gamma: bn), "other"
    module: str


@dataclass
class _Heads:
    """The heads of one attention layer of the traced copy, as a group of ``num_kv_heads`` entries."""

    path: str
    proj: str | None  # the output projection's weight (taylor reads its gradient), its input columns along proj_dim
    proj_dim: int
    head_dim: int


@dataclass
class _Plan:
    """Where each group's channels live in the traced copy, and which groups may be permuted."""

    gm: fx.GraphModule
    an: Analysis
    uses: dict[tuple[str, int], _Use]
    left: dict[int, str]  # root -> why it keeps its order
    sortable: list[int]  # roots
    outputs: dict[str, Layout]  # module path -> its output layout (taylor's hook points)
    heads: dict[int, _Heads]  # group (a root) -> the attention layer whose heads it is

    @property
    def groups(self) -> Groups:
        return self.an.groups

    @classmethod
    def build(cls, twin: nn.Module, x: torch.Tensor, shared: set[str] | None = None) -> _Plan:
        gm, leaves = trace(twin)
        propagate_shapes(gm, x[:1])
        analyser = _SortAnalyser(gm, leaves)
        an = analyser.run()
        marks: dict[int, str] = dict(analyser.unsortable)
        uses, outputs = _collect_uses(gm, an, marks)
        heads = _head_uses(twin, gm, an, uses, marks)
        for use in uses.values():
            tied = next((p for p in shared or () if p == use.module or p.startswith(f"{use.module}.")), None)
            for gid, _ in use.segs if tied is not None else ():
                marks.setdefault(gid, f"module {tied} shares a tensor with another module")
        g = an.groups
        for lay in an.layouts.values():
            for v in lay if isinstance(lay, tuple) else (lay,):
                if isinstance(v, Layout):
                    for gid, unit in v.segs:
                        if unit.denominator != 1:
                            marks.setdefault(gid, "split into equal parts (a chunk or a channel shuffle)")
        left = {r: f"frozen at full width: {g.info[r].frozen}" for r in g.roots() if g.info[r].frozen is not None}
        for gid, why in marks.items():
            left.setdefault(g.find(gid), why)
        sortable = []
        used = {g.find(gid) for u in uses.values() for gid, _ in u.segs}
        for r in g.roots():
            info = g.info[r]
            if r in left or info.size < 2:
                continue
            elif r not in used:
                left[r] = "no tensor holds its channels"
            else:
                sortable.append(r)
        return cls(gm, an, uses, left, sortable, outputs, heads)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**dict(self.gm.named_parameters()), **dict(self.gm.named_buffers())}

    def segments(self, segs: tuple[Seg, ...]) -> Iterable[tuple[int, int, int, int]]:
        """``(root, offset, size, unit)`` of each segment whose group may be permuted."""
        g, off, keep = self.groups, 0, set(self.sortable)
        for gid, unit in segs:
            r = g.find(gid)
            n = g.info[r].size * unit
            if r in keep:
                yield r, int(off), g.info[r].size, int(unit)
            off += n

    @torch.no_grad()
    def apply(self, perms: dict[int, torch.Tensor]) -> set[str]:
        """Permute every tensor holding a permuted group; returns the names of the tensors changed."""
        tensors, changed = self.tensors(), set()
        for (name, dim), use in self.uses.items():
            t = tensors[name]
            idx = torch.arange(t.shape[dim])
            moved = False
            for r, off, size, unit in self.segments(use.segs):
                p = perms.get(r)
                if p is not None:
                    blocks = p[:, None] * unit + torch.arange(unit)
                    idx[off : off + size * unit] = off + blocks.reshape(-1)
                    moved = True
            if moved:
                t.copy_(t.index_select(dim, idx.to(t.device)))
                changed.add(name)
        return changed

    def report(
        self, importance: str, perms: dict[int, torch.Tensor], criteria: dict[int, str], diff: float | None
    ) -> SortReport:
        g = self.groups
        unit = {r: "heads" if r in self.heads else "channels" for r in self.sortable}
        done = [
            SortedGroup(g.info[r].size, tuple(g.info[r].producers), tuple(perms[r].tolist()), criteria[r], unit[r])
            for r in self.sortable
            if r in perms
        ]
        kept = sum(1 for r in self.sortable if r not in perms)
        left = [(tuple(g.info[r].producers), why) for r, why in self.left.items() if g.info[r].producers]
        notes = [f"{kept} groups were already in order"] if kept else []
        if self.heads:  # the analysis does not follow channels through attention: say so once, not per layer
            notes.append("the residual stream read and written by attention layers keeps its order")
        return SortReport(importance, done, left, diff, notes)


def _collect_uses(gm: fx.GraphModule, an: Analysis, marks: dict[int, str]) -> tuple[dict, dict[str, Layout]]:
    """The tensors holding channels of each group, from the layouts around each layer."""
    g = an.groups
    modules = dict(gm.named_modules())
    owners: dict[int, list[str]] = {}
    for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        owners.setdefault(id(t), []).append(name)
    shapes = {name: t.shape for name, t in [*gm.named_parameters(), *gm.named_buffers()]}
    uses: dict[tuple[str, int], _Use] = {}
    outputs: dict[str, Layout] = {}
    direct: set[str] = set()

    def mark(lays: Iterable[Any], why: str) -> None:
        for lay in lays:
            if isinstance(lay, Layout):
                for gid, _ in lay.segs:
                    marks.setdefault(gid, why)

    def add(module: str, attr: str, dim: int, lay: Layout, role: str) -> None:
        name = f"{module}.{attr}" if module else attr
        if name not in shapes:
            return
        total = sum(g.get(gid).size * u for gid, u in lay.segs)
        key = (name, dim)
        prev = uses.get(key)
        if total != shapes[name][dim]:
            mark([lay], f"{name} does not hold the channels its layout gives")
        elif prev is not None and [g.find(a) for a, _ in prev.segs] != [g.find(a) for a, _ in lay.segs]:
            mark([lay, Layout(dim, prev.segs)], f"{name} is used with two different channel layouts")
        else:
            uses[key] = _Use(name, dim, lay.segs, role, module)

    for node in gm.graph.nodes:
        if node.op == "get_attr":
            lay = an.params.get(node)
            if lay is not None:
                parent, _, attr = str(node.target).rpartition(".")
                add(parent, attr, lay.dim, lay, "other")
            else:
                direct.add(str(node.target))
            continue
        if node.op != "call_module":
            continue
        path = str(node.target)
        m = modules[path]
        eq = an.equivalents.get(path)
        kind = eq.base if eq is not None else type(m)
        x = node.args[0] if node.args else None
        lin = an.layouts.get(x) if isinstance(x, fx.Node) else None
        lin = lin if isinstance(lin, Layout) else None
        lout = an.layouts.get(node)
        lout = lout if isinstance(lout, Layout) else None
        before = set(uses)
        if kind is nn.Conv2d:
            depthwise = m.groups == m.in_channels == m.out_channels and m.groups > 1
            if depthwise:
                if lin is not None and lin.dim == 1:
                    add(path, "weight", 0, lin, "weight")
                    add(path, "bias", 0, lin, "other")
            elif m.groups > 1:
                mark([lin, lout], f"grouped convolution {path} ({m.groups} groups) keeps channels in their groups")
            else:
                if lout is not None:
                    add(path, "weight", 0, lout, "weight")
                    add(path, "bias", 0, lout, "other")
                if lin is not None and lin.dim == 1:
                    add(path, "weight", 1, lin, "weight")
        elif kind is nn.Linear:
            if lout is not None:
                add(path, "weight", 0, lout, "weight")
                add(path, "bias", 0, lout, "other")
            if lin is not None and lin.dim == len(_shape(x)) - 1:
                add(path, "weight", 1, lin, "weight")
        elif kind is nn.BatchNorm2d:
            if lout is not None and lout.dim == 1:
                add(path, "weight", 0, lout, "scale")
                for attr in ("bias", "running_mean", "running_var"):
                    add(path, attr, 0, lout, "other")
        elif kind is nn.GroupNorm:
            mark([lin], f"GroupNorm {path} normalises runs of consecutive channels together")
        elif isinstance(m, nn.LayerNorm):
            dim = 1 if path in an.channel_first_norms else len(_shape(node)) - 1
            if lout is not None and lout.dim == dim:
                add(path, "weight", 0, lout, "scale")
                add(path, "bias", 0, lout, "other")
        elif isinstance(m, nn.PReLU) and m.num_parameters > 1 and lout is not None and lout.dim == 1:
            add(path, "weight", 0, lout, "other")
        if lout is not None and set(uses) != before:
            outputs[path] = lout
        covered = {k[0] for k in uses}
        prefix = f"{path}." if path else ""
        loose = [
            f"{prefix}{n}"
            for n, t in [*m.named_parameters(), *m.named_buffers()]
            if t.numel() > 1 and f"{prefix}{n}" not in covered
        ]
        if loose:
            mark([lin, lout], f"module {path} ({type(m).__name__}) holds {loose[0]}, which the sort cannot permute")
    by_name = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
    for (name, _), use in uses.items():
        aliases = owners.get(id(by_name[name]), [name])
        if name in direct:
            mark([Layout(0, use.segs)], f"{name} is also read directly by the forward")
        elif len(aliases) > 1:
            mark([Layout(0, use.segs)], f"{name} is shared with {next(a for a in aliases if a != name)}")
    return uses, outputs


def _head_uses(
    twin: nn.Module, gm: fx.GraphModule, an: Analysis, uses: dict[tuple[str, int], _Use], marks: dict[int, str]
) -> dict[int, _Heads]:
    """A group per attention layer of ``twin``, its heads (key/value heads with their query heads), and a use of each
    tensor holding them, as the layer names them (:meth:`~slimmable.nn.SelfAttention.head_tensors`)."""
    names = {id(t): n for n, t in [*gm.named_parameters(), *gm.named_buffers()]}
    heads: dict[int, _Heads] = {}
    for path, m in twin.named_modules():
        why = None
        if callable(getattr(m, "head_tensors", None)):
            layer = m  # ours (the dense form of a slimmable layer): only its own forward reads these tensors
        elif attention_support(m) is None:
            layer = convert_attention(m, (1.0,))  # another library's (a model not converted): a view sharing them
            if path not in an.attention:  # masks or per-head attention weights may index heads by position
                why = f"attention {path} is called in a way the converter does not convert"
        else:
            continue
        gid = an.groups.new(layer.num_kv_heads, path)
        info = _Heads(path, None, 1, layer.head_dim)
        heads[gid] = info
        found = [(ht, names.get(id(ht.tensor))) for ht in layer.head_tensors()]
        if why is None and any(name is None for _, name in found):
            why = f"attention {path} does not run in the traced model"
        for ht, name in found if why is None else ():
            key = (name, ht.dim)
            if sum(ht.units) * layer.num_kv_heads != ht.tensor.shape[ht.dim]:
                why = f"{name} does not hold the heads its layer gives"
            elif key in uses:
                why = f"{name} also holds channels of another group along its heads"
            else:
                segs = tuple((gid, Fraction(u)) for u in ht.units)
                uses[key] = _Use(name, ht.dim, segs, "weight" if ht.kind in ("qkv", "proj") else "other", path)
                if ht.kind == "proj":
                    info.proj, info.proj_dim = name, ht.dim
        if why is not None:
            marks.setdefault(gid, f"{why}: heads keep their order")
    return heads


# -- importance -----------------------------------------------------------------------------------------------------


def _importance(
    plan: _Plan, importance: str, data: Iterable[Any] | None, loss_fn: LossFn | None, max_batches: int | None
) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
    """Per sortable group root, a score per channel (higher: more important) and the criterion used."""
    magnitude = _per_group(plan, _weight_norms(plan, "weight", normalise=True))
    if importance == "magnitude":
        return magnitude, dict.fromkeys(magnitude, "magnitude")
    if importance == "bn":
        scales = _per_group(plan, _weight_norms(plan, "scale", normalise=False))
        scores, criteria = {}, {}
        for r, s in magnitude.items():
            bn = scales.get(r)
            scores[r] = bn if bn is not None else s
            fallback = "magnitude (heads have no norm layer)" if r in plan.heads else "magnitude (no norm layer)"
            criteria[r] = "bn" if bn is not None else fallback
        return scores, criteria
    taylor = _per_group(plan, _taylor(plan, data, loss_fn, max_batches))
    return {r: taylor.get(r, torch.zeros_like(s)) for r, s in magnitude.items()}, dict.fromkeys(magnitude, "taylor")


def _weight_norms(plan: _Plan, role: str, normalise: bool) -> list[tuple[tuple[Seg, ...], torch.Tensor]]:
    """``(segs, L1 per position along the channel dimension)`` of every use of ``role``."""
    tensors, out = plan.tensors(), []
    for use in plan.uses.values():
        if use.role != role:
            continue
        t = tensors[use.name].detach().float().abs()
        v = t.sum(dim=[d for d in range(t.dim()) if d != use.dim]) if t.dim() > 1 else t
        if normalise and float(v.mean()) > 0:
            v = v / v.mean()
        out.append((use.segs, v.cpu()))
    return out


def _per_group(plan: _Plan, vectors: list[tuple[tuple[Seg, ...], torch.Tensor]]) -> dict[int, torch.Tensor]:
    """Sum per-position vectors into one score per channel of each sortable group."""
    scores: dict[int, torch.Tensor] = {}
    for segs, v in vectors:
        for r, off, size, unit in plan.segments(segs):
            part = v[off : off + size * unit].reshape(size, unit).sum(1).double()
            scores[r] = scores[r] + part if r in scores else part
    return scores


def _taylor(
    plan: _Plan, data: Iterable[Any] | None, loss_fn: LossFn | None, max_batches: int | None
) -> list[tuple[tuple[Seg, ...], torch.Tensor]]:
    """``|sum over the batch of activation * gradient|`` per position at each layer's output, summed over batches;
    for attention heads, per head."""
    gm = plan.gm
    for p in gm.parameters():
        p.requires_grad_(True)  # activations need a graph even where the model's parameters are frozen
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    acc: dict[str, torch.Tensor] = {}
    heads: dict[int, torch.Tensor] = {}
    handles = []

    def hook(path: str, dim: int) -> Callable[..., None]:
        def forward_hook(_m: nn.Module, _inputs: tuple, out: torch.Tensor) -> None:
            if not (isinstance(out, torch.Tensor) and out.requires_grad):
                return
            act = out.detach()

            def grad_hook(grad: torch.Tensor) -> None:
                v = (act * grad).sum(dim=[d for d in range(act.dim()) if d != dim]).abs().double().cpu()
                acc[path] = acc[path] + v if path in acc else v

            out.register_hook(grad_hook)

        return forward_hook

    for path, lay in plan.outputs.items():
        handles.append(gm.get_submodule(path).register_forward_hook(hook(path, lay.dim)))
    n = 0
    try:
        with torch.enable_grad():
            for batch in data:  # type: ignore[union-attr]
                if max_batches is not None and n >= max_batches:
                    break
                if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                    raise ValueError(
                        f"data must yield (inputs, targets) batches for importance='taylor', got {type(batch).__name__}"
                    )
                inputs, targets = batch[0].to(device), batch[1]
                targets = targets.to(device) if isinstance(targets, torch.Tensor) else targets
                out = gm(inputs)
                loss = loss_fn(out, targets) if loss_fn is not None else F.cross_entropy(out, targets)
                gm.zero_grad(set_to_none=True)
                loss.backward()
                _taylor_heads(plan, heads)
                n += 1
    finally:
        for h in handles:
            h.remove()
    if n == 0:
        raise ValueError("data gave no batches for importance='taylor'; give at least one (inputs, targets) batch")
    per_head = [(((r, Fraction(v.numel() // plan.groups.info[r].size)),), v) for r, v in heads.items()]
    return [(plan.outputs[path].segs, v) for path, v in acc.items()] + per_head


def _taylor_heads(plan: _Plan, acc: dict[int, torch.Tensor]) -> None:
    """Add this batch's ``|sum(head output * gradient)|`` of every head to ``acc``, read off the output projection:
    the columns ``j`` of a head sum ``W[:, j] * dL/dW[:, j]`` to ``sum over tokens of c_j * dL/dc_j`` (``c`` the
    input of the projection), the gradient of a mask of ones on that head's output, as DynaBERT scores heads."""
    tensors = plan.tensors()
    for r, info in plan.heads.items():
        w = tensors[info.proj] if info.proj is not None else None
        if w is None or w.grad is None or r not in plan.sortable:
            continue
        per_col = (w.detach() * w.grad).sum(dim=[d for d in range(w.dim()) if d != info.proj_dim])
        v = per_col.reshape(-1, info.head_dim).sum(1).abs().double().cpu()
        acc[r] = acc[r] + v if r in acc else v


# -- back into the model --------------------------------------------------------------------------------------------


@torch.no_grad()
def _write_back(model: nn.Module, twin: nn.Module, changed: set[str]) -> None:
    """Copy the permuted tensors of the traced copy into ``model``: each slimmable layer loads its dense form
    (:meth:`SlimModule.load_dense`) and fills its narrower switches again; other tensors are copied by name."""
    if model is twin:
        return
    touched = []
    for path, m in slim_modules(model, outermost=True):
        prefix = f"{path}." if path else ""
        if any(n.startswith(prefix) for n in changed):
            m.load_dense(twin.get_submodule(path) if path else twin)
            touched.append(m)
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    twin_tensors = {**dict(twin.named_parameters()), **dict(twin.named_buffers())}
    for name in changed:
        t = own.get(name)
        if t is not None and t.shape == twin_tensors[name].shape:
            t.copy_(twin_tensors[name])
    for m in touched:
        _refill_narrow_norms(m)
        if hasattr(m, "clear_weight_memo"):
            m.clear_weight_memo()


@torch.no_grad()
def _refill_narrow_norms(m: nn.Module) -> None:
    """Start each narrower width's BN again from the widest one at the channels that width keeps."""
    if isinstance(m, ConvertedBatchNorm2d):
        m._fill_switches()
    elif isinstance(m, SwitchableBatchNorm2d):
        full = m.bn[len(m.bn) - 1]
        for bn in list(m.bn)[:-1]:
            c = bn.num_features
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, name).copy_(getattr(full, name)[:c])
            bn.num_batches_tracked.copy_(full.num_batches_tracked)
    elif isinstance(m, USBatchNorm2d):
        full = next((bn for bn in m.bn if bn.num_features == m.num_features), None)
        for bn in m.bn:
            if bn is full:
                continue
            if full is None:
                bn.reset_running_stats()
            else:
                c = bn.num_features
                bn.running_mean.copy_(full.running_mean[:c])
                bn.running_var.copy_(full.running_var[:c])
                bn.num_batches_tracked.copy_(full.num_batches_tracked)
