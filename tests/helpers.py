"""Tiny Hugging Face models built from configs (no downloads), shared by the tests."""

from __future__ import annotations

import torch


def tiny_gpt2(n_layer: int = 2, n_embd: int = 32, lm_head: bool = True, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

    settings = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    settings.update(overrides)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=n_embd, n_layer=n_layer, n_head=2, **settings)
    torch.manual_seed(0)
    return (GPT2LMHeadModel if lm_head else GPT2Model)(config).eval()


def tiny_llama(kind: str = "llama", n_layer: int = 2, lm_head: bool = True):
    import transformers

    names = {
        "llama": ("LlamaConfig", "LlamaForCausalLM", "LlamaModel"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "Qwen2Model"),
        "mistral": ("MistralConfig", "MistralForCausalLM", "MistralModel"),
    }[kind]
    config = getattr(transformers, names[0])(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layer,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return getattr(transformers, names[1] if lm_head else names[2])(config).eval()


def tiny_bert(kind: str = "mlm", n_layer: int = 2):
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel

    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=n_layer, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    cls = {"mlm": BertForMaskedLM, "cls": BertForSequenceClassification, "base": BertModel}[kind]
    return cls(config).eval()



TINY_GPT2 = {
    "model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 32,
    "bos_token_id": 0, "eos_token_id": 0, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
}


def tiny_lm(**overrides):
    """A 2-layer byte-level GPT-2 LightningModule built from a config (no download)."""
    from spikeguard.recipes.modules import CausalLMModule

    config = dict(TINY_GPT2)
    config.update(overrides.pop("config", {}))
    return CausalLMModule(config=config, vocab_size=256, lr=overrides.pop("lr", 1e-3), **overrides)


def tiny_data(**overrides):
    """The embedded corpus, byte-level, short blocks, a small slice of it."""
    from spikeguard.recipes.data import TextDataModule

    settings = dict(seq_len=32, batch_size=16, max_tokens=120_000, seed=0)
    settings.update(overrides)
    return TextDataModule(**settings)


def trainer(package="pytorch_lightning", **kwargs):
    """A quiet CPU Trainer from either Lightning package."""
    import importlib
    import logging
    import warnings

    pl = importlib.import_module("pytorch_lightning" if package == "pytorch_lightning" else "lightning.pytorch")
    logging.getLogger(package.split(".")[0]).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec|litlogger).*")
    settings = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, log_every_n_steps=10,
    )
    settings.update(kwargs)
    return pl.Trainer(**settings)


def training_state(model, optimizer, grads=True):
    """Clones of the parameters, (optionally) their ``.grad`` and the optimizer's state."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grad = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()} if grads else None
    state = {
        k: {kk: vv.clone() if torch.is_tensor(vv) else vv for kk, vv in v.items()}
        for k, v in optimizer.state_dict()["state"].items()
    }
    return params, grad, state


def assert_same_training_state(a, b):
    """Two :func:`training_state` snapshots are bitwise equal."""
    for name in a[0]:
        assert torch.equal(a[0][name], b[0][name]), name
    if a[1] is not None:
        for name in a[1]:
            assert (a[1][name] is None and b[1][name] is None) or torch.equal(a[1][name], b[1][name]), name
    assert a[2].keys() == b[2].keys()
    for key in a[2]:
        for k, v in a[2][key].items():
            assert torch.equal(v, b[2][key][k]) if torch.is_tensor(v) else v == b[2][key][k], (key, k)
