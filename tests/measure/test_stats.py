"""StepStatistics: exact per-operator statistics, accumulation, sharing, non-finite, no sync, hooks."""

import math

import pytest
import torch
from helpers import tiny_gpt2
from torch import nn
from torch.utils.checkpoint import checkpoint

from spikeguard.measure.stats import StepStatistics, StepStats
from spikeguard.operators import OperatorChain, hidden_tensor


def linear_chain(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 4, dtype=dtype), nn.Tanh(), nn.Linear(4, 6, dtype=dtype), nn.Linear(6, 3, dtype=dtype)
    )


def run_by_hand(model, x, loss_fn=lambda out: 0.5 * out.pow(2).sum()):
    """One forward/backward, layer by layer; returns each operator's output and its gradient."""
    zs, z = [], x
    for layer in model:
        z = layer(z)
        z.retain_grad()
        zs.append(z)
    loss_fn(z).backward()
    return [z.detach().clone() for z in zs], [z.grad.clone() for z in zs]


def norm64(*tensors):
    return torch.cat([t.detach().double().reshape(-1) for t in tensors]).norm()


def nonfinite(*tensors):
    return sum(int((~torch.isfinite(t)).sum()) for t in tensors)


def close(actual, expected, rtol=1e-12):
    as64 = lambda v: torch.as_tensor(v, dtype=torch.float64)  # noqa: E731  (a Python float stays exact)
    torch.testing.assert_close(as64(actual), as64(expected), rtol=rtol, atol=0)


def capture(chain):
    """Our own hooks: each operator's hidden outputs and their gradients, per forward."""
    outs = {n: [] for n in chain.names}
    grads = {n: [] for n in chain.names}

    def make(name):
        def hook(module, args, output):
            y = hidden_tensor(output)
            outs[name].append(y.detach().clone())
            if y.requires_grad:
                y.register_hook(lambda g: grads[name].append(g.clone()))

        return hook

    handles = [op.module.register_forward_hook(make(op.name)) for op in chain]
    return outs, grads, handles


def test_two_micro_batches_aggregate_as_documented():
    model = linear_chain()
    chain = OperatorChain.from_model(model)
    xs = [torch.randn(3, 5, dtype=torch.float64), torch.randn(5, 5, dtype=torch.float64)]
    with StepStatistics(chain, model) as stats:
        stats.reset()
        per_batch = [run_by_hand(model, x) for x in xs]  # .grad accumulates over both
        s = stats.collect().to_host()
    assert s["names"] == ["0", "1", "2", "3"]
    for i in range(4):
        (z1, g1), (z2, g2) = [(zs[i], gs[i]) for zs, gs in per_batch]
        # RMS over all 3·w + 5·w elements, not the mean of the two RMS.
        close(s["out_rms"][i], math.sqrt((norm64(z1) ** 2 + norm64(z2) ** 2) / (z1.numel() + z2.numel())))
        assert s["out_amax"][i] == max(z1.abs().max().item(), z2.abs().max().item())
        close(s["msg_norm"][i], math.sqrt(norm64(g1) ** 2 + norm64(g2) ** 2))
        params = list(model[i].parameters())
        close(s["param_grad_norm"][i], norm64(*[p.grad for p in params]) if params else 0.0)
    assert s["out_nonfinite"] == s["msg_nonfinite"] == [0, 0, 0, 0] and s["grad_nonfinite"] == 0
    close(s["grad_norm"], norm64(*[p.grad for p in model.parameters()]))

    # reset() starts a new window: one more micro-batch alone.
    stats.attach().reset()
    model.zero_grad(set_to_none=True)
    (zs, gs) = run_by_hand(model, xs[0])
    s = stats.collect().to_host()
    stats.detach()
    for i in range(4):
        close(s["out_rms"][i], norm64(zs[i]) / math.sqrt(zs[i].numel()))
        close(s["msg_norm"][i], norm64(gs[i]))


def test_stats_match_independently_captured_tensors_on_gpt2(ids):
    model = tiny_gpt2(n_layer=2)
    chain = OperatorChain.from_model(model)
    outs, grads, handles = capture(chain)
    with StepStatistics(chain, model) as stats:
        model(ids, labels=ids).loss.backward()
        s = stats.collect().to_host()
    [h.remove() for h in handles]
    for i, name in enumerate(chain.names):
        (z,), (g,) = outs[name], grads[name]
        close(s["out_rms"][i], norm64(z) / math.sqrt(z.numel()), rtol=1e-5)
        assert s["out_amax"][i] == z.abs().max().item()
        close(s["msg_norm"][i], norm64(g), rtol=1e-5)


