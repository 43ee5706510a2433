"""Recipe building blocks: the LightningModules and data module the YAML recipes combine."""

from spikeguard.recipes.modules import CausalLMModule, LMModule, MaskedLMModule
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
    "LMModule",
    "CausalLMModule",
    "MaskedLMModule",
    "TextDataModule",
    "ByteTokenizer",
    "load_text",
    "tokenize",
    "mask_tokens",
    "TASKS",
    "IGNORE_INDEX",
]
