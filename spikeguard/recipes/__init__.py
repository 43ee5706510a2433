"""Recipe building blocks: the data modules (and models) the YAML recipes combine."""

from spikeguard.recipes.data import (
    IGNORE_INDEX,
    TASKS,
    ByteTokenizer,
    TextDataModule,
    load_text,
    mask_tokens,
    tokenize,
)

__all__ = [
    "TextDataModule",
    "ByteTokenizer",
    "load_text",
    "tokenize",
    "mask_tokens",
    "TASKS",
    "IGNORE_INDEX",
]
