"""Tracing with ``torch.fx``: a submodule whose code cannot be traced becomes a leaf (it is then frozen).

Python control flow on sizes (``assert h == self.img_size``, ``if W % 2: pad``) meets ``torch.fx`` proxies, which
have no value. Given the example input, the tracer evaluates such a condition on it (running the graph traced so far)
and follows the branch the example takes; the graph then records a guard (:func:`check_traced_branch`) that raises
when another input would take the other branch. Sizes themselves stay symbolic, so the result still runs on inputs
that take the same branches. Conditions on tensor values are not resolved (they depend on the data).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..nn.converted_attention import attention_support

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


def check_traced_branch(value: object, expected: bool, where: str) -> None:
    """The guard a converted graph runs where the original branched on a size: the branch was fixed by the example
    input at conversion, so an input taking the other one is refused.

    Raises:
        ValueError: ``bool(value)`` differs from the branch traced.
    """
    if bool(value) != expected:
        raise ValueError(
            f"{where}: this input takes another branch of the model's code than the example input it was converted "
            "with (a condition on the input size); convert it with an example input of this size"
        )


class _Tracer(fx.Tracer):
    def __init__(self, leaves: set[str], example: torch.Tensor | None = None) -> None:
        super().__init__()
        self.leaves = leaves
        self.failed: tuple[str, str] | None = None
        self.example = example
        self.values: dict[fx.Node, Any] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaves or isinstance(m, LEAF_TYPES) or type(m).__name__ in _LEAF_NAMES:
            return True
        if attention_support(m) != "":  # an attention type: replaced whole by a slimmable one, or frozen whole
            return True
        return super().is_leaf_module(m, qualname)

    def to_bool(self, obj: fx.Proxy) -> bool:
        """A condition on a proxy: its value on the example input when it is a size (not a tensor)."""
        try:
            value = self.concrete(obj.node)
        except Exception as err:
            _logger.debug("cannot evaluate %s on the example input: %s", obj.node, err)
            value = None
        if isinstance(value, torch.Tensor) or not isinstance(value, (bool, int, float)):
            return super().to_bool(obj)
        where = self.scope.module_path or "the model's forward"
        self.create_proxy("call_function", check_traced_branch, (obj, bool(value), where), {})
        return bool(value)

    @torch.no_grad()
    def concrete(self, target: fx.Node) -> Any:
        """The value of ``target`` on the example input: the graph traced so far runs once, in order, in eval mode
        (values are kept, so each node runs at most once)."""
        if self.example is None:
            raise ValueError("no example input")
        for node in self.graph.nodes:
            if node not in self.values:
                self.values[node] = self._run(node)
            if node is target:
                return self.values[node]
        raise ValueError(f"{target} is not in the graph")

    def _run(self, node: fx.Node) -> Any:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: self.values[n])
        if node.op == "placeholder":
            first = next(iter(self.graph.nodes)) is node
            return self.example if first else (args[0] if args else None)
        if node.op == "get_attr":
            obj: Any = self.root
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            return obj
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":
            mod = self.root.get_submodule(str(node.target))
            modes = [(m, m.training) for m in mod.modules()]
            mod.eval()  # statistics must not move while tracing in training mode
            try:
                return mod(*args, **kwargs)
            finally:
                for m, mode in modes:
                    m.training = mode
        return None

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as err:
            if self.failed is None:  # the innermost module that failed
                self.failed = (self.path_of_module(m), f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
            raise


def trace(
    model: nn.Module,
    max_retries: int = 50,
    known_leaves: dict[str, str] | None = None,
    example: torch.Tensor | None = None,
) -> tuple[fx.GraphModule, dict[str, str]]:
    """Trace ``model`` with ``torch.fx``; each submodule whose forward fails to trace becomes a leaf.

    Args:
        model: the module to trace.
        max_retries: most submodules to turn into leaves before giving up.
        known_leaves: submodules already known to fail (``{path: error}``), traced as leaves from the start.
        example: an input to resolve conditions on sizes with (see the module docstring); without it such a
            condition fails to trace.

    Returns:
        The graph module and ``{module path: why it is a leaf}`` for the submodules that could not be traced.

    Raises:
        ValueError: the model's own ``forward`` cannot be traced (the message names the failure).
    """
    leaves: dict[str, str] = dict(known_leaves or {})
    for _ in range(max_retries):
        tracer = _Tracer(set(leaves), example)
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
        _inline_defaults(graph)
        return fx.GraphModule(model, graph, class_name=type(model).__name__), leaves
    raise ValueError(f"{type(model).__name__}: more than {max_retries} submodules fail to trace")


def _inline_defaults(graph: fx.Graph) -> None:
    """Forward arguments after the image that keep their default (timm's ``attn_mask=None``) become constants of
    the graph: the converted model takes the image alone, as its export does."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in placeholders[1:]:
        if len(node.args) != 1 or isinstance(node.args[0], fx.Node):
            continue  # no default: a required argument stays one

        def constant(n: fx.Node, node: fx.Node = node, default: Any = node.args[0]) -> Any:
            return default if n is node else n

        for user in list(node.users):
            user.args, user.kwargs = fx.node.map_arg(user.args, constant), fx.node.map_arg(user.kwargs, constant)
        graph.erase_node(node)


class _ShapeProp(ShapeProp):
    """``ShapeProp`` remembering the node that runs (to name it when the model refuses the example)."""

    current: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        return super().run_node(n)


@torch.no_grad()
def propagate_shapes(gm: fx.GraphModule, example: torch.Tensor) -> Any:
    """Run ``gm`` once on ``example``, storing every node's output shape in ``node.meta['tensor_meta']``.

    Returns:
        The output of ``gm`` (the original model's, as nothing is replaced yet).

    Raises:
        ValueError: the model refuses the example (one of its own checks fails, e.g. a fixed image size); the
            message gives the check's message with the example's values.
    """
    prop = _ShapeProp(gm)
    try:
        return prop.propagate(example)
    except Exception as err:
        cause = err.__cause__ or err
        names = {n.name: v for n, v in prop.env.items()}
        # messages formatted while tracing show proxies: put the example's values in
        msg = re.sub(r"Proxy\((\w+)\)", lambda m: str(names.get(m.group(1), m.group(0))), str(cause).splitlines()[0])
        node = prop.current
        stack = (node.meta.get("nn_module_stack") or {}) if node is not None else {}
        where = next(reversed(stack), "") if stack else ""
        raise ValueError(
            f"{type(gm).__name__} refuses the example input of shape {tuple(example.shape)}"
            f"{f' in {where}' if where else ''} ({type(cause).__name__}: {msg[:300]}); give convert(example_input=...) "
            "an input of the size the model takes"
        ) from err
