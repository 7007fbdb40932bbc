"""Helpers for the export tests: models with non-trivial BN statistics, so that every layer's slicing matters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimmable


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine parameters (bounded, so deep nets stay finite) and a larger classifier."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.running_mean is not None:
                    m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(1.0 + torch.rand(m.running_var.shape, generator=g))
                if m.affine:
                    m.weight.copy_(0.5 + 0.5 * torch.rand(m.weight.shape, generator=g))
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, nn.Linear):
                m.weight.copy_(0.1 * torch.randn(m.weight.shape, generator=g))
    return model


def _build(name: str, **kwargs) -> nn.Module:
    """A small registered model: 10 classes; 32x32 stems for the mobile nets (the ResNets keep their ImageNet
    stem, which shrinks 32x32 inputs quickly and keeps the deep ones fast)."""
    small = not name.startswith("slim_resnet")
    kwargs.setdefault("num_classes", 10)
    model = slimmable.create_model(name, small_input=small, **kwargs)
    return randomize(model).eval()


def _test_widths(model: nn.Module) -> tuple[float, ...]:
    """All switches of an S-Net; first, middle and last statistics width of a US-Net."""
    ws = tuple(model.widths)
    if getattr(model, "width_range", None) is None:
        return ws
    return (ws[0], ws[len(ws) // 2], ws[-1])


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine two OpenMP threads competing with another process can
    stall for seconds per forward pass; one thread keeps these tests fast and their CPU use modest."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def build():
    """Factory: ``build(name, **kwargs)`` → a small randomized model in eval mode."""
    return _build


@pytest.fixture
def widths_of():
    """Factory: ``widths_of(model)`` → the widths to test."""
    return _test_widths
