"""OperatorChain: discovery per architecture, patterns, order verification, errors."""

import pytest
import torch
from helpers import tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

from spikeguard.operators import OperatorChain, hidden_tensor, replace_hidden_tensor


def test_gpt2_lm_head_chain(ids):
    model = tiny_gpt2(n_layer=3)
    chain = OperatorChain.from_model(model).verify(model, ids)
    assert chain.names == [
        "transformer.embed", "transformer.h.0", "transformer.h.1", "transformer.h.2",
        "transformer.ln_f", "lm_head",
    ]
    assert len(chain) == 6  # N = n_layer + 3
    embed = chain["transformer.embed"]
    assert embed.module is model.transformer.drop
    params = embed.parameters()
    assert params[0] is model.transformer.wte.weight and params[1] is model.transformer.wpe.weight


def test_gpt2_base_model_chain(ids):
    model = tiny_gpt2(n_layer=2, lm_head=False)
    chain = OperatorChain.from_model(model).verify(model, ids)
    assert chain.names == ["embed", "h.0", "h.1", "ln_f"]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_llama_family_chain(kind, ids):
    model = tiny_llama(kind, n_layer=2)
    chain = OperatorChain.from_model(model).verify(model, ids)
    assert chain.names == ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]


def test_llama_base_model_chain(ids):
    model = tiny_llama("llama", n_layer=3, lm_head=False)
    chain = OperatorChain.from_model(model).verify(model, ids)
    assert chain.names == ["embed_tokens", "layers.0", "layers.1", "layers.2", "norm"]


@pytest.mark.parametrize(
    "kind, tail",
    [
        ("mlm", ["cls"]),
        ("cls", ["bert.pooler", "classifier"]),
        ("base", ["pooler"]),
    ],
)
def test_bert_family_chain(kind, tail, ids):
    model = tiny_bert(kind, n_layer=2)
    chain = OperatorChain.from_model(model).verify(model, ids)
    prefix = "" if kind == "base" else "bert."
    assert chain.names == [f"{prefix}embeddings", f"{prefix}encoder.layer.0", f"{prefix}encoder.layer.1"] + tail


def test_sequential_chain():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    chain = OperatorChain.from_model(model).verify(model, torch.randn(5, 3))
    assert chain.names == ["0", "1", "2"]
    assert [op.module for op in chain] == list(model)
    assert chain[1].module is model[1] and chain["2"].module is model[2]
    assert "1" in chain and "3" not in chain
    assert chain.index("2") == 2


def test_unsupported_model_says_use_from_patterns():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])

    with pytest.raises(ValueError) as err:
        OperatorChain.from_model(Net())
    msg = str(err.value)
    assert "cannot discover the operators of a Net" in msg
    assert "OperatorChain.from_patterns" in msg
    assert "['blocks.*']" in msg


def test_patterns_are_dotted_globs():
    model = tiny_gpt2(n_layer=12)
    blocks = OperatorChain.from_patterns(model, ["transformer.h.*"])
    assert blocks.names == [f"transformer.h.{i}" for i in range(12)]  # not h.0.attn etc.
    deep = OperatorChain.from_patterns(model, ["transformer.h.1?"])
    assert deep.names == ["transformer.h.10", "transformer.h.11"]
    cls = OperatorChain.from_patterns(model, ["transformer.h.[2-4]"])
    assert cls.names == ["transformer.h.2", "transformer.h.3", "transformer.h.4"]
    nested = OperatorChain.from_patterns(model, ["transformer.h.0.**"])
    assert "transformer.h.0.attn" in nested.names and "transformer.h.0.mlp.c_fc" in nested.names


def test_patterns_keep_pattern_order_and_regex(ids):
    model = tiny_gpt2(n_layer=2)
    chain = OperatorChain.from_patterns(model, ["transformer.drop", r"transformer\.h\.\d+", "lm_head"], regex=True)
    assert chain.names == ["transformer.drop", "transformer.h.0", "transformer.h.1", "lm_head"]
    chain.verify(model, ids)


