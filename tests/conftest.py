"""Test session setup: offline W&B and hub, one thread, shared fixtures."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

torch.set_num_threads(1)


@pytest.fixture
def ids():
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
