"""Width samplers: which widths train on a batch (Algorithm 1 trains all switches; US-Nets sample a sandwich)."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from ..nn import normalize_widths

__all__ = ["SAMPLERS", "AllWidths", "Sandwich", "WidthSampler", "create_width_sampler"]

SAMPLERS = ("all", "sandwich")


@runtime_checkable
class WidthSampler(Protocol):
    """Chooses the widths of one training step.

    ``widths_for_step`` must return the widest width first (in-place distillation uses its predictions as the
    target of the others) and must depend only on ``step`` and ``rng``, so that every process of a distributed
    run picks the same widths.

    A sampler may also have a ``fixed_widths`` attribute: the widths it trains at every step. Those keep BN running
    statistics during training (the trainer validates on them and reports their losses one by one); any other
    width is reported as ``"random"``.
    """

    def widths_for_step(self, step: int, rng: random.Random) -> list[float | Mapping[str, float]]:
        """Widths to train at optimizer step ``step``, widest first (a mapping: one width per layer)."""
        ...


class AllWidths:
    """Every switch on every batch, widest first: Algorithm 1 of the slimmable-networks paper.

    Args:
        widths: the model's switches.
    """

    def __init__(self, widths: Sequence[float]) -> None:
        self.widths = tuple(sorted(normalize_widths(widths), reverse=True))
        self.fixed_widths = self.widths

    def widths_for_step(self, step: int, rng: random.Random) -> list[float]:
        return list(self.widths)

    def __repr__(self) -> str:
        return f"AllWidths({', '.join(f'{w:g}' for w in self.widths)})"


class Sandwich:
    """The sandwich rule of universally slimmable networks (Yu & Huang 2019).

    Each step trains the widest width ``hi``, the narrowest ``lo`` and ``n - 2`` widths drawn uniformly from
    ``(lo, hi)`` with the step's ``rng`` (so the draw depends on the seed and the step only), widest first.

    With ``layer_groups`` the random widths are non-uniform: each random sample draws one width per group of
    layers (layers tied by a residual addition share a draw) and is returned as ``{layer name: width}``, which
    :func:`slimmable.nn.set_layer_widths` applies. The widest and narrowest samples stay uniform.

    Args:
        lo: the narrowest width of the model's range.
        hi: the widest width.
        n: widths per step, ``>= 2`` (the official recipes use 4).
        layer_groups: the model's ``channel_groups()``, for non-uniform random widths; ``None``: uniform.

    Raises:
        ValueError: ``n < 2``, not ``0 < lo < hi``, or empty ``layer_groups``.
    """

    def __init__(self, lo: float, hi: float, n: int = 4, layer_groups: Sequence[Sequence[str]] | None = None) -> None:
        lo, hi = float(lo), float(hi)
        if not 0 < lo < hi:
            raise ValueError(
                f"sandwich width range ({lo:g}, {hi:g}) must satisfy 0 < lo < hi; give the model's width_range"
            )
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"sandwich n={n!r} must be an integer >= 2 (widest + narrowest + n-2 random widths)")
        self.lo, self.hi, self.n = normalize_widths([lo])[0], normalize_widths([hi])[0], n
        self.fixed_widths = (self.hi, self.lo)
        self.layer_groups = None if layer_groups is None else [list(g) for g in layer_groups]
        if self.layer_groups is not None and not all(self.layer_groups):
            raise ValueError("layer_groups must be non-empty groups of layer names (the model's channel_groups())")

    def widths_for_step(self, step: int, rng: random.Random) -> list[float | Mapping[str, float]]:
        """``[hi, n - 2 random widths (descending), lo]``; the random widths come from ``rng`` alone."""
        if self.layer_groups is not None:
            layerwise = [self._layerwise(rng) for _ in range(self.n - 2)]
            return [self.hi, *layerwise, self.lo]
        randoms = sorted((round(rng.uniform(self.lo, self.hi), 6) for _ in range(self.n - 2)), reverse=True)
        return [self.hi, *randoms, self.lo]

    def _layerwise(self, rng: random.Random) -> dict[str, float]:
        assert self.layer_groups is not None
        out: dict[str, float] = {}
        for group in self.layer_groups:
            w = round(rng.uniform(self.lo, self.hi), 6)
            out.update(dict.fromkeys(group, w))
        return out

    def __repr__(self) -> str:
        kind = ", per layer" if self.layer_groups is not None else ""
        return f"Sandwich(lo={self.lo:g}, hi={self.hi:g}, n={self.n}{kind})"


def create_width_sampler(
    name: str,
    widths: Sequence[float],
    width_range: tuple[float, float] | None = None,
    n: int = 4,
    layer_groups: Sequence[Sequence[str]] | None = None,
) -> WidthSampler:
    """Build a width sampler by name.

    Args:
        name: ``all`` (every width in ``widths`` on every batch: S-Nets) or ``sandwich`` (US-Nets: the range ends
            plus ``n - 2`` random widths per step).
        widths: the model's widths (switches, or a US model's BN statistics widths).
        width_range: ``(lo, hi)`` of a universally slimmable model; required by ``sandwich``.
        n: widths per step of ``sandwich``.
        layer_groups: ``sandwich`` only: draw the random widths per group of layers (non-uniform widths).

    Raises:
        ValueError: unknown name, ``sandwich`` without a width range, or ``layer_groups`` with ``all``.
    """
    if name == "all":
        if layer_groups is not None:
            raise ValueError("per-layer random widths need the sandwich sampler (train.width_sampler: sandwich)")
        return AllWidths(widths)
    if name == "sandwich":
        if width_range is None:
            raise ValueError(
                "width sampler 'sandwich' draws random widths from a range, but this model has fixed switches "
                f"{tuple(widths)}; use a universally slimmable model (us_mobilenet_v1, us_mobilenet_v2, or "
                "model.width_range) or train.width_sampler: all"
            )
        return Sandwich(width_range[0], width_range[1], n, layer_groups)
    raise ValueError(f"width sampler {name!r} is not one of {', '.join(SAMPLERS)}")
