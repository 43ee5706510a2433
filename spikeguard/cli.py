"""The ``spikeguard`` command: one subcommand per module, each registering itself."""

from __future__ import annotations

import argparse
import importlib
import sys

import spikeguard

#: Modules that provide ``add_parser(subparsers) -> argparse.ArgumentParser`` and set
#: ``func=<callable(args) -> int>`` on it. Imported lazily so that ``--help`` stays fast.
SUBCOMMANDS: dict[str, str] = {
    "reproduce": "spikeguard.reproduce.cli",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spikeguard",
        description="Gradient-spike diagnostics for transformer training.",
    )
    parser.add_argument("--version", action="version", version=f"spikeguard {spikeguard.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
