"""Arguments and model loading shared by ``slimmable export`` and ``slimmable serve``."""

from __future__ import annotations

import argparse

from ..checkpoint import LoadedModel, load_model
from ._common import parse_widths, positive_int


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--checkpoint``, ``--model`` and the model-building options."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--checkpoint", metavar="PATH", help="a slimmable training checkpoint, or an official one (+--model)"
    )
    g.add_argument("--model", metavar="NAME", help="registered model name; alone: random weights (demo only)")
    g.add_argument("--widths", help="comma-separated widths the model was built with (official checkpoints)")
    g.add_argument("--num-classes", type=positive_int, help="classifier outputs (default: the model's, 1000)")
    g.add_argument("--in-chans", type=positive_int, help="input channels (default 3)")
    g.add_argument("--small-input", action="store_true", help="stride-1 stem for 28-32 px images")


def _load_model(args: argparse.Namespace) -> LoadedModel:
    """Load what ``--checkpoint``/``--model`` name (see :func:`slimmable.checkpoint.load_model`)."""
    return load_model(
        args.checkpoint,
        args.model,
        widths=parse_widths(args.widths),
        num_classes=args.num_classes,
        in_chans=args.in_chans,
        small_input=args.small_input or None,
    )


def describe_source(loaded: LoadedModel) -> str:
    """One line saying what was loaded, with a warning for random weights."""
    if loaded.random_weights:
        return f"{loaded.name}: RANDOM WEIGHTS (no --checkpoint given; predictions are meaningless, demo only)"
    return f"{loaded.name}: {loaded.source}"
