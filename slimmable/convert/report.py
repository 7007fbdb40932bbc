"""The conversion report (which channel groups slim, which layers stay frozen at full width and why) and the report of
:func:`slimmable.sort_channels`."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ConversionReport", "GroupReport", "SortReport", "SortedGroup"]


@dataclass(frozen=True)
class GroupReport:
    """A group of coupled channels that slims: its full size, its channels per width, the layers producing it."""

    size: int
    channels: tuple[int, ...]
    layers: tuple[str, ...]


@dataclass(frozen=True)
class SortedGroup:
    """A group of coupled channels that :func:`slimmable.sort_channels` permuted.

    Attributes:
        size: channels in the group.
        layers: the layers producing it.
        order: the new order: position ``i`` now holds the channel that was at ``order[i]`` (most important first).
        criterion: the importance used (``"magnitude"``, ``"bn"``, ``"taylor"``, or the fallback for a group with no
            norm layer under ``"bn"``).
        unit: what the group's entries are: ``"channels"``, or ``"heads"`` for an attention layer's heads (``layers``
            names the layer; with grouped key/value heads an entry is a key/value head with its query heads).
    """

    size: int
    layers: tuple[str, ...]
    order: tuple[int, ...]
    criterion: str
    unit: str = "channels"

    @property
    def moved(self) -> int:
        """Channels whose position changed."""
        return sum(1 for i, j in enumerate(self.order) if i != j)


@dataclass
class SortReport:
    """What :func:`slimmable.sort_channels` did.

    Attributes:
        importance: the criterion asked for.
        groups: the groups permuted.
        left: ``(layers, reason)`` of the groups kept in their order.
        max_abs_diff: largest absolute change of the output at the widest width on the example input.
        notes: other things to know.
    """

    importance: str
    groups: list[SortedGroup] = field(default_factory=list)
    left: list[tuple[tuple[str, ...], str]] = field(default_factory=list)
    max_abs_diff: float | None = None
    notes: list[str] = field(default_factory=list)

    def format(self, max_lines: int = 40) -> str:
        """Human-readable report (at most ``max_lines`` lines per section)."""
        lines = [f"channels sorted by {self.importance}: {len(self.groups)} groups permuted, {len(self.left)} kept"]
        if self.max_abs_diff is not None:
            lines.append(f"max |output change| at the widest width: {self.max_abs_diff:.3g}")
        for g in self.groups[:max_lines]:
            what = "" if g.unit == "channels" else f" {g.unit}"
            lines.append(f"  {g.moved}/{g.size}{what} moved ({g.criterion}): {_names(g.layers)}")
        if len(self.groups) > max_lines:
            lines.append(f"  ... {len(self.groups) - max_lines} more")
        if self.left:
            lines.append("kept in their order (layers: why):")
            for layers, why in self.left[:max_lines]:
                lines.append(f"  {_names(layers)}: {why}")
            if len(self.left) > max_lines:
                lines.append(f"  ... {len(self.left) - max_lines} more")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _names(layers: tuple[str, ...]) -> str:
    return ", ".join(layers[:3]) + (f" (+{len(layers) - 3})" if len(layers) > 3 else "")


@dataclass
class ConversionReport:
    """What :func:`slimmable.convert` did.

    Attributes:
        model: class name of the converted model.
        widths: the widths of the result.
        groups: channel groups that slim.
        frozen_groups: ``(layers, reason)`` of channel groups kept at full width.
        frozen_ops: ``(module, reason)`` of the modules and operations that froze channels.
        untraced: ``{module: error}`` of submodules ``torch.fx`` could not trace (kept whole, frozen).
        params: parameters of the model.
        frozen_params: parameters never slimmed (in layers kept as they were).
        max_abs_diff: largest absolute difference to the original's output at width 1.0 on the example input.
        notes: other things to know (e.g. a forward that branches on ``self.training``).
        sort: what ``convert(..., sort=...)`` sorted (:class:`SortReport`), else ``None``.
        attention: attention layers whose heads slim: ``size`` is the layer's heads, ``channels`` its heads per
            width, ``layers`` its path (head size and scale never change).
        kept_groups: ``(layers, reason)`` of channel groups kept at full width by design, not for want of
            analysis (a transformer's residual stream).
    """

    model: str
    widths: tuple[float, ...]
    groups: list[GroupReport] = field(default_factory=list)
    frozen_groups: list[tuple[tuple[str, ...], str]] = field(default_factory=list)
    frozen_ops: list[tuple[str, str]] = field(default_factory=list)
    untraced: dict[str, str] = field(default_factory=dict)
    params: int = 0
    frozen_params: int = 0
    max_abs_diff: float | None = None
    notes: list[str] = field(default_factory=list)
    sort: SortReport | None = None
    attention: list[GroupReport] = field(default_factory=list)
    kept_groups: list[tuple[tuple[str, ...], str]] = field(default_factory=list)

    def format(self, max_lines: int = 40) -> str:
        """Human-readable report (at most ``max_lines`` lines per section)."""
        ws = ", ".join(f"{w:g}" for w in self.widths)
        lines = [
            f"{self.model}: {len(self.groups)} channel groups slimmed at widths ({ws}); "
            f"{self.frozen_params:,} of {self.params:,} parameters frozen at full width",
        ]
        if self.max_abs_diff is not None:
            lines.append(f"max |output - original| at width 1.0: {self.max_abs_diff:.3g}")
        lines.append("slimmed groups (channels per width: layers):")
        for g in self.groups[:max_lines]:
            names = ", ".join(g.layers[:3]) + (f" (+{len(g.layers) - 3})" if len(g.layers) > 3 else "")
            lines.append(f"  {'/'.join(map(str, g.channels))}: {names}")
        if len(self.groups) > max_lines:
            lines.append(f"  ... {len(self.groups) - max_lines} more")
        if self.attention:
            lines.append("attention heads slimmed (heads per width: layers):")
            by_rule: dict[tuple[int, ...], list[str]] = {}
            for a in self.attention:
                by_rule.setdefault(a.channels, []).extend(a.layers)
            for heads, layers in by_rule.items():
                names = ", ".join(layers[:2]) + (f" (+{len(layers) - 2})" if len(layers) > 2 else "")
                lines.append(f"  {'/'.join(map(str, heads))}: {names}")
        for layers, why in self.kept_groups[:1]:
            n = sum(len(g[0]) for g in self.kept_groups)
            lines.append(f"kept at full width: {why} ({n} layers write it, e.g. {layers[0]})")
        if self.frozen_groups:
            lines.append("frozen at full width (layers: why):")
            for layers, why in self.frozen_groups[:max_lines]:
                names = ", ".join(layers[:3]) + (f" (+{len(layers) - 3})" if len(layers) > 3 else "")
                lines.append(f"  {names}: {why}")
            if len(self.frozen_groups) > max_lines:
                lines.append(f"  ... {len(self.frozen_groups) - max_lines} more")
        for name, err in self.untraced.items():
            lines.append(f"not traced, kept whole: {name}: {err}")
        lines += [f"note: {n}" for n in self.notes]
        if self.sort is not None:
            lines.append(self.sort.format(max_lines))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()
