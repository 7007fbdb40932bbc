"""AutoSlim: greedy per-layer channel search over a trained slimmable or universally slimmable model.

Starting from the widest network, each step tries shrinking every channel group (layers tied by residual
additions move together) by one notch, evaluates each candidate on held-out data, and keeps the candidate that
loses the least accuracy. The first network at or under each budget is recorded, so one pass serves all budgets.
The state is written after every step, so an interrupted search resumes where it stopped.

Candidates are evaluated as the model allows: a slimmable model (switchable BN) in eval mode, with each layer
choosing among its switches' channel counts and the matching statistics; a universally slimmable model with
batch statistics (BN in training mode on the held-out batches; no state changes), which is how AutoSlim ranks
arbitrary channel configurations.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._utils import write_json
from ..nn import SlimConv2d, WidthRange, WidthTable, set_channels, set_width, slim_modules, use_width
from .cost import count_active_params, count_macs, measure_latency

__all__ = ["SearchResult", "autoslim_search", "channel_choices", "load_channel_spec", "save_channel_spec"]

logger = logging.getLogger(__name__)

METRICS = ("flops", "params", "latency")


def channel_choices(layer: SlimConv2d, steps: int = 12) -> list[int]:
    """Channel counts a layer may take in the search, largest first.

    A slimmable layer takes its switches' counts (each has BN statistics); a universally slimmable layer takes
    ``steps`` + 1 evenly spaced widths of its range, with the official rounding.
    """
    rule = layer.out_rule
    if isinstance(rule, WidthTable):
        return sorted(set(rule.channels), reverse=True)
    if isinstance(rule, WidthRange):
        ws = [rule.lo + (rule.hi - rule.lo) * i / steps for i in range(steps + 1)]
        return sorted({rule(round(w, 6)) for w in ws}, reverse=True)
    raise ValueError(f"layer has no slimmable output (rule {rule!r})")


@dataclass
class SearchResult:
    """What a search found: for each budget the spec of the first network within it, with its cost and score."""

    metric: str
    budgets: list[float]
    found: dict[str, dict[str, Any]] = field(default_factory=dict)  # str(budget) -> {spec, cost, accuracy, step}
    history: list[dict[str, Any]] = field(default_factory=list)  # per step: group, channels, cost, accuracy
    current: dict[str, int] = field(default_factory=dict)  # group leader -> channels
    done: bool = False

    def spec_for(self, budget: float) -> dict[str, int]:
        """The channel spec found for ``budget``."""
        try:
            return dict(self.found[_bkey(budget)]["spec"])
        except KeyError as err:
            raise KeyError(f"no network found for budget {budget:g}; found: {sorted(self.found)}") from err

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bkey(budget: float) -> str:
    return f"{budget:g}"


@contextlib.contextmanager
def _search_mode(model: nn.Module, batch_stats: bool) -> Iterator[None]:
    was_training = model.training
    model.eval()
    if batch_stats:
        for _, m in slim_modules(model):
            if hasattr(m, "stat_widths"):  # USBatchNorm2d: normalise with batch statistics, store nothing
                m.train()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def _accuracy(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    correct = total = 0
    for x, y in batches:
        pred = model(x).argmax(1)
        correct += int((pred == y).sum())
        total += y.numel()
    return correct / max(total, 1)


def autoslim_search(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    budgets: Sequence[float],
    metric: str = "flops",
    input_size: Sequence[int] = (3, 224, 224),
    steps: int = 12,
    state_path: str | os.PathLike[str] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> SearchResult:
    """Greedy channel search (AutoSlim) for each budget in one pass.

    Args:
        model: a trained slimmable or universally slimmable model with :meth:`channel_groups`.
        batches: held-out ``(images, labels)`` batches (carved from the training set, never the test set). They
            are materialised once and reused for every candidate.
        budgets: cost limits: MACs for ``flops``, parameter count for ``params``, milliseconds for ``latency``.
        metric: ``flops`` (MACs, as the official AutoSlim), ``params`` or ``latency`` (batch 1, current device).
        input_size: ``(C, H, W)`` of one image, for the cost.
        steps: notches per layer for universally slimmable layers.
        state_path: JSON file written after every step; if it exists the search resumes from it.
        progress: called with each step's record.

    Returns:
        A :class:`SearchResult`; ``result.spec_for(budget)`` is the channel spec for ``create_model(...,
        channels=spec)`` or :func:`slimmable.nn.set_channels`.

    Raises:
        ValueError: unknown metric, empty budgets, a state file from another search, or (``flops``/``params``) a
            budget below the narrowest network's cost, which no search reaches (checked before step 1).
    """
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not one of {METRICS}")
    if not budgets:
        raise ValueError("give at least one budget")
    groups = model.channel_groups()  # type: ignore[operator]
    layers = dict(slim_modules(model))
    leaders = [g[0] for g in groups]
    choices = {g[0]: channel_choices(layers[g[0]], steps) for g in groups}
    batch_stats = any(isinstance(getattr(m, "out_rule", None), WidthRange) for m in layers.values())
    data = [(x, y) for x, y in batches]
    if not data:
        raise ValueError("autoslim_search got no held-out batches")
    device = next(model.parameters()).device
    data = [(x.to(device), y.to(device)) for x, y in data]
    probe = torch.randn(2, *input_size, device=device)

    def cost() -> float:
        if metric == "flops":
            return count_macs(model, probe, eval_mode=False) / 2
        if metric == "params":
            return float(count_active_params(model, probe, eval_mode=False))
        return measure_latency(model, probe[:1], runs=10, warmup=2, eval_mode=False)

    def full(current: Mapping[str, int]) -> dict[str, int]:
        return {name: current[g[0]] for g in groups for name in g}

    def apply(current: Mapping[str, int]) -> None:
        set_channels(model, full(current))

    budgets = sorted((float(b) for b in budgets), reverse=True)
    path = Path(state_path) if state_path is not None else None
    result = SearchResult(metric, budgets)
    if path is not None and path.exists():
        saved = json.loads(path.read_text())
        if saved.get("metric") != metric or sorted(saved.get("current", {})) != sorted(leaders):
            raise ValueError(f"state file {path} belongs to another search (metric or layers differ); remove it")
        result = SearchResult(**saved)
        result.budgets = sorted(set(result.budgets) | set(budgets), reverse=True)
        logger.info("resuming search from %s at step %d", path, len(result.history))
    if not result.current:
        result.current = {leader: choices[leader][0] for leader in leaders}

    with use_width(model, max(getattr(model, "widths", (1.0,)))), _search_mode(model, batch_stats):
        apply({leader: choices[leader][-1] for leader in leaders})  # every group at its fewest channels
        _check_reachable(budgets, cost(), metric)
        apply(result.current)
        here_cost, here_acc = cost(), _accuracy(model, data)
        _record(result, full(result.current), here_cost, here_acc, len(result.history))
        while not result.done:
            pending = [b for b in result.budgets if _bkey(b) not in result.found]
            if not pending:
                result.done = True
                break
            # Rank by held-out accuracy (AutoSlim's criterion); the cost is measured for the winner only, which
            # keeps a step at one forward pass per group.
            best: tuple[float, str, int] | None = None
            for leader in leaders:
                c = result.current[leader]
                lower = [v for v in choices[leader] if v < c]
                if not lower:
                    continue
                apply(dict(result.current, **{leader: lower[0]}))
                acc = _accuracy(model, data)
                if best is None or acc > best[0]:
                    best = (acc, leader, lower[0])
            if best is None:  # nothing left to shrink: the remaining budgets are out of reach
                logger.warning("no layer can shrink further; budgets %s not reached", pending)
                result.done = True
                break
            acc, leader, channels = best
            result.current[leader] = channels
            apply(result.current)
            cst = cost()
            step = {"step": len(result.history), "group": leader, "channels": channels, "cost": cst, "accuracy": acc}
            result.history.append(step)
            _record(result, full(result.current), cst, acc, step["step"])
            if path is not None:  # saved before anything else can interrupt
                write_json(path, result.to_dict())
            if progress is not None:
                progress(step)
        set_width(model, max(getattr(model, "widths", (1.0,))))
    if path is not None:
        write_json(path, result.to_dict())
    return result


def _check_reachable(budgets: Sequence[float], narrowest: float, metric: str) -> None:
    """Refuse budgets below the narrowest network's cost before searching (latency, being noisy, only warns)."""
    out = [b for b in budgets if b < narrowest]
    if not out:
        return
    unit = " ms" if metric == "latency" else ""
    listed = ", ".join(f"{b:g}{unit}" for b in sorted(out))
    msg = (
        f"budgets {listed} are below the {metric} of the narrowest network ({narrowest:.6g}{unit}: every layer at its "
        f"fewest channels), so no search can reach them; give budgets of at least {narrowest:.6g}{unit}"
    )
    if metric == "latency":
        logger.warning("%s", msg)
        return
    raise ValueError(msg)


