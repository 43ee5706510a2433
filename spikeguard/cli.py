"""The ``spikeguard`` command: one subcommand per module, each registering itself."""

from __future__ import annotations

import argparse
import importlib
import sys

import spikeguard

#: Modules that provide ``add_parser(subparsers) -> argparse.ArgumentParser`` and set
#: ``func=<callable(args) -> int>`` on it. Imported lazily so that ``--help`` stays fast.
SUBCOMMANDS: dict[str, str] = {
    "fit": "spikeguard.recipes.cli",
    "demo": "spikeguard.demo",
    "reproduce": "spikeguard.reproduce.cli",
    "dashboard": "spikeguard.dashboard",
    "report": "spikeguard.report.cli",
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
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["fit"]:  # LightningCLI parses its own arguments (and --help)
        from spikeguard.recipes.cli import fit

        return fit(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
