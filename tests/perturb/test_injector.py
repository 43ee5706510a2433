"""Injector: exactness of forward/backward perturbations, determinism, hooks, checkpointing."""

import pytest
import torch
from helpers import tiny_gpt2
from torch import nn
from torch.utils.checkpoint import checkpoint

from spikeguard.operators import OperatorChain
from spikeguard.perturb import Always, Burst, Decay, Gaussian, Injector, Rounding, Scale, Uniform, Window


def linear_chain(widths=(5, 4, 6, 3), seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(a, b, dtype=torch.float64) for a, b in zip(widths[:-1], widths[1:])]
    return nn.Sequential(*layers)


def capture(model, chain, names, first=False):
    """Forward hooks that record each operator's output.

    The Injector's hook runs before other hooks; ``first=True`` registers with
    ``prepend=True`` *after* the injector is attached, to see the unperturbed output.
    """
    seen = {}
    handles = [
        chain[n].module.register_forward_hook(
            lambda m, a, out, n=n: seen.__setitem__(n, out.detach().clone()), prepend=first
        )
        for n in names
    ]
    return seen, handles


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def run(model, x, target, injector=None):
    model.zero_grad(set_to_none=True)
    if injector is None:
        out = model(x)
    else:
        with injector:
            out = model(x)
            (0.5 * (out - target).pow(2).sum()).backward()
        return out, grads(model)
    (0.5 * (out - target).pow(2).sum()).backward()
    return out, grads(model)


def test_zero_magnitude_is_bitwise_identical():
    model = tiny_gpt2(n_layer=2).train()  # dropout off in the config, train-mode code paths on
    chain = OperatorChain.from_model(model)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))

    def loss_and_grads(injector=None):
        model.zero_grad(set_to_none=True)
        if injector:
            injector.attach()
        try:
            out = model(ids, labels=ids)
            out.loss.backward()
        finally:
            if injector:
                injector.detach()
        return out.logits.detach().clone(), grads(model)

    ref_logits, ref_grads = loss_and_grads()
    zero_noise = {"transformer.*": Gaussian(0.0), "lm_head": Uniform(0.0)}
    injectors = [
        Injector(chain, forward=zero_noise, backward=zero_noise),
        Injector(chain, forward={"transformer.h.*": (Gaussian(1.0), Window(5, 6))},
                 backward={"transformer.h.*": (Gaussian(1.0), Decay(scale=0.0))}),
    ]
    for injector in injectors:
        logits, g = loss_and_grads(injector)
        assert torch.equal(logits.view(torch.int32), ref_logits.view(torch.int32))
        for name in ref_grads:
            assert torch.equal(g[name].view(torch.int32), ref_grads[name].view(torch.int32)), name


def explicit_gradients(model, x, target, deltas=None, epsilons=None):
    """Gradients of ½|ẑ_N - y|² for a linear chain by THEORY §1, written out by hand."""
    deltas, epsilons = deltas or {}, epsilons or {}
    Ws = [layer.weight for layer in model]
    bs = [layer.bias for layer in model]
    z = [x]
    for i, (W, b) in enumerate(zip(Ws, bs)):
        z.append(z[-1] @ W.T + b + deltas.get(i, 0))  # ẑ_i = f_i(ẑ_{i-1}) + δ_i
    g = z[-1] - target  # ĝ_N = ∂h/∂z(ẑ_N)
    out = {}
    for i in reversed(range(len(Ws))):
        g = g + epsilons.get(i, 0)  # ε_i on the gradient w.r.t. operator i's output
        out[f"{i}.weight"] = g.T @ z[i]  # Ĝ_i = K_i(ẑ_{i-1})^T ĝ_i
        out[f"{i}.bias"] = g.sum(0)
        g = g @ Ws[i]  # ĝ_{i-1} = J_i^T ĝ_i
    return {k: v.detach() for k, v in out.items()}