def test_shared_parameter_counts_in_each_operator_and_once_globally(ids):
    model = tiny_gpt2(n_layer=2)
    assert model.lm_head.weight is model.transformer.wte.weight
    chain = OperatorChain.from_model(model)
    with StepStatistics(chain, model) as stats:
        model(ids, labels=ids).loss.backward()
        s = stats.collect().to_host()
    wte, wpe = model.transformer.wte.weight.grad, model.transformer.wpe.weight.grad
    close(s["param_grad_norm"][chain.index("transformer.embed")], norm64(wte, wpe), rtol=1e-5)
    close(s["param_grad_norm"][chain.index("lm_head")], norm64(wte), rtol=1e-5)
    unique = [p.grad for p in model.parameters()]  # parameters() yields a shared one once
    close(s["grad_norm"], norm64(*unique), rtol=1e-5)
    per_op_twice = math.sqrt(sum(v**2 for v in s["param_grad_norm"]))
    assert per_op_twice > s["grad_norm"] * (1 + 1e-3)  # summing the operators counts wte twice
    # Without the model the operators own every parameter of GPT-2: the same global norm.
    stats = StepStatistics(chain)
    close(stats.collect().to_host()["grad_norm"], s["grad_norm"], rtol=1e-6)


def test_parameters_outside_the_chain_count_only_when_the_model_is_given():
    model = linear_chain()
    chain = OperatorChain.from_patterns(model, ["0", "1"])  # "2" and "3" are not operators
    run_by_hand(model, torch.randn(3, 5, dtype=torch.float64))
    operators_only = StepStatistics(chain).collect().to_host()["grad_norm"]
    everything = StepStatistics(chain, model).collect().to_host()["grad_norm"]
    close(operators_only, norm64(*[p.grad for p in model[0].parameters()]))
    close(everything, norm64(*[p.grad for p in model.parameters()]))


