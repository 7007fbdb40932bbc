"""BN calibration: re-estimate each width's BatchNorm statistics after training (US-Nets, naive-BN baselines).

Each slimmable layer names the statistics it uses at the current width (:meth:`SlimModule.stat_layers`), the
modules to train while they are re-estimated (:meth:`SlimModule.calibration_modules`), and whether it keeps one
set for all widths or gains a slot per width (``stats_shared_by_widths``, ``adds_stat_widths``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from .._utils import unwrap_model
from ..nn import get_widths, slim_modules, use_width

__all__ = ["add_stat_widths", "calibrate_bn", "calibrate_channels", "fixed_channels_name"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def calibrate_bn(
    model: nn.Module,
    batches: Iterable,
    widths: Sequence[float] | None = None,
    num_batches: int = 10,
    device: torch.device | str | None = None,
) -> dict[float, int]:
    """Re-estimate BN running statistics for each width from training batches.

    For each width the statistics of the BN layers active at that width are reset and recomputed as a
    cumulative average (``momentum=None``) over ``num_batches`` batches, in training mode for BN only (dropout
    and everything else stay in eval mode), without gradients. Only BN statistics change: weights, affine
    parameters and other widths' statistics are untouched. A universally slimmable model gains a statistics slot
    for each width it had none for, so the width then runs in eval mode and the slot is saved in checkpoints
    (:func:`slimmable.get_widths` then lists it, and :func:`slimmable.checkpoint.model_checkpoint` records it).

    Fixed-size BatchNorm layers shared by all widths (MobileNet v2's last 1x1 conv) keep their statistics.

    Args:
        model: a slimmable model.
        batches: iterable of ``(images, labels)`` or image tensors; use training images without augmentation.
        widths: widths to calibrate; default the model's widths.
        num_batches: batches per width.
        device: where to move the images (default: the model's device).

    Returns:
        Images used per width.

    Raises:
        ValueError: a width the model cannot run at, or too few batches.
    """
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    if widths is None:
        widths = get_widths(model).switches
    if device is None:
        device = next(model.parameters()).device
    widths = [float(w) for w in widths]
    if len(widths) > 1 and any(m.stats_shared_by_widths for _, m in slim_modules(model)):
        raise ValueError(
            "this model's BN is shared by all widths and holds one set of statistics: calibrate one width at a "
            "time, right before evaluating it (calibrate_bn(model, batches, widths=[w]))"
        )
    add_stat_widths(model, widths)
    slim = [m for _, m in slim_modules(model)]

    was_training = model.training
    used: dict[float, int] = {}
    try:
        model.eval()
        for w in widths:
            with use_width(model, w):
                stats = [bn for m in slim for bn in m.stat_layers()]
                also_train = [c for m in slim for c in m.calibration_modules()]
                used[w] = _reestimate(model, stats, also_train, batches, num_batches, device)
                logger.debug("calibrated BN at width %g on %d images", w, used[w])
    finally:
        model.train(was_training)
    return used


def _reestimate(
    model: nn.Module,
    layers: Sequence[nn.BatchNorm2d],
    also_train: Sequence[nn.Module],
    batches: Iterable,
    num_batches: int,
    device: torch.device | str,
) -> int:
    """Reset ``layers``' statistics and recompute them as a cumulative average over ``num_batches`` batches.

    ``model`` is in eval mode; only ``layers`` (and the wrappers ``also_train``) run in training mode meanwhile.
    Returns the number of images used.
    """
    saved = [(bn, bn.momentum) for bn in layers]
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    for m in also_train:
        m.train()
    n_images, n = 0, 0
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(device, non_blocking=True))
            n_images += x.shape[0]
            n += 1
            if n >= num_batches:
                break
    finally:
        for bn, momentum in saved:
            bn.momentum = momentum
            bn.eval()
        for m in also_train:
            m.eval()
    if n == 0:
        raise ValueError("BN calibration got no batches; pass a non-empty loader of training images")
    return n_images


def fixed_channels_name(model_name: str) -> str:
    """The registered family that builds a network with fixed per-layer channels: ``us_x`` → ``slim_x``."""
    return "slim_" + model_name[3:] if model_name.startswith("us_") else model_name


@torch.no_grad()
def calibrate_channels(
    model: nn.Module,
    spec: Mapping[str, int],
    batches: Iterable,
    num_batches: int = 10,
    device: torch.device | str | None = None,
) -> nn.Module:
    """The network a per-layer channel spec picks out of a trained model, with BN statistics re-estimated for it.

    A searched spec (AutoSlim) mixes widths across layers, so no stored statistics fit it: a universally slimmable
    model has none for the mix, and a slimmable model's switches were estimated with other input channels. This
    takes the spec's weights from ``model``, builds the fixed-channel network with
    ``create_model(fixed_channels_name(model.model_name), widths=[1.0], channels=full_spec, ...)`` (the network
    ``slimmable search`` prints for training from scratch), and re-estimates every BatchNorm's statistics on
    ``num_batches`` batches (cumulative average, no gradients). ``model`` is not modified.

    Args:
        model: a trained slimmable or universally slimmable model built by :func:`slimmable.create_model`.
        spec: layer name → output channels (layers not named keep their current size); a search's output.
        batches: ``(images, labels)`` batches or image tensors; use training images without augmentation.
        num_batches: batches to average over.
        device: where to run (default: the model's device).

    Returns:
        The fixed-channel model (eval mode, one width 1.0) with ``model_name``/``model_kwargs`` recorded, so it
        saves as a training checkpoint and exports like any slimmable model. ``calibration`` holds the images used.

    Raises:
        KeyError, ValueError: the spec names unknown layers or out-of-range counts; no batches.
    """
    from ..export.dense import export_channels  # export builds on the model layers, not on training
    from ..models import create_model

    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    src = unwrap_model(model)
    name, kwargs = getattr(src, "model_name", None), getattr(src, "model_kwargs", None)
    if not name or kwargs is None:
        raise ValueError("calibrate_channels needs a model built by slimmable.create_model (it records its arguments)")
    if device is None:
        device = next(model.parameters()).device
    dense = export_channels(src, spec, reset_bn_stats=True)
    full = dict(dense.export_info["channels"])
    keep = {k: v for k, v in kwargs.items() if k not in ("widths", "width_range", "stat_widths", "channels", "norm")}
    fixed_name = fixed_channels_name(name)
    try:
        fixed = create_model(fixed_name, widths=[1.0], channels=full, **keep).to(device)
    except TypeError as err:
        if "channels" not in str(err):
            raise
        raise ValueError(
            f"{fixed_name} cannot be built with per-layer channels (create_model(..., channels=spec)); the MobileNet "
            "families can"
        ) from err
    _load_dense_copy(fixed, dense)
    fixed.eval()
    layers = [m for m in fixed.modules() if isinstance(m, nn.BatchNorm2d) and m.track_running_stats]
    images = _reestimate(fixed, layers, (), batches, num_batches, device)
    fixed.calibration = {"images": images, "num_batches": num_batches}
    logger.debug("calibrated %s at a channel spec on %d images", name, images)
    return fixed


def add_stat_widths(model: nn.Module, widths: Sequence[float]) -> tuple[float, ...]:
    """Give every universally slimmable BN layer a (fresh) statistics slot for each width it lacks.

    The layers are the record: :func:`slimmable.get_widths` lists the new widths, and
    :func:`slimmable.checkpoint.model_build_kwargs` gives the ``create_model`` kwargs that rebuild the same slots
    (so a saved state dict loads); the model's own ``model_kwargs`` are not edited. New slots hold default
    statistics until trained or calibrated. A model without universally slimmable BN is left as it is.

    Args:
        model: a (possibly wrapped) slimmable model.
        widths: widths within the model's range.

    Returns:
        The model's statistics widths afterwards (empty for a model without universally slimmable BN).

    Raises:
        ValueError: a width outside the model's range.
    """
    us_layers = [m for _, m in slim_modules(model) if m.adds_stat_widths]
    for w in widths:
        for m in us_layers:
            m.add_stat_width(float(w))
    return get_widths(model).switches if us_layers else ()


@torch.no_grad()
def _load_dense_copy(fixed: nn.Module, dense: nn.Module) -> None:
    """Copy ``dense`` (an export of the same family, same module names) into ``fixed`` (built with its channels).

    Each slimmable layer of ``fixed`` loads its dense counterpart (:meth:`SlimModule.load_dense`); the tensors of
    the other layers are copied by state-dict key.
    """
    dense_modules = dict(dense.named_modules())
    prefixes = []
    for name, m in slim_modules(fixed, outermost=True):
        m.load_dense(dense_modules[name])
        prefixes.append(name + ".")
    dense_state = dense.state_dict()
    for key, t in fixed.state_dict().items():
        if not any(key.startswith(p) for p in prefixes):
            t.copy_(dense_state[key])
