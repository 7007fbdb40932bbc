"""Tracing with ``torch.fx``: a submodule whose code cannot be traced becomes a leaf (it is then frozen)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

_logger = logging.getLogger(__name__)

#: layer types the converter replaces or understands; traced as leaves even when subclassed
LEAF_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv2d,
    nn.Linear,
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
)

#: modules whose forward depends on the training flag in Python (traced as leaves so that the flag keeps working)
_LEAF_NAMES = {"StochasticDepth"}


class _Tracer(fx.Tracer):
    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves
        self.failed: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaves or isinstance(m, LEAF_TYPES) or type(m).__name__ in _LEAF_NAMES:
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as err:
            if self.failed is None:  # the innermost module that failed
                self.failed = (self.path_of_module(m), f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
            raise


def trace(
    model: nn.Module, max_retries: int = 50, known_leaves: dict[str, str] | None = None
) -> tuple[fx.GraphModule, dict[str, str]]:
    """Trace ``model`` with ``torch.fx``; each submodule whose forward fails to trace becomes a leaf.

    Args:
        model: the module to trace.
        max_retries: most submodules to turn into leaves before giving up.
        known_leaves: submodules already known to fail (``{path: error}``), traced as leaves from the start.

    Returns:
        The graph module and ``{module path: why it is a leaf}`` for the submodules that could not be traced.

    Raises:
        ValueError: the model's own ``forward`` cannot be traced (the message names the failure).
    """
    leaves: dict[str, str] = dict(known_leaves or {})
    for _ in range(max_retries):
        tracer = _Tracer(set(leaves))
        try:
            graph = tracer.trace(model)
        except Exception as err:
            failed = tracer.failed
            if failed is None or failed[0] in leaves or failed[0] == "":
                raise ValueError(
                    f"torch.fx cannot trace the forward of {type(model).__name__} itself ({type(err).__name__}: "
                    f"{str(err).splitlines()[0][:200]}); convert its submodules instead (e.g. model.features)"
                ) from err
            _logger.info("cannot trace %s (%s): kept as a frozen leaf", failed[0], failed[1])
            leaves[failed[0]] = failed[1]
            continue
        return fx.GraphModule(model, graph, class_name=type(model).__name__), leaves
    raise ValueError(f"{type(model).__name__}: more than {max_retries} submodules fail to trace")


@torch.no_grad()
def propagate_shapes(gm: fx.GraphModule, example: torch.Tensor) -> Any:
    """Run ``gm`` once on ``example``, storing every node's output shape in ``node.meta['tensor_meta']``.

    Returns:
        The output of ``gm`` (the original model's, as nothing is replaced yet).
    """
    return ShapeProp(gm).propagate(example)
