"""Entry point of the ``slimmable`` command: one sub-module per sub-command, each with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from ._common import describe_os_error

# Sub-commands in the order ``--help`` lists them; each is the module ``slimmable.cli.<name>_cmd``.
COMMANDS = ("train", "eval", "calibrate", "search", "report", "list", "profile", "export", "serve", "convert")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimmable",
        description="Slimmable neural networks: one set of weights that runs at several widths.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"slimmable.cli.{name}_cmd")
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, KeyError, TypeError, FloatingPointError) as err:
        if args.verbose:
            raise
        print(f"slimmable {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a read-only or full disk, a path that is a file: one line, not a traceback
        if args.verbose:
            raise
        print(f"slimmable {args.command}: error: {describe_os_error(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
