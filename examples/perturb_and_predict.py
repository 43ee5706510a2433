"""Perturb one block of a small GPT-2 and compare what happened with Proposition 1.

Runs in seconds on a CPU: builds a 4-layer GPT-2 from a config (no download), names its
operators, injects a relative Gaussian burst at block 1 on the forward pass, and prints
the observed output error per operator next to the amplification the theory predicts.
"""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from spikeguard import OperatorChain, theory
from spikeguard.perturb import Burst, Gaussian, Injector

torch.manual_seed(0)
config = GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=256, n_positions=64, bos_token_id=0, eos_token_id=0)
model = GPT2LMHeadModel(config).eval()
ids = torch.randint(0, 256, (2, 32))

chain = OperatorChain.from_model(model).verify(model, ids)
print(chain)

injector = Injector(chain, forward={"transformer.h.1": (Gaussian(0.01, relative=True), Burst([3]))}, seed=0)
injector.attach()  # first, so that the recording hooks below see the perturbed outputs

# Record every operator's output at a clean step and at the burst's step.
outputs = {}
hooks = [op.module.register_forward_hook(lambda m, a, out, n=op.name: outputs.__setitem__(n, out)) for op in chain]
with torch.no_grad():
    injector.set_step(0)  # the burst is off
    model(ids)
    clean = dict(outputs)
    injector.set_step(3)  # the burst is on
    model(ids)
injector.detach()
for h in hooks:
    h.remove()

delta = float(injector.applied_norms()["transformer.h.1"])
print(f"|δ| applied at transformer.h.1: {delta:.4g}")
print(f"{'operator':<20} {'e_i (observed)':>15} {'e_i / |δ|':>10}")
for name in chain.names:
    e = float((outputs[name] - clean[name]).norm())
    print(f"{name:<20} {e:>15.4g} {e / delta:>10.3g}")

# Proposition 1 with uniform unit gains: how much more a unit perturbation at each
# operator moves the parameter gradient forward (A^f) than backward (A^b).
amp = theory.amplification(gains=[1.0] * len(chain), param_gains=[1.0] * len(chain), loss_curvature=0.5)
print("A^f / A^b per operator:", [round(r, 2) for r in amp.ratio.tolist()])
