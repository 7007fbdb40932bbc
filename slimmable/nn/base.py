"""The width API: width is state of each slimmable layer, set by walking the model, never a global flag.

``set_width(model, w)`` walks ``model.modules()``, so it reaches the layers through ``nn.DataParallel``,
``DistributedDataParallel`` and ``torch.compile`` wrappers (each keeps the wrapped model as a submodule).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from .._utils import unwrap_model
from .channels import ChannelRule, WidthRange, Widths, WidthTable

__all__ = [
    "SlimModule",
    "get_channels",
    "get_width",
    "get_widths",
    "record_input_channels",
    "set_channels",
    "set_layer_widths",
    "set_width",
    "slim_modules",
    "use_width",
]


class SlimModule(nn.Module):
    """Base class of every slimmable layer.

    A subclass resolves a width to its own active sizes in :meth:`_resolve` (which must not modify the module, so
    that a bad width is rejected before any layer changes) and applies them in :meth:`_apply_state`. ``forward``
    only slices; it never assigns attributes.

    Export, cost counting, BN calibration and incremental training ask the layer rather than dispatching on its
    type (the methods below), so a new slimmable layer type is written in one file: its class. A new type must
    implement :meth:`to_dense` (export, and the defaults of :meth:`active_params` and :meth:`active_slices`) and,
    for :func:`slimmable.train.calibrate_channels` only, :meth:`load_dense`; a type holding running statistics
    names them in :meth:`stat_layers`. ``forward`` never calls the protocol.

    The methods report what the layer holds *itself*: a slimmable layer nested inside another is handled by its
    outermost slimmable ancestor (export replaces the ancestor, the cost is the ancestor's
    :meth:`active_params`).
    """

    #: current width (``None`` after :func:`set_channels` gave this layer a custom size)
    width: float | None = None
    #: rule of the output channels when :func:`set_channels` may set them, else ``None``
    out_rule: ChannelRule | None = None
    #: the channel rules that limit the widths this layer can take (see :func:`get_widths`)
    channel_rules: tuple[ChannelRule | None, ...] = ()
    #: input dimension that holds the channels: 1 for ``(N, C, ...)`` layers, -1 for ``(*, F)`` linear layers
    channel_dim: int = 1
    #: one set of running statistics serves every width (the naive shared BN): calibrate one width at a time
    stats_shared_by_widths: bool = False
    #: running statistics are kept per listed width and :meth:`add_stat_width` adds a slot (universally
    #: slimmable BN); the layer then has a ``stat_widths`` tuple
    adds_stat_widths: bool = False

    def _resolve(self, width: float) -> object:
        """Return the state this layer takes at ``width``; raise ``ValueError`` if it cannot run at ``width``."""
        raise NotImplementedError

    def _apply_state(self, state: object) -> None:
        raise NotImplementedError

    def _get_state(self) -> object:
        raise NotImplementedError

    def _set_custom(self) -> None:
        """Called after :func:`set_channels` changed some layer: the model no longer runs at one width."""

    def set_width(self, width: float) -> None:
        """Switch this layer alone to ``width``. Prefer :func:`set_width` on the whole model."""
        self._apply_state(self._resolve(width))

    # -- the layer protocol: export, cost, calibration ------------------------------------------------------------

    def to_dense(self, in_channels: int, *, fresh_stats: bool = False) -> nn.Module:
        """The plain torch module computing what this layer computes now (width or channels as set).

        Args:
            in_channels: channels of the input this layer receives at the current setting (dimension
                :attr:`channel_dim` of its input, as :func:`record_input_channels` records it).
            fresh_stats: give a normalisation layer default running statistics (mean 0, variance 1) instead of the
                stored ones, which then need not exist (they are to be re-estimated).

        Returns:
            A new module (eval mode) of plain torch layers holding copies of the active weights: it shares no
            memory with this layer, and in eval mode its output equals this layer's.

        Raises:
            ValueError: the layer cannot become a dense module at this setting (e.g. no statistics stored for it).
            TypeError: the layer type does not implement it.
        """
        raise TypeError(
            f"{type(self).__name__} has no dense equivalent; implement {type(self).__name__}.to_dense(in_channels, "
            "*, fresh_stats=False) returning the plain torch module at the current width"
        )

    def load_dense(self, dense: nn.Module) -> None:
        """Copy the tensors of a dense module shaped as :meth:`to_dense` returns into this layer's active part.

        The inverse of :meth:`to_dense`: ``m.load_dense(m.to_dense(c))`` leaves ``m`` unchanged; the rest of the
        layer's tensors (other widths' channels and switches) are not touched. Used to move a trained subnet into a
        model built with its channels (:func:`slimmable.train.calibrate_channels`). No default.

        Raises:
            ValueError: ``dense`` does not have the shape this layer takes at its current setting.
        """
        raise TypeError(f"{type(self).__name__} cannot load a dense module; implement {type(self).__name__}.load_dense")

    def active_params(self, in_channels: int) -> int:
        """Learnable parameters one forward pass uses at the current setting, with ``in_channels`` input channels.

        The default counts the parameters of :meth:`to_dense`'s module; layers override it to avoid the copy.
        """
        return sum(p.numel() for p in self.to_dense(in_channels, fresh_stats=True).parameters())

    def active_slices(self, in_channels: int) -> list[tuple[nn.Parameter, tuple[slice, ...]]]:
        """The parts of this layer's parameters one forward pass uses at the current setting, as
        ``(parameter, index)`` pairs (``parameter[index]`` is the used block); incremental training freezes them.

        The default reads :meth:`to_dense`'s parameters as leading blocks of this layer's parameters of the same
        name (``weight`` → ``self.weight[:a, :b, ...]``), which holds for layers that slice their own tensors.

        Raises:
            TypeError: a dense parameter has no counterpart of that name and rank here (override this method).
        """
        own = dict(self.named_parameters())
        out = []
        for name, p in self.to_dense(in_channels, fresh_stats=True).named_parameters():
            mine = own.get(name)
            if mine is None or mine.dim() != p.dim() or any(a > b for a, b in zip(p.shape, mine.shape)):
                raise TypeError(
                    f"{type(self).__name__}.to_dense gives parameter {name!r} {tuple(p.shape)} with no leading-block "
                    f"counterpart in the layer; implement {type(self).__name__}.active_slices"
                )
            out.append((mine, tuple(slice(0, n) for n in p.shape)))
        return out

    def stat_layers(self) -> list[nn.modules.batchnorm._BatchNorm]:
        """The batch-norm modules whose running statistics this layer normalises with at its current setting.

        BN calibration resets these and re-estimates them as a cumulative average (``momentum=None``) in training
        mode. Default: none.

        Raises:
            ValueError: the layer keeps no statistics for its current setting (e.g. per-layer channels).
        """
        return []

    def calibration_modules(self) -> list[nn.Module]:
        """Modules to put in training mode while :meth:`stat_layers` are re-estimated (the rest of the model stays
        in eval mode). Default: the statistics layers; a layer whose own ``forward`` chooses between stored and
        batch statistics by its mode adds itself."""
        return list(self.stat_layers())

    def missing_stats(self) -> str | None:
        """Why this layer cannot run in eval mode at its current setting (no statistics stored for it), or ``None``.

        Export checks this before copying, to name the layer and the fix.
        """
        return None


def slim_modules(model: nn.Module, *, outermost: bool = False) -> Iterator[tuple[str, SlimModule]]:
    """Yield ``(qualified_name, module)`` for every :class:`SlimModule` in ``model``.

    Args:
        model: any module.
        outermost: skip slimmable layers nested inside another slimmable layer (the outer one speaks for them in
            export and cost counting).
    """
    inside: set[int] = set()
    for name, m in model.named_modules():
        if not isinstance(m, SlimModule) or id(m) in inside:
            continue
        if outermost:
            inside.update(id(c) for c in m.modules() if c is not m)
        yield name, m


def _named_layers(model: nn.Module) -> Iterator[tuple[str, SlimModule]]:
    """:func:`slim_modules` under the names of the model inside DDP / DataParallel / ``torch.compile`` wrappers
    (channel specs name layers of the bare model)."""
    return slim_modules(unwrap_model(model))


def set_width(model: nn.Module, width: float) -> None:
    """Switch every slimmable layer of ``model`` to ``width``.

    The switch is atomic: every layer is checked before any changes, so a bad width leaves the model as it was.

    Args:
        model: a model holding :class:`SlimModule` layers (possibly wrapped by DDP, DataParallel or compile).
        width: the width multiplier, one of the model's widths (or inside its range for universally slimmable
            models).

    Raises:
        ValueError: ``width`` is not a width of some layer; the message names the layer and the allowed widths.
        TypeError: ``model`` has no slimmable layers.
    """
    if isinstance(width, bool) or not isinstance(width, (int, float)):
        raise TypeError(f"width must be a number such as 0.5, got {type(width).__name__} {width!r}")
    mods = list(_named_layers(model))
    if not mods:
        raise TypeError(f"{type(model).__name__} has no slimmable layers; build it with slimmable.create_model")
    states = []
    for name, m in mods:
        try:
            states.append(m._resolve(float(width)))
        except ValueError as err:
            where = name or type(m).__name__
            allowed = get_widths(model)
            raise ValueError(
                f"{err} of {where}; the model's widths are {allowed.describe()}. "
                "Use one of them, or add the width when building the model (create_model(..., widths=...))"
            ) from err
    for (_, m), s in zip(mods, states):
        m._apply_state(s)


def get_widths(model: nn.Module) -> Widths:
    """The widths every slimmable layer of ``model`` supports, read off the layers (the one source of truth).

    Returns:
        :class:`~slimmable.nn.channels.Widths`: the switches of a slimmable network; for a universally slimmable
        one, its range and the widths every universally slimmable BN holds statistics for. A universally slimmable
        model whose layers keep no per-width statistics (a transformer's LayerNorm: every width runs as it is)
        lists the widths its ``listed_widths`` attribute names (the model's ``stat_widths`` argument), else the
        range's ends. A model without slimmable layers gives empty switches.
    """
    common: set[float] | None = None
    stats: set[float] | None = None
    ranges: list[tuple[float, float]] = []
    for _, m in slim_modules(model):
        for r in (r for r in m.channel_rules if r is not None):
            if isinstance(r, WidthRange):
                ranges.append((r.lo, r.hi))
            elif isinstance(r, WidthTable):
                common = set(r.widths) if common is None else common & set(r.widths)
        if m.adds_stat_widths:
            held = set(m.stat_widths)  # type: ignore[attr-defined]
            stats = held if stats is None else stats & held
    if ranges:
        lo, hi = max(r[0] for r in ranges), min(r[1] for r in ranges)
        if stats is None:  # no layer keeps statistics per width: the widths the model lists (evaluated, reported)
            listed = next((m.listed_widths for m in model.modules() if getattr(m, "listed_widths", None)), (lo, hi))
            stats = set(listed)
        return Widths(tuple(stats), (lo, hi))
    return Widths(tuple(common or ()))


def get_width(model: nn.Module) -> float | None:
    """The width the model is set to, or ``None`` if its layers disagree (after :func:`set_channels`)."""
    ws = {m.width for _, m in slim_modules(model)}
    return ws.pop() if len(ws) == 1 else None


@contextlib.contextmanager
def use_width(model: nn.Module, width: float) -> Iterator[nn.Module]:
    """Context manager: run ``model`` at ``width`` inside the block, restore every layer's state on exit.

    The previous state is restored on normal exit and when the block raises.

    Example:
        >>> with use_width(model, 0.5):
        ...     y = model(x)
    """
    saved = [(m, m._get_state()) for _, m in slim_modules(model)]
    set_width(model, width)
    try:
        yield model
    finally:
        for m, s in saved:
            m._apply_state(s)


def get_channels(model: nn.Module) -> dict[str, int]:
    """The active output channel count of every layer whose output is slimmable (a ChannelSpec), by name."""
    out = {}
    for name, m in _named_layers(model):
        c = getattr(m, "active_out", None)
        if c is not None and m.out_rule is not None:
            out[name] = int(c)
    return out


def set_channels(model: nn.Module, spec: Mapping[str, int]) -> None:
    """Give individual layers custom output channel counts (a ChannelSpec, keyed by qualified module name).

    Layers not named keep their current size. Input channels follow the incoming tensor, so only outputs are set.
    Channels tied by a residual connection must be given equal counts (the search keeps them tied).

    Raises:
        KeyError: a name is not a slimmable layer of the model (the message lists near matches).
        ValueError: a count is outside ``1..max_channels`` of its layer.
    """
    by_name = dict(_named_layers(model))
    settable = {n: m for n, m in by_name.items() if m.out_rule is not None}
    plan = []
    for name, c in spec.items():
        m = _settable_layer(settable, name)
        if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= m.max_out:
            raise ValueError(f"channels for {name} must be an int in 1..{m.max_out}, got {c!r}")
        plan.append((m, c))
    for m, c in plan:
        m._set_out_channels(c)
    # The model no longer runs at one width: norm layers pick statistics by channel count from now on.
    for m in by_name.values():
        m._set_custom()


def set_layer_widths(model: nn.Module, widths: Mapping[str, float]) -> dict[str, int]:
    """Set named layers to their channel count at a width of their own (non-uniform widths, US-Nets training).

    Each named layer takes the channels its own rule gives at its width (the official rounding), so layers of a
    universally slimmable model may run at different widths of the range; the rest keep their size.
    Equivalent to :func:`set_channels` with those counts, which it returns.

    Raises:
        KeyError: a name is not a layer with slimmable output channels.
        ValueError: a width the layer cannot take.
    """
    settable = {n: m for n, m in _named_layers(model) if m.out_rule is not None}
    spec = {name: int(_settable_layer(settable, name).out_rule(float(w))) for name, w in widths.items()}
    set_channels(model, spec)
    return spec


def _settable_layer(settable: Mapping[str, SlimModule], name: str) -> SlimModule:
    """``settable[name]``; a ``KeyError`` naming near matches when ``name`` is not a layer with slimmable outputs."""
    if name not in settable:
        import difflib

        near = difflib.get_close_matches(name, list(settable), n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else f"; settable layers: {len(settable)}"
        raise KeyError(f"{name!r} is not a layer with slimmable output channels in this model{hint}")
    return settable[name]


@torch.no_grad()
def record_input_channels(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Input channel count of every slimmable layer in one forward pass of ``model`` on ``example``, as it is set.

    Input channels follow the incoming tensor, so they are only known by running the model: each layer's
    :attr:`SlimModule.channel_dim` names the dimension (1 for convolutions and norms, -1 for linear layers).
    Layers that did not run are absent from the result.

    Raises:
        ValueError: a layer ran twice with different input channel counts (it cannot become one dense layer).
    """
    seen: dict[str, int] = {}
    conflicts: set[str] = set()

    def recorder(name: str, dim: int) -> Callable[[nn.Module, tuple], None]:
        def hook(_module: nn.Module, inputs: tuple) -> None:
            c = int(inputs[0].shape[dim])
            if seen.setdefault(name, c) != c:
                conflicts.add(name)

        return hook

    handles = [m.register_forward_pre_hook(recorder(n, m.channel_dim)) for n, m in slim_modules(model)]
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
    if conflicts:
        raise ValueError(
            f"layers {sorted(conflicts)} ran with different input channel counts in one forward pass; a shared "
            "slimmable layer cannot become a single dense layer"
        )
    return seen
