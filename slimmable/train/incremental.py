"""Incremental training (the S-Nets paper's baseline): freeze the narrow network, train only the added channels.

Stage ``k`` trains width ``w_k`` while the sub-network of width ``w_{k-1}`` (every weight slice it uses) stays
exactly as stage ``k-1`` left it: its gradients are zeroed and, after each optimizer step, its values are
restored (so weight decay and momentum cannot move it either). Which parameter blocks the narrow network uses is
each slimmable layer's answer (:meth:`slimmable.nn.SlimModule.active_slices`). Each width keeps its own
switchable BN, so the frozen network's accuracy is unchanged by later stages.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..nn import record_input_channels, slim_modules, use_width

__all__ = ["FrozenSubnet"]


class FrozenSubnet:
    """Keeps the weights of ``model``'s width-``width`` sub-network fixed during further training.

    Args:
        model: a slimmable model.
        width: the width whose sub-network is frozen.
        example: an input batch (one image suffices) to find each layer's input channels.
        optimizer: if given, values are restored after each of its steps (weight decay, momentum).

    Call :meth:`remove` to stop freezing.
    """

    def __init__(
        self,
        model: nn.Module,
        width: float,
        example: torch.Tensor,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        was_training = model.training
        try:
            model.eval()
            with use_width(model, width):
                cin = record_input_channels(model, example)
        finally:
            model.train(was_training)
        self.slices: list[tuple[torch.Tensor, tuple[slice, ...], torch.Tensor]] = []
        self.handles = []
        with use_width(model, width):
            # each slimmable layer names the parameter blocks the narrow network uses
            for name, m in slim_modules(model, outermost=True):
                if name in cin:
                    for param, idx in m.active_slices(cin[name]):
                        self._freeze(param, idx)
        # Layers that are not slimmable (MobileNet v2's last conv BN and classifier) are shared by every width:
        # the narrow network uses all of them, so they are frozen whole, running statistics included.
        inside_slim = {id(sub) for _, m in slim_modules(model) for sub in m.modules()}
        for m in model.modules():
            if id(m) in inside_slim:
                continue
            for p in m.parameters(recurse=False):
                self._freeze(p, (slice(None),))
            for b in m.buffers(recurse=False):
                if b.is_floating_point():
                    self.slices.append((b, (slice(None),), b.detach().clone()))
        self.optimizer_handle = optimizer.register_step_post_hook(self._restore) if optimizer is not None else None

    def _freeze(self, param: torch.Tensor, idx: Sequence[slice]) -> None:
        idx = tuple(idx)
        self.slices.append((param, idx, param.detach()[idx].clone()))
        if not param.requires_grad:
            return

        def zero_grad(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            grad[idx] = 0
            return grad

        self.handles.append(param.register_hook(zero_grad))

    @torch.no_grad()
    def restore(self) -> None:
        """Write the frozen values back (called after every optimizer step when an optimizer was given)."""
        for param, idx, value in self.slices:
            param[idx] = value

    def _restore(self, *args: object) -> None:
        self.restore()

    def remove(self) -> None:
        """Stop freezing: remove the gradient hooks and the optimizer hook."""
        for h in self.handles:
            h.remove()
        if self.optimizer_handle is not None:
            self.optimizer_handle.remove()
        self.handles = []