def test_pattern_matching_nothing_lists_close_names():
    model = tiny_gpt2(n_layer=2)
    with pytest.raises(ValueError) as err:
        OperatorChain.from_patterns(model, ["transformer.blocks.*"])
    msg = str(err.value)
    assert "pattern 'transformer.blocks.*' matches no module of GPT2LMHeadModel" in msg
    assert "close module names:" in msg and "transformer.h" in msg


def test_bad_patterns():
    model = tiny_gpt2(n_layer=2)
    with pytest.raises(TypeError, match="patterns must be a list of strings, got the string 'lm_head'"):
        OperatorChain.from_patterns(model, "lm_head")
    with pytest.raises(ValueError, match=r"pattern '\(' is not a valid regex"):
        OperatorChain.from_patterns(model, ["("], regex=True)
    with pytest.raises(ValueError, match=r"pattern 'h\.\[0' has an unclosed '\['"):
        OperatorChain.from_patterns(model, ["h.[0"])
    with pytest.raises(ValueError, match="module 'lm_head' is matched by more than one pattern"):
        OperatorChain.from_patterns(model, ["lm_head", "lm_*"])


def test_verify_catches_wrong_order(ids):
    model = tiny_gpt2(n_layer=2)
    chain = OperatorChain.from_patterns(model, ["transformer.h.1", "transformer.h.0"])
    with pytest.raises(ValueError) as err:
        chain.verify(model, ids)
    assert str(err.value) == (
        "operators fired out of the declared order: at position 0 the chain declares "
        "'transformer.h.1' but 'transformer.h.0' ran; fired order: ['transformer.h.0', 'transformer.h.1']"
    )


def test_verify_catches_module_that_never_runs(ids):
    model = tiny_gpt2(n_layer=2)
    model.unused = nn.Linear(2, 2)
    chain = OperatorChain.from_patterns(model, ["transformer.h.0", "unused"])
    with pytest.raises(ValueError, match=r"operators never ran during the forward pass: \['unused'\]"):
        chain.verify(model, ids)


def test_verify_catches_shared_module_firing_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(2, 2)
            self.shared = nn.Linear(2, 2)

        def forward(self, x):
            return self.shared(self.shared(self.inp(x)))

    model = Twice()
    chain = OperatorChain.from_patterns(model, ["inp", "shared"])
    with pytest.raises(ValueError, match=r"ran more than once per forward pass .*\{'shared': 2\}"):
        chain.verify(model, torch.randn(1, 2))


def test_index_by_unknown_name_lists_close_names():
    chain = OperatorChain.from_model(tiny_gpt2(n_layer=2))
    with pytest.raises(KeyError, match=r"no operator named 'transformer.h.9'; close names: \['transformer.h.1', 'transformer.h.0'"):
        chain["transformer.h.9"]
    with pytest.raises(ValueError, match="'blocks.*' matches no operator of the chain"):
        chain.select("blocks.*")
    assert chain.select(["lm_head", "transformer.h.*"]) == ["lm_head", "transformer.h.0", "transformer.h.1"]


def test_chain_construction_errors():
    with pytest.raises(ValueError, match="needs at least one operator, got none"):
        OperatorChain([])
    lin = nn.Linear(2, 2)
    from spikeguard.operators import Operator

    with pytest.raises(ValueError, match=r"operator names must be unique, repeated: \['a'\]"):
        OperatorChain([Operator("a", lin), Operator("a", nn.Linear(2, 2))])
    with pytest.raises(ValueError, match=r"operators \['a', 'b'\] share one module"):
        OperatorChain([Operator("a", lin), Operator("b", lin)])


def test_hidden_tensor_rule():
    from transformers.modeling_outputs import BaseModelOutput

    t, u = torch.ones(2), torch.zeros(2)
    assert hidden_tensor(t) is t
    assert hidden_tensor((None, t, u)) is t
    out = BaseModelOutput(last_hidden_state=t)
    assert hidden_tensor(out) is t
    assert hidden_tensor("text") is None
    assert replace_hidden_tensor((None, t, u), u)[1] is u
    assert replace_hidden_tensor([t, u], u) == [u, u]
    replaced = replace_hidden_tensor(out, u)
    assert replaced.last_hidden_state is u and replaced[0] is u
    with pytest.raises(TypeError, match="no tensor to replace in an output of type str"):
        replace_hidden_tensor("text", u)