def _record(result: SearchResult, spec: Mapping[str, int], cst: float, acc: float, step: int) -> None:
    for b in result.budgets:
        if _bkey(b) not in result.found and cst <= b:
            result.found[_bkey(b)] = {"spec": dict(spec), "cost": cst, "accuracy": acc, "step": step}


def save_channel_spec(
    path: str | os.PathLike[str], spec: Mapping[str, int], meta: Mapping[str, Any] | None = None
) -> Path:
    """Write a ChannelSpec (layer name → channels) as JSON, with optional metadata (model, budget, cost)."""
    p = Path(path)
    write_json(p, {"channels": {k: int(v) for k, v in spec.items()}, **({"meta": dict(meta)} if meta else {})})
    return p


def load_channel_spec(path: str | os.PathLike[str]) -> dict[str, int]:
    """Read a ChannelSpec: what :func:`save_channel_spec` writes (``{"channels": {...}, "meta": ...}``) or a plain
    ``{name: channels}`` object, as JSON, or as YAML when the file ends in ``.yaml``/``.yml``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not valid JSON/YAML, or not a mapping of names to positive ints.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"channel spec {p} does not exist")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"channel spec {p} is not valid YAML: {err}") from err
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"channel spec {p} is not valid JSON ({err}); name a YAML file .yaml") from err
    spec = data.get("channels", data) if isinstance(data, dict) else None
    if not isinstance(spec, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0 for k, v in spec.items()
    ):
        raise ValueError(f"channel spec {p} must map layer names to positive ints, e.g. {{'features.0.0': 16}}")
    return spec
