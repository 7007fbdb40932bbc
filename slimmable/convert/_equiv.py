"""Layers recognised by what they compute: subclasses of the layers the converter replaces, and activations.

A model zoo wraps the standard layers: timm's ``BatchNormAct2d`` is an ``nn.BatchNorm2d`` whose forward adds a
dropout and an activation, its ``Linear`` an ``nn.Linear`` with its own forward, its activations (``Swish``,
``HardSigmoid``, ...) modules of their own. Each such module is run once on a random input of the shape it meets
in the traced graph and compared with the base class's forward (followed by its ``drop`` and ``act`` children for
a norm-act): equal outputs make it the base layer (a norm-act keeps its activation). The comparison decides only
*which computation* a module performs; which dimension holds the channels always comes from the traced shapes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

#: base layers a subclass may stand for, checked in this order (BatchNorm2d before its _BatchNorm parents)
_BASES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.GroupNorm)


@dataclass(frozen=True)
class Equivalent:
    """What a module computes: ``base`` (one of the standard layers), then ``drop`` and ``act`` when ``with_act``."""

    base: type[nn.Module]
    with_act: bool = False


def _random_like(shape: tuple[int, ...], gen: torch.Generator, like: torch.Tensor | None) -> torch.Tensor:
    x = torch.randn((max(2, shape[0]), *shape[1:]), generator=gen)
    return x if like is None else x.to(device=like.device, dtype=like.dtype)


def _first_tensor(m: nn.Module) -> torch.Tensor | None:
    return next(iter(m.parameters()), None) if any(True for _ in m.parameters()) else next(iter(m.buffers()), None)


@torch.no_grad()
def is_elementwise(m: nn.Module, shape: tuple[int, ...] = (2, 8, 4, 4)) -> bool:
    """Whether ``m`` (no parameters, no buffers) maps each element on its own: permuting the elements of a random
    input permutes the output the same way. Dropout counts (identity in eval mode)."""
    if any(True for _ in m.parameters()) or any(True for _ in m.buffers()):
        return False
    if isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout2d)):
        return True
    gen = torch.Generator().manual_seed(0)
    x = _random_like(shape, gen, None) * 3
    perm = torch.randperm(x.numel(), generator=gen)
    was = m.training
    m.eval()
    try:
        y = m(x.clone())
        z = m(x.flatten()[perm].view_as(x).clone())
    except Exception:
        return False
    finally:
        m.train(was)
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or z.shape != x.shape:
        return False
    return bool(torch.allclose(z.flatten(), y.flatten()[perm], atol=1e-6))


@torch.no_grad()
def equivalent(m: nn.Module, shape: tuple[int, ...]) -> Equivalent | None:
    """The standard layer ``m`` (a subclass of one, with its own ``forward``) computes on inputs of ``shape``.

    Args:
        m: the module (in eval mode, as the converter traces).
        shape: the input shape it meets in the traced graph.

    Returns:
        ``Equivalent(base)`` when ``m(x)`` equals ``base.forward(m, x)``; ``Equivalent(base, with_act=True)``
        when it equals ``m.act(m.drop(base.forward(m, x)))`` with an elementwise ``act`` and ``drop``; ``None``
        otherwise (the module stays frozen).
    """
    base = next((b for b in _BASES if isinstance(m, b)), None)
    if base is None:
        return None
    if type(m) is base:
        return Equivalent(base)
    gen = torch.Generator().manual_seed(0)
    x = _random_like(shape, gen, _first_tensor(m))
    probe = copy.deepcopy(m).eval()  # a forward may update state (statistics, caches); the original stays as it is
    try:
        y = probe(x)
        ref = base.forward(probe, x)
    except Exception:
        return None
    if not isinstance(y, torch.Tensor) or y.shape != ref.shape:
        return None
    if torch.allclose(y, ref, atol=1e-5, rtol=1e-5):
        return Equivalent(base)
    act, drop = getattr(m, "act", None), getattr(m, "drop", nn.Identity())
    if not (isinstance(act, nn.Module) and isinstance(drop, nn.Module)):
        return None
    if not (is_elementwise(act, tuple(ref.shape)) and is_elementwise(drop, tuple(ref.shape))):
        return None
    with_act = probe.act(probe.drop(ref))
    if torch.allclose(y, with_act, atol=1e-5, rtol=1e-5):
        return Equivalent(base, with_act=True)
    return None