def test_forward_perturbation_changes_gradient_exactly_as_theory():
    model = linear_chain()
    chain = OperatorChain.from_model(model)
    x = torch.randn(7, 5, dtype=torch.float64)
    target = torch.randn(7, 3, dtype=torch.float64)
    injector = Injector(chain, forward={"1": Gaussian(0.3)}, seed=3)
    injector.attach()
    before, h1 = capture(model, chain, ["1"], first=True)  # runs before the injector's hook
    after, h2 = capture(model, chain, ["1"])
    try:
        out, g = run(model, x, target)
    finally:
        injector.detach()
        [h.remove() for h in h1 + h2]
    delta = after["1"] - before["1"]
    assert delta.abs().min() > 0
    expected = explicit_gradients(model, x, target, deltas={1: delta})
    for name in expected:
        torch.testing.assert_close(g[name], expected[name], rtol=1e-12, atol=1e-12)
    clean = explicit_gradients(model, x, target)
    assert (g["0.weight"] - clean["0.weight"]).norm() > 1e-3  # the perturbation reached layer 0
    torch.testing.assert_close(injector.applied_norms()["1"], delta.norm())


def test_backward_perturbation_leaves_forward_bitwise_and_changes_gradient_exactly():
    model = linear_chain()
    chain = OperatorChain.from_model(model)
    x = torch.randn(7, 5, dtype=torch.float64)
    target = torch.randn(7, 3, dtype=torch.float64)
    clean_out, _ = capture(model, chain, chain.names)
    out_ref, _ = run(model, x, target)
    outs_ref = dict(clean_out)

    grad_before, grad_after = {}, {}

    def record_grad_into(store):
        def hook(module, args, out):
            out.register_hook(lambda g: store.__setitem__("1", g.clone()))

        return hook

    # Tensor hooks run in registration order: `pre`'s forward hook runs before the
    # injector's (prepended after it), so its tensor hook sees g_1; `post`'s sees g_1 + ε_1.
    injector = Injector(chain, backward={"1": Uniform(0.2)}, seed=9).attach()
    pre = chain["1"].module.register_forward_hook(record_grad_into(grad_before), prepend=True)
    post = chain["1"].module.register_forward_hook(record_grad_into(grad_after))
    clean_out.clear()
    try:
        out, g = run(model, x, target)
    finally:
        injector.detach()
        pre.remove()
        post.remove()
    assert torch.equal(out, out_ref)
    for name in chain.names:
        assert torch.equal(clean_out[name], outs_ref[name])
    eps = grad_after["1"] - grad_before["1"]
    assert eps.abs().min() > 0 and eps.abs().max() <= 0.2
    expected = explicit_gradients(model, x, target, epsilons={1: eps})
    for name in expected:
        torch.testing.assert_close(g[name], expected[name], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(injector.applied_norms("backward")["1"], eps.norm())
    assert injector.applied_norms("forward") == {}


def test_bf16_rounding_through_the_injector_is_torch_cast():
    model = tiny_gpt2(n_layer=2)
    chain = OperatorChain.from_model(model)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    injector = Injector(chain, forward={"transformer.h.0": Rounding("bf16")}).attach()
    before, h1 = capture(model, chain, ["transformer.h.0"], first=True)
    after, h2 = capture(model, chain, ["transformer.h.0"])
    try:
        model(ids)
    finally:
        injector.detach()
        [h.remove() for h in h1 + h2]
    y = before["transformer.h.0"]
    assert torch.equal(after["transformer.h.0"] - y, y.to(torch.bfloat16).float() - y)
    assert torch.equal(after["transformer.h.0"], y.to(torch.bfloat16).float())


def perturbed_logits(model, chain, ids, seed, step=0):
    injector = Injector(
        chain,
        forward={"transformer.h.0": Gaussian(0.1, relative=True)},
        backward={"transformer.h.1": Gaussian(0.01)},
        seed=seed,
    )
    injector.set_step(step)
    model.zero_grad(set_to_none=True)
    with injector:
        out = model(ids, labels=ids)
        out.loss.backward()
    return out.logits.detach(), model.transformer.wte.weight.grad.clone()


def test_same_seed_same_perturbation_different_seed_different(ids):
    model = tiny_gpt2(n_layer=2)
    chain = OperatorChain.from_model(model)
    torch.manual_seed(1)
    a, ga = perturbed_logits(model, chain, ids, seed=0)
    torch.manual_seed(2)  # the global RNG must not matter
    b, gb = perturbed_logits(model, chain, ids, seed=0)
    c, gc = perturbed_logits(model, chain, ids, seed=1)
    d, _ = perturbed_logits(model, chain, ids, seed=0, step=1)
    assert torch.equal(a, b) and torch.equal(ga, gb)
    assert not torch.equal(a, c) and not torch.equal(ga, gc)
    assert not torch.equal(a, d)


def test_global_rng_untouched_and_dropout_masks_unchanged(ids):
    model = tiny_gpt2(n_layer=2, resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2).train()
    chain = OperatorChain.from_model(model)
    injector = Injector(chain, forward={"transformer.h.*": Uniform(0.0)})
    torch.manual_seed(11)
    ref = model(ids).logits
    state_after_ref = torch.random.get_rng_state()
    injector = Injector(chain, backward={"transformer.h.*": Gaussian(0.5)}, forward={"lm_head": Scale(1.0)})
    torch.manual_seed(11)
    with injector:
        out = model(ids).logits
        out.sum().backward()
    assert torch.equal(out, ref)  # same dropout masks: the injector drew nothing from the global RNG
    assert torch.equal(torch.random.get_rng_state(), state_after_ref)


def test_schedules_follow_set_step(ids):
    model = tiny_gpt2(n_layer=2)
    chain = OperatorChain.from_model(model)
    injector = Injector(chain, forward={"transformer.h.1": (Scale(100.0), Burst([3]))})
    clean = model(ids).logits
    with injector:
        for step in range(5):
            injector.set_step(step)
            out = model(ids).logits
            applied = injector.applied_norms()
            if step == 3:
                assert not torch.equal(out, clean) and applied["transformer.h.1"] > 0
                assert injector.magnitude("transformer.h.1", "forward") == 1.0
            else:
                assert torch.equal(out, clean) and applied == {}
                assert injector.magnitude("transformer.h.1", "forward") == 0.0
    assert injector.magnitude("lm_head", "forward") == 0.0


def test_each_forward_in_a_step_draws_new_noise_and_set_step_replays(ids):
    model = tiny_gpt2(n_layer=2)
    chain = OperatorChain.from_model(model)
    injector = Injector(chain, forward={"transformer.h.0": Gaussian(0.1)})
    with injector:
        injector.set_step(4)
        first = model(ids).logits
        second = model(ids).logits  # a second micro-batch of the same optimizer step
        injector.set_step(4)
        replay = model(ids).logits
    assert not torch.equal(first, second)
    assert torch.equal(first, replay)


def test_only_switches_directions(ids):
    model = tiny_gpt2(n_layer=2)
    chain = OperatorChain.from_model(model)
    clean = model(ids).logits
    injector = Injector(chain, forward={"transformer.h.0": Gaussian(0.1)})
    with injector, injector.only(forward=False):
        assert torch.equal(model(ids).logits, clean)
    assert injector.enabled == {"forward": True, "backward": True}


def test_hooks_removed_on_exit_and_on_exception(ids):
    model = tiny_gpt2(n_layer=2)
    chain = OperatorChain.from_model(model)
    injector = Injector(chain, forward={"transformer.h.*": Gaussian(0.1)})
    block = model.transformer.h[0]
    with injector:
        assert len(block._forward_hooks) == 1 and injector.attached
    assert len(block._forward_hooks) == 0 and not injector.attached
    with pytest.raises(RuntimeError, match="boom"):
        with injector:
            raise RuntimeError("boom")
    assert len(block._forward_hooks) == 0
    injector.attach()
    injector.attach()  # idempotent
    assert len(block._forward_hooks) == 1
    injector.detach()
    injector.detach()


class Pair(nn.Module):
    """Returns (hidden, aux) like a Hugging Face block of transformers 4.x."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x), torch.ones(1)


class PairNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Pair()
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        h, aux = self.a(x)
        return self.b(h) * aux


def test_tuple_output_perturbs_the_hidden_state():
    torch.manual_seed(0)
    model = PairNet()
    chain = OperatorChain.from_patterns(model, ["a", "b"])
    x = torch.randn(3, 4)
    seen = {}
    injector = Injector(chain, forward={"a": Scale(2.0)}).attach()
    model.a.register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    try:
        model(x)
    finally:
        injector.detach()
    hidden, aux = seen["out"]
    torch.testing.assert_close(hidden, model.a.lin(x) * 2)
    assert torch.equal(aux, torch.ones(1))


def test_non_float_output_is_a_clear_error():
    class Ids(nn.Module):
        def forward(self, x):
            return x.long()

    model = nn.Sequential(Ids())
    injector = Injector(OperatorChain.from_model(model), forward={"0": Gaussian(1.0)})
    with pytest.raises(TypeError, match="operator '0' returned Tensor with no floating-point tensor to perturb"):
        with injector:
            model(torch.ones(2))


class Checkpointed(nn.Module):
    def __init__(self, use_reentrant):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(3)])
        self.use_reentrant = use_reentrant
        self.checkpointing = False

    def forward(self, x):
        for block in self.blocks:
            if self.checkpointing:
                x = checkpoint(block, x, use_reentrant=self.use_reentrant)
            else:
                x = block(x)
        return x


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_recompute_reuses_the_same_perturbation(use_reentrant):
    model = Checkpointed(use_reentrant)
    # Operators *inside* the checkpointed blocks: the Tanh after each saves tanh(y + δ)
    # for its backward, so a recompute that drew a new δ would corrupt the gradient.
    chain = OperatorChain.from_patterns(model, ["blocks.*.0"])
    x = torch.randn(4, 6, requires_grad=True)
    injector = Injector(
        chain, forward={"blocks.1.0": Gaussian(0.5)}, backward={"blocks.0.0": Gaussian(0.5)}, seed=5
    )

    def grads_with(checkpointing):
        model.checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        injector.set_step(0)
        with injector:
            model(x).pow(2).sum().backward()
        norms = (injector.applied_norms("forward"), injector.applied_norms("backward"))
        return grads(model), norms

    ref, ref_norms = grads_with(False)
    got, got_norms = grads_with(True)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-7)
    assert ref_norms == got_norms
    clean_model = Checkpointed(use_reentrant)
    clean_model(x).pow(2).sum().backward()
    assert (clean_model.blocks[0][0].weight.grad - ref["blocks.0.0.weight"]).norm() > 1e-2


def test_hf_gradient_checkpointing_reuses_the_same_perturbation(ids):
    def run_with(checkpointing):
        model = tiny_gpt2(n_layer=3).train()
        if checkpointing:  # transformers 5 renamed the method; 4.x has only the old name
            enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
            enable()
        # Operators inside the checkpointed blocks, whose outputs the blocks save.
        chain = OperatorChain.from_patterns(model, ["transformer.h.*.ln_1"])
        injector = Injector(chain, forward={"transformer.h.1.ln_1": Gaussian(0.3)}, backward={"transformer.h.0.ln_1": Gaussian(0.01)})
        with injector:
            model(ids, labels=ids).loss.backward()
        return grads(model)

    ref, got = run_with(False), run_with(True)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7)


def test_forward_perturbation_reaches_only_operators_above(ids):
    model = tiny_gpt2(n_layer=3)
    chain = OperatorChain.from_model(model)
    clean, h = capture(model, chain, chain.names)
    model(ids)
    ref = dict(clean)
    injector = Injector(chain, forward={"transformer.h.1": Gaussian(0.05, relative=True)}).attach()
    try:
        clean.clear()
        model(ids)
    finally:
        injector.detach()
        [x.remove() for x in h]
    changed = [n for n in chain.names if not torch.equal(clean[n], ref[n])]
    # Observers registered before the injector still see its perturbed output (it prepends).
    assert changed == ["transformer.h.1", "transformer.h.2", "transformer.ln_f", "lm_head"]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(chain="x"), TypeError, "Injector.chain must be an OperatorChain, got str"),
        (dict(), ValueError, "Injector needs at least one forward or backward perturbation, got none"),
        (dict(forward=[Gaussian(1.0)]), TypeError, "Injector.forward must be a dict {operator name or pattern: noise or (noise, schedule)}, got list"),
        (dict(forward={"0": 0.1}), TypeError, "Injector.forward['0'] must be a noise model or a (noise, schedule) pair, got 0.1"),
        (dict(backward={"0": (Always(), Gaussian(1.0))}), TypeError, "Injector.backward['0'] must be a noise model or a (noise, schedule) pair"),
        (dict(forward={"9": Gaussian(1.0)}), ValueError, "'9' matches no operator of the chain"),
        (dict(forward={"*": Gaussian(1.0), "1": Gaussian(2.0)}), ValueError, "Injector.forward: operator '1' is matched by more than one key (the second is '1')"),
        (dict(forward={"0": Gaussian(1.0)}, seed="a"), TypeError, "Injector.seed must be an int, got 'a'"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    chain = OperatorChain.from_model(linear_chain())
    kwargs.setdefault("chain", chain)
    with pytest.raises(error) as err:
        Injector(**kwargs)
    assert message in str(err.value)


def test_bad_runtime_calls():
    injector = Injector(OperatorChain.from_model(linear_chain()), forward={"0": Gaussian(1.0)})
    with pytest.raises(ValueError, match="Injector.set_step: step must be an int >= 0, got -1"):
        injector.set_step(-1)
    with pytest.raises(ValueError, match=r"direction must be one of \['backward', 'forward'\], got 'up'"):
        injector.applied_norms("up")


def test_perturbations_list_combines_with_dicts_and_refuses_doubles():
    from spikeguard.perturb import Perturbation

    chain = OperatorChain.from_model(linear_chain())
    injector = Injector(
        chain, forward={"0": Gaussian(1.0)},
        perturbations=[Perturbation("1", Uniform(0.1)), Perturbation("*", Gaussian(0.1), direction="backward")],
    )
    assert set(injector.specs["forward"]) == {"0", "1"}
    assert set(injector.specs["backward"]) == {"0", "1", "2"}  # "*" alone: every operator
    with pytest.raises(ValueError, match=r"Injector.perturbations\[0\]: operator '0' already has a forward perturbation"):
        Injector(chain, forward={"0": Gaussian(1.0)}, perturbations=[Perturbation("0", Gaussian(2.0))])
    with pytest.raises(TypeError, match=r"Injector.perturbations\[0\] must be a Perturbation, got 3"):
        Injector(chain, forward={"0": Gaussian(1.0)}, perturbations=[3])
    with pytest.raises(ValueError, match=r"Perturbation.direction must be one of \['backward', 'forward'\], got 'up'"):
        Perturbation("0", Gaussian(1.0), direction="up")


# -- the pass context and what was applied --------------------------------------------------


def test_passes_decide_what_applies():
    """TRAIN: everything; RERUN: persistent perturbations only; MEASURE: only the owner's."""
    from spikeguard import passes
    from spikeguard.perturb import Perturbation

    model = linear_chain()
    chain = OperatorChain.from_model(model)
    x = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    injector = Injector(chain, perturbations=[
        Perturbation("0", Scale(2.0), transient=True),
        Perturbation("1", Scale(3.0)),  # the Injector's default: persistent
    ])
    other = Injector(chain, forward={"2": Scale(5.0)}, transient=True)
    assert injector.transient == {"forward": {"0"}, "backward": set()}
    assert other.transient == {"forward": {"2"}, "backward": set()}

    def applied(context):
        with injector, other, context, injector.recording() as mine, other.recording() as theirs:
            model(x)
        return sorted(mine.norms()) + sorted(theirs.norms())

    import contextlib

    assert applied(contextlib.nullcontext()) == ["0", "1", "2"]
    assert applied(passes.rerun()) == ["1"]  # transient faults do not recur on a re-run
    assert applied(passes.measure(owner=injector)) == ["0", "1"]  # the measurement's own only
    assert applied(passes.measure()) == []  # a measurement of the clean model


def test_recording_hands_back_norms_and_deltas_of_its_block_only(ids):
    model = tiny_gpt2(n_layer=2)
    chain = OperatorChain.from_model(model)
    injector = Injector(chain, forward={"transformer.h.1": Gaussian(0.1, relative=True)},
                        backward={"transformer.h.0": Gaussian(0.1, relative=True)})
    with injector:
        with injector.recording(deltas=True) as rec:
            model(ids, labels=ids).loss.backward()
        with injector.recording() as later:
            pass
    delta = rec.delta("transformer.h.1")
    assert delta is not None and rec.delta("transformer.h.0", "backward") is not None
    torch.testing.assert_close(rec.norms("forward")["transformer.h.1"], delta.norm())
    torch.testing.assert_close(rec.norms("backward")["transformer.h.0"], injector.applied_norms("backward")["transformer.h.0"])
    assert later.norms() == {} and later.delta("transformer.h.1") is None  # nothing ran in that block
    with pytest.raises(ValueError, match=r"direction must be one of \['backward', 'forward'\], got 'up'"):
        rec.norms("up")
    with pytest.raises(TypeError, match="Perturbation.transient must be None, True or False, got 'yes'"):
        from spikeguard.perturb import Perturbation

        Perturbation("x", Scale(2.0), transient="yes")
    with pytest.raises(TypeError, match="Injector.transient must be True or False, got 1"):
        Injector(chain, forward={"*": Scale(2.0)}, transient=1)
