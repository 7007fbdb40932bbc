"""Width samplers: which widths train on a batch (Algorithm 1 trains all switches; US-Nets sample a sandwich)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from ..nn import normalize_widths

__all__ = ["AllWidths", "WidthSampler", "create_width_sampler"]


@runtime_checkable
class WidthSampler(Protocol):
    """Chooses the widths of one training step.

    ``widths_for_step`` must return the widest width first (in-place distillation uses its predictions as the
    target of the others) and must depend only on ``step`` and ``rng``, so that every process of a distributed
    run picks the same widths.
    """

    def widths_for_step(self, step: int, rng: random.Random) -> list[float]:
        """Widths to train at optimizer step ``step``, widest first."""
        ...


class AllWidths:
    """Every switch on every batch, widest first: Algorithm 1 of the slimmable-networks paper.

    Args:
        widths: the model's switches.
    """

    def __init__(self, widths: Sequence[float]) -> None:
        self.widths = tuple(sorted(normalize_widths(widths), reverse=True))

    def widths_for_step(self, step: int, rng: random.Random) -> list[float]:
        return list(self.widths)

    def __repr__(self) -> str:
        return f"AllWidths({', '.join(f'{w:g}' for w in self.widths)})"


_SAMPLERS = {"all": AllWidths}


def create_width_sampler(name: str, widths: Sequence[float]) -> WidthSampler:
    """Build a width sampler by name (``all``).

    Raises:
        ValueError: unknown name.
    """
    if name not in _SAMPLERS:
        raise ValueError(f"width sampler {name!r} is not one of {', '.join(_SAMPLERS)}")
    return _SAMPLERS[name](widths)
