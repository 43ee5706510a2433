"""The ``spikeguard`` command."""

from __future__ import annotations

import argparse
import sys

import spikeguard


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spikeguard",
        description="Gradient-spike diagnostics for transformer training.",
    )
    parser.add_argument("--version", action="version", version=f"spikeguard {spikeguard.__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
