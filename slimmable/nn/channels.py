"""Channel counts as a function of width.

A slimmable layer keeps its full-size weights and, for each width, uses the first ``c`` output channels. The
*rule* that maps a width to ``c`` is part of the model definition (the official models round differently per
family), so each layer holds a small immutable rule object:

* :class:`WidthTable` lists the channel count of each switch explicitly (S-Nets: a fixed set of widths).
* :class:`WidthRange` computes it for any width in ``[lo, hi]`` (US-Nets), with the official rounding
  ``make_divisible(max_channels * width / ratio) * ratio``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

__all__ = [
    "ChannelRule",
    "WidthRange",
    "WidthTable",
    "Widths",
    "format_widths",
    "make_divisible",
    "normalize_widths",
    "width_key",
]

# Widths are compared after rounding to this many decimals so that 0.1 + 0.2 style noise never makes a listed
# width "unknown".
_WIDTH_DECIMALS = 6


def make_divisible(value: float, divisor: int = 8, min_value: int | None = 1) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never more than 10% below it.

    This is the rounding of the TensorFlow-slim MobileNets, which the official slimmable models use.

    Args:
        value: the unrounded channel count.
        divisor: the multiple to round to.
        min_value: the smallest result; ``None`` means ``divisor``.

    Returns:
        The rounded channel count.
    """
    if min_value is None:
        min_value = divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def width_key(width: float) -> float:
    """``width`` rounded to the 6 decimals widths are compared at (so 0.1 + 0.2 and 0.3 are one width)."""
    return round(float(width), _WIDTH_DECIMALS)


def normalize_widths(widths: Sequence[float]) -> tuple[float, ...]:
    """Validate widths and return them sorted ascending without duplicates.

    Raises:
        ValueError: if ``widths`` is empty or holds a value that is not a positive finite number.
    """
    if isinstance(widths, (int, float)):
        widths = (widths,)
    out = []
    for w in widths:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise ValueError(f"width {w!r} is not a positive number; widths are multipliers such as 0.25 or 1.0")
        out.append(width_key(w))
    if not out:
        raise ValueError("widths is empty; give at least one width, e.g. widths=(0.25, 0.5, 0.75, 1.0)")
    return tuple(sorted(set(out)))


def format_widths(widths: Sequence[float]) -> str:
    """``(0.25, 0.5, 1)``: widths for messages."""
    return "(" + ", ".join(f"{w:g}" for w in widths) + ")"


class ChannelRule:
    """Maps a width to a channel count. Subclasses are frozen dataclasses, so rules are hashable and printable."""

    max_channels: int

    def __call__(self, width: float) -> int:
        raise NotImplementedError

    @property
    def widths(self) -> tuple[float, ...]:
        """The widths this rule was built for (for a range: its two ends)."""
        raise NotImplementedError

    def describe(self) -> str:
        """Human-readable set of allowed widths, used in error messages."""
        raise NotImplementedError


@dataclass(frozen=True)
class WidthTable(ChannelRule):
    """Explicit channel count per width (a slimmable network's switches).

    Args:
        table: ``(width, channels)`` pairs, sorted by width.
    """

    table: tuple[tuple[float, int], ...]

    @classmethod
    def build(cls, widths: Sequence[float], channels: Sequence[int] | Callable[[float], int]) -> WidthTable:
        """Build from widths and either a list of counts (same order as sorted widths) or a function of width."""
        ws = normalize_widths(widths)
        counts = [int(channels(w)) for w in ws] if callable(channels) else [int(c) for c in channels]
        if len(counts) != len(ws):
            raise ValueError(f"{len(counts)} channel counts given for {len(ws)} widths {format_widths(ws)}")
        if any(c < 1 for c in counts):
            raise ValueError(f"channel counts {counts} for widths {format_widths(ws)} must all be >= 1")
        return cls(tuple(zip(ws, counts)))

    @property
    def max_channels(self) -> int:  # type: ignore[override]
        return max(c for _, c in self.table)

    @property
    def widths(self) -> tuple[float, ...]:
        return tuple(w for w, _ in self.table)

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(c for _, c in self.table)

    def __call__(self, width: float) -> int:
        k = width_key(width)
        for w, c in self.table:
            if w == k:
                return c
        raise ValueError(f"width {width:g} not in widths {self.describe()}")

    def index(self, width: float) -> int:
        """Position of ``width`` among the sorted widths (the switch index)."""
        k = width_key(width)
        for i, (w, _) in enumerate(self.table):
            if w == k:
                return i
        raise ValueError(f"width {width:g} not in widths {self.describe()}")

    def describe(self) -> str:
        return format_widths(self.widths)


