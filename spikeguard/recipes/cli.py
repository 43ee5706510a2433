"""``spikeguard fit``: LightningCLI over the recipes' modules, data and callbacks."""

from __future__ import annotations

import argparse
import sys

__all__ = ["SpikeguardCLI", "fit", "add_parser"]


def _cli_class():
    from pytorch_lightning.cli import LightningCLI

    class SpikeguardCLI(LightningCLI):
        """LightningCLI with the data's vocabulary size linked into a model built from a config."""

        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")

    return SpikeguardCLI


def __getattr__(name: str):
    if name == "SpikeguardCLI":  # lazy: importing Lightning's CLI costs a second
        return _cli_class()
    raise AttributeError(name)


def fit(argv: list[str]) -> int:
    """Run ``fit`` with LightningCLI: ``spikeguard fit --config recipes/tiny-gpt-burst.yaml``.

    Every option of the model (any :class:`spikeguard.recipes.LMModule`), the data
    (:class:`spikeguard.recipes.TextDataModule`), the trainer, its callbacks
    (``class_path``/``init_args``) and loggers is settable from YAML or flags;
    ``--print_config`` prints the resolved configuration.
    """
    from spikeguard.recipes.data import TextDataModule
    from spikeguard.recipes.modules import LMModule

    _cli_class()(
        LMModule,
        TextDataModule,
        subclass_mode_model=True,
        args=["fit", *argv],
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"fit": {"prog": "spikeguard fit"}},
    )
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    # Listed in `spikeguard --help`; `spikeguard fit ...` goes straight to LightningCLI
    # (see spikeguard.cli.main), which has its own --help.
    parser = subparsers.add_parser(
        "fit", help="train a recipe with LightningCLI (spikeguard fit --config recipes/<recipe>.yaml)",
        add_help=False,
    )
    parser.set_defaults(func=lambda args: fit(sys.argv[2:]))
    return parser