class Skipping(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.unused, self.b = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.b(self.a(x))


def test_operator_that_did_not_run_reports_zero():
    torch.manual_seed(0)
    model = Skipping()
    chain = OperatorChain.from_patterns(model, ["a", "unused", "b"])
    stats = StepStatistics(chain, model).attach()
    empty = stats.collect()  # no forward yet
    assert isinstance(empty, StepStats) and empty.names == ("a", "unused", "b")
    for key in StepStats._PER_OPERATOR:
        assert torch.equal(getattr(empty, key), torch.zeros(3, dtype=getattr(empty, key).dtype)), key
    assert empty.grad_norm.item() == 0 and empty.grad_nonfinite.item() == 0
    model(torch.randn(4, 3)).sum().backward()
    s = stats.collect().to_host()
    stats.detach()
    for key in StepStats._PER_OPERATOR:
        assert s[key][1] == 0, key
    for key in ("out_rms", "out_amax", "msg_norm", "param_grad_norm"):
        assert s[key][0] > 0 and s[key][2] > 0, key


class PlantNonFinite(nn.Module):
    """Puts +inf, NaN and -inf into three elements of its input."""

    def forward(self, x):
        x = x.clone()
        x[0, 0], x[1, 1], x[2, 2] = math.inf, math.nan, -math.inf
        return x


def test_nonfinite_default_counts_passes_from_the_norm():
    """By default a pass counts 1 when its tensor holds an inf or NaN: no extra pass over it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), PlantNonFinite(), nn.Linear(4, 3), nn.Tanh())
    chain = OperatorChain.from_model(model)
    xs = [torch.randn(5, 4), torch.randn(3, 4)]
    with StepStatistics(chain, model) as stats:
        for x in xs:
            run_by_hand(model, x, loss_fn=lambda out: out.pow(2).sum())
        s = stats.collect().to_host()
    assert s["out_nonfinite"] == [0, 2, 2, 2]  # two micro-batches, each with non-finite outputs from op 1 up
    assert s["msg_nonfinite"][3] == 2 and s["msg_nonfinite"][0] == 2


def test_nonfinite_counts_are_exact_and_add_over_micro_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), PlantNonFinite(), nn.Linear(4, 3), nn.Tanh())
    chain = OperatorChain.from_model(model)
    xs = [torch.randn(5, 4), torch.randn(3, 4)]
    with StepStatistics(chain, model, exact_nonfinite=True) as stats:
        per_batch = [run_by_hand(model, x, loss_fn=lambda out: out.pow(2).sum()) for x in xs]
        st = stats.collect()
    s = st.to_host()
    for i in range(4):
        zs = [zs[i] for zs, _ in per_batch]
        gs = [gs[i] for _, gs in per_batch]
        assert s["out_nonfinite"][i] == nonfinite(*zs)
        assert s["msg_nonfinite"][i] == nonfinite(*gs)
    assert s["out_nonfinite"][1] == 6  # three planted per micro-batch
    assert s["msg_nonfinite"][0] > 0  # the gradient carried them back down
    grads = [p.grad for p in model.parameters()]
    assert s["grad_nonfinite"] == sum(int(nonfinite(g) > 0) for g in grads) > 0  # parameters, not elements
    assert st.out_nonfinite.dtype == st.grad_nonfinite.dtype == torch.int64
    assert math.isinf(s["out_amax"][1]) or math.isnan(s["out_amax"][1])


class TupleOut(nn.Module):
    def forward(self, x):
        return (2 * x, "not a tensor")


class DictOut(nn.Module):
    def forward(self, x):
        return {"hidden": x[0] + 1, "other": torch.zeros(1)}


def test_tuple_and_mapping_outputs_use_their_hidden_tensor():
    model = nn.Sequential(TupleOut(), DictOut())
    chain = OperatorChain.from_model(model)
    x = torch.arange(6.0).view(2, 3).requires_grad_()
    with StepStatistics(chain, model) as stats:
        out = model(x)
        out["hidden"].sum().backward()
        s = stats.collect().to_host()
    # z_1 = 2x, z_2 = 2x + 1, g_2 = 1, g_1 = 1: exact in float32
    assert s["out_amax"] == [10.0, 11.0]
    close(s["out_rms"], [norm64(2 * x) / math.sqrt(6), norm64(2 * x + 1) / math.sqrt(6)], rtol=1e-6)
    close(s["msg_norm"], [math.sqrt(6), math.sqrt(6)], rtol=1e-6)


def test_detach_removes_every_hook_and_hooks_only_observe(ids):
    model = tiny_gpt2(n_layer=2).train()  # dropout 0 in the config
    chain = OperatorChain.from_model(model)
    stats = StepStatistics(chain, model)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids)
        out.loss.backward()
        return out.logits.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_logits, ref_grads = step()
    stats.attach().attach()  # idempotent: one hook per operator
    assert stats.attached and all(len(op.module._forward_hooks) == 1 for op in chain)
    logits, grads = step()
    assert stats.collect().msg_norm.min() > 0
    stats.detach()
    stats.detach()
    assert not stats.attached
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    assert torch.equal(logits.view(torch.int32), ref_logits.view(torch.int32))
    for name in ref_grads:
        assert torch.equal(grads[name].view(torch.int32), ref_grads[name].view(torch.int32)), name

    # Off means off: a detached step records nothing, even a backward begun while attached.
    stats.reset()
    stats.attach()
    loss = model(ids, labels=ids).loss
    stats.detach()
    loss.backward()
    step()
    s = stats.collect().to_host()
    assert s["msg_norm"] == [0.0] * len(chain)
    assert all(v > 0 for v in s["out_rms"])  # the one forward while attached

    with pytest.raises(RuntimeError, match="boom"):
        with stats:
            raise RuntimeError("boom")
    assert not stats.attached and all(not op.module._forward_hooks for op in chain)


@pytest.mark.parametrize("mode", ["bf16 model", "bf16 autocast"])
def test_bf16_accumulates_in_float32(ids, mode):
    model = tiny_gpt2(n_layer=2)
    if mode == "bf16 model":
        model = model.to(torch.bfloat16)
    chain = OperatorChain.from_model(model)
    outs, grads, handles = capture(chain)
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=mode == "bf16 autocast")
    with StepStatistics(chain, model) as stats, autocast:
        model(ids, labels=ids).loss.backward()
        st = stats.collect()
    [h.remove() for h in handles]
    assert any(z.dtype == torch.bfloat16 for (z,) in outs.values())
    for key in ("out_rms", "out_amax", "msg_norm", "param_grad_norm", "grad_norm"):
        assert getattr(st, key).dtype == torch.float32, key
    s = st.to_host()
    for i, name in enumerate(chain.names):
        (z,), (g,) = outs[name], grads[name]
        close(s["out_rms"][i], norm64(z) / math.sqrt(z.numel()), rtol=1e-5)
        close(s["msg_norm"][i], norm64(g), rtol=1e-5)
        assert s["out_amax"][i] == z.abs().max().float().item()
    close(s["grad_norm"], norm64(*[p.grad for p in model.parameters()]), rtol=1e-5)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_recomputation_is_not_counted_twice(use_reentrant):
    model = linear_chain()
    chain = OperatorChain.from_model(model)
    clean = torch.randn(3, 5, dtype=torch.float64)
    # A forward counted twice leaves RMS and amax unchanged but doubles the counts: plant some.
    poisoned = clean.clone()
    poisoned[0, 0] = math.nan

    def step(x, ckpt):
        model.zero_grad(set_to_none=True)
        with StepStatistics(chain, model) as stats:
            z = model[0](x.requires_grad_())
            middle = lambda t: model[2](model[1](t))  # noqa: E731  (recomputed during backward)
            z = checkpoint(middle, z, use_reentrant=use_reentrant) if ckpt else middle(z)
            model[3](z).pow(2).sum().backward()
            return stats.collect().to_host()

    assert step(clean, ckpt=True) == step(clean, ckpt=False)
    plain, recomputed = step(poisoned, ckpt=False), step(poisoned, ckpt=True)
    assert recomputed["out_nonfinite"] == plain["out_nonfinite"] and min(plain["out_nonfinite"]) > 0
    assert recomputed["msg_nonfinite"] == plain["msg_nonfinite"] and min(plain["msg_nonfinite"][:3]) > 0


def test_no_host_sync_until_to_host_which_transfers_once(monkeypatch):
    model = linear_chain()
    chain = OperatorChain.from_model(model)
    stats = StepStatistics(chain, model).attach()
    calls = []
    real_tolist = torch.Tensor.tolist
    for method in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        record = lambda self, *a, m=method, **k: calls.append(m)  # noqa: E731
        monkeypatch.setattr(torch.Tensor, method, record, raising=False)
    for x in (torch.randn(3, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)):
        model(x).pow(2).sum().backward()
    st = stats.collect()
    stats.detach()
    assert calls == []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append("tolist") or real_tolist(self))
    s = st.to_host()
    assert calls == ["tolist"]
    monkeypatch.undo()
    assert s["out_rms"] == st.out_rms.tolist() and s["grad_norm"] == st.grad_norm.item()
    assert set(s) == {"names", *StepStats._PER_OPERATOR, *StepStats._GLOBAL}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_cuda_sync_in_hooks_or_collect():
    model = linear_chain(dtype=torch.float32).cuda()
    chain = OperatorChain.from_model(model)
    stats = StepStatistics(chain, model).attach()
    x = torch.randn(3, 5, device="cuda")
    model(x).sum().backward()  # warm-up: allocator, first-call paths
    stats.collect()
    stats.reset()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            model(x).pow(2).sum().backward()
        st = stats.collect()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        stats.detach()
    s = st.to_host()
    close(s["grad_norm"], norm64(*[p.grad for p in model.parameters()]), rtol=1e-5)


def test_errors_name_key_value_and_allowed():
    model = linear_chain()
    chain = OperatorChain.from_model(model)
    with pytest.raises(TypeError, match=r"StepStatistics\.chain must be an OperatorChain, got list"):
        StepStatistics([op for op in chain])
    with pytest.raises(TypeError, match=r"StepStatistics\.model must be a .*Module or None, got str"):
        StepStatistics(chain, "model")
    with pytest.raises(ValueError, match=r"operators \['0', '1', '2', '3'\] are not modules of the given"):
        StepStatistics(chain, nn.Linear(2, 2))

    ints = nn.Sequential(nn.Linear(3, 3), nn.Flatten())
    ints[1].forward = lambda x: x.argmax(-1)
    with StepStatistics(OperatorChain.from_model(ints)):
        with pytest.raises(TypeError, match=r"operator '1' returned Tensor with no floating-point tensor"):
            ints(torch.randn(2, 3))