@dataclass(frozen=True)
class WidthRange(ChannelRule):
    """Channel count for any width in ``[lo, hi]`` (universally slimmable layers).

    ``channels(w) = make_divisible(max_channels * w / ratio, divisor) * ratio``, where ``max_channels`` is the
    layer's size at ``hi`` (the official US-Nets use ``ratio`` = expansion factor for MobileNet v2's expanded
    layers so that they stay a multiple of the block input).
    """

    max_channels: int
    lo: float
    hi: float
    ratio: int = 1
    divisor: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.lo <= self.hi:
            raise ValueError(f"width range ({self.lo}, {self.hi}) must satisfy 0 < lo <= hi")

    @property
    def widths(self) -> tuple[float, ...]:
        return (width_key(self.lo), width_key(self.hi))

    def __call__(self, width: float) -> int:
        k = width_key(width)
        if not width_key(self.lo) <= k <= width_key(self.hi):
            raise ValueError(f"width {width:g} outside the width range {self.describe()}")
        # Widths scale relative to ``hi`` (the size the layer was built at); for hi == 1.0 this is exactly the
        # official ``max_channels * width`` since ``width / 1.0 == width`` in floating point.
        return make_divisible(self.max_channels * (width / self.hi) / self.ratio, self.divisor) * self.ratio

    def describe(self) -> str:
        return f"[{self.lo:g}, {self.hi:g}]"


@dataclass(frozen=True)
class Widths:
    """The widths a model runs at: what :func:`slimmable.get_widths` returns.

    Attributes:
        switches: the widths to iterate, ascending: an S-Net's switches (the only widths it runs at), or a
            universally slimmable model's widths with stored BN statistics (it runs at any width in ``range``;
            these run in eval mode without calibration).
        range: ``(lo, hi)`` of a universally slimmable model, else ``None``.

    Iterating, ``len`` and ``in`` go over :attr:`switches`; ``in`` on a range model asks whether a width is in its
    range.
    """

    switches: tuple[float, ...] = ()
    range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "switches", tuple(sorted({width_key(w) for w in self.switches})))
        if self.range is not None:
            lo, hi = (width_key(w) for w in self.range)
            if not 0 < lo <= hi:
                raise ValueError(f"width range {self.range} must satisfy 0 < lo <= hi")
            object.__setattr__(self, "range", (lo, hi))

    @property
    def is_range(self) -> bool:
        """Whether the model is universally slimmable (any width in :attr:`range`)."""
        return self.range is not None

    def __iter__(self) -> Iterator[float]:
        return iter(self.switches)

    def __len__(self) -> int:
        return len(self.switches)

    def __contains__(self, width: object) -> bool:
        if isinstance(width, bool) or not isinstance(width, (int, float)):
            return False
        k = width_key(width)
        if self.range is not None:
            return self.range[0] <= k <= self.range[1]
        return k in self.switches

    def describe(self) -> str:
        """``(0.25, 0.5, 1)``, or ``any width in [0.35, 1]`` for a range."""
        if self.range is not None:
            return f"any width in [{self.range[0]:g}, {self.range[1]:g}]"
        return format_widths(self.switches)
