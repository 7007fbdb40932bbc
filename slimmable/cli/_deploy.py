"""Arguments and model loading shared by ``slimmable export`` and ``slimmable serve``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..checkpoint import LoadedModel, load_model
from ._common import parse_widths


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--checkpoint``, ``--model`` and the model-building options."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--checkpoint", metavar="PATH", help="a slimmable training checkpoint, or an official one (+--model)"
    )
    g.add_argument("--model", metavar="NAME", help="registered model name; alone: random weights (demo only)")
    g.add_argument("--widths", help="comma-separated widths the model was built with (official checkpoints)")
    g.add_argument("--num-classes", type=int, help="classifier outputs (default: the model's, 1000)")
    g.add_argument("--in-chans", type=int, help="input channels (default 3)")
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


def read_channel_spec(path: str) -> dict[str, int]:
    """A ChannelSpec file: JSON or YAML ``{layer: channels}``, or ``{"channels": {layer: channels}, ...}``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"channel spec {p} does not exist")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ValueError(f"channel spec {p} is not valid JSON ({err}); use .yaml for YAML") from err
    if isinstance(data, dict) and isinstance(data.get("channels"), dict):
        data = data["channels"]
    if not isinstance(data, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in data.values()):
        raise ValueError(
            f'channel spec {p} must map layer names to integer channel counts, e.g. {{"features.0.0": 16}}'
        )
    return {str(k): int(v) for k, v in data.items()}
