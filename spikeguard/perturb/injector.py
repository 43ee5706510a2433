"""The Injector: forward (operator output) and backward (gradient message) perturbations.

THEORY §1: ``ẑ_i = f_i(ẑ_{i-1}) + δ_i`` on the forward pass and ``ĝ_i = J^T ĝ_{i+1} + ε_i``
on the backward pass, where ε_i perturbs the gradient with respect to operator i's
output. The Injector realises both with hooks on the operators of an
:class:`~spikeguard.operators.OperatorChain`:

- forward: a forward hook replaces the output's hidden-state tensor y by ``q = y + δ``
  through an autograd function whose backward is the identity, so the operator's
  Jacobian is kept (assignment-style fault injection would cut the gradient);
- backward: the same forward hook registers a tensor hook on the (possibly perturbed)
  output, which returns ``g + ε`` for its gradient g. Tensor hooks see exactly the
  operator's ``grad_output``; module full-backward hooks do not survive in-place ops
  downstream and misfire when the inputs need no grad.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from spikeguard import passes
from spikeguard._tensor import in_backward, norm
from spikeguard.operators import OperatorChain, hidden_tensor, replace_hidden_tensor
from spikeguard.perturb.noise import NoiseModel
from spikeguard.perturb.schedules import Always, Schedule

__all__ = ["Injector", "Perturbation", "Applied", "Spec", "FORWARD", "BACKWARD"]

FORWARD = "forward"
BACKWARD = "backward"
_DIRECTION_CODE = {FORWARD: 1, BACKWARD: 2}

SpecLike = Union[NoiseModel, tuple[NoiseModel, Schedule]]
Spec = tuple[NoiseModel, Schedule]

_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (SplitMix64 finaliser over each value)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) & _MASK64
        h = (h * 0xBF58476D1CE4E5B9) & _MASK64
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 29
    return h >> 1



class _PerturbedOutput(torch.autograd.Function):
    """Value ``q = perturb(y)``, gradient the identity to ``y``: ∂q/∂y = I.

    ``q`` is computed inside ``forward`` so that it is a fresh tensor, not an input
    returned as-is: autograd forbids in-place ops downstream on such aliases.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, perturb) -> torch.Tensor:  # type: ignore[override]
        q = perturb(y)
        return q.clone() if q.data_ptr() == y.data_ptr() else q

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


@dataclass(frozen=True)
class Perturbation:
    """One perturbation, spelled out (the form YAML recipes use).

    Attributes:
        operators: an operator name or glob, or a list of them.
        noise: the noise model.
        schedule: when it is on (default: always).
        direction: ``"forward"`` (δ on the output) or ``"backward"`` (ε on its gradient).
        transient: the perturbation models a transient fault (hardware, a one-off
            numerical accident): it does not recur when a spiking step is re-run
            (:mod:`spikeguard.passes`). False: it is part of the computation (a
            low-precision format, a data property) and recurs. None: the Injector's
            default.
    """

    operators: str | list[str]
    noise: NoiseModel
    schedule: Schedule = field(default_factory=Always)
    direction: str = FORWARD
    transient: bool | None = None

    def __post_init__(self) -> None:
        if self.direction not in _DIRECTION_CODE:
            raise ValueError(f"Perturbation.direction must be one of {sorted(_DIRECTION_CODE)}, got {self.direction!r}")
        if not isinstance(self.noise, NoiseModel):
            raise TypeError(f"Perturbation.noise must be a noise model, got {self.noise!r}")
        if not isinstance(self.schedule, Schedule):
            raise TypeError(f"Perturbation.schedule must be a schedule, got {self.schedule!r}")
        if self.transient is not None and not isinstance(self.transient, bool):
            raise TypeError(f"Perturbation.transient must be None, True or False, got {self.transient!r}")
        ops = [self.operators] if isinstance(self.operators, str) else list(self.operators)
        if not ops or not all(isinstance(o, str) and o for o in ops):
            raise ValueError(f"Perturbation.operators must be a name or a non-empty list of names, got {self.operators!r}")


def _normalise_specs(
    chain: OperatorChain, specs: Mapping[str, SpecLike] | None, direction: str
) -> dict[str, Spec]:
    out: dict[str, Spec] = {}
    if specs is None:
        return out
    if not isinstance(specs, Mapping):
        raise TypeError(
            f"Injector.{direction} must be a dict {{operator name or pattern: noise or "
            f"(noise, schedule)}}, got {type(specs).__name__}"
        )
    for key, value in specs.items():
        if isinstance(value, NoiseModel):
            spec: Spec = (value, Always())
        elif (
            isinstance(value, tuple)
            and len(value) == 2
            and isinstance(value[0], NoiseModel)
            and isinstance(value[1], Schedule)
        ):
            spec = value
        else:
            raise TypeError(
                f"Injector.{direction}[{key!r}] must be a noise model or a (noise, schedule) "
                f"pair, got {value!r}"
            )
        for name in chain.select(key):
            if name in out:
                raise ValueError(
                    f"Injector.{direction}: operator {name!r} is matched by more than one key "
                    f"(the second is {key!r})"
                )
            out[name] = spec
    return out


class Applied:
    """What an Injector applied inside one :meth:`Injector.recording` block.

    ``norms(direction)`` gives ``{operator: |δ_i|}`` (or ``|ε_i|``) of the latest
    application per operator, as 0-dim device tensors; with ``deltas=True`` the δ and ε
    tensors themselves are kept too (one activation each): ``delta(operator, direction)``.
    """

    def __init__(self, keep_deltas: bool):
        self.keep_deltas = keep_deltas
        self._norms: dict[tuple[str, str], torch.Tensor] = {}
        self._deltas: dict[tuple[str, str], torch.Tensor] = {}

    def _record(self, name: str, direction: str, delta: torch.Tensor, size: torch.Tensor) -> None:
        self._norms[(name, direction)] = size
        if self.keep_deltas:
            self._deltas[(name, direction)] = delta

    def norms(self, direction: str = FORWARD) -> dict[str, torch.Tensor]:
        if direction not in _DIRECTION_CODE:
            raise ValueError(f"direction must be one of {sorted(_DIRECTION_CODE)}, got {direction!r}")
        return {name: v for (name, d), v in self._norms.items() if d == direction}

    def delta(self, name: str, direction: str = FORWARD) -> torch.Tensor | None:
        """The latest δ (or ε) applied at ``name``; None when none was (or deltas were not kept)."""
        return self._deltas.get((name, direction))


class Injector:
    """Perturb operator outputs (forward) and gradient messages (backward) on a schedule.

    Args:
        chain: the operators that may be perturbed.
        forward: ``{operator name or glob: noise or (noise, schedule)}`` for δ_i.
        backward: the same for ε_i, the gradient with respect to the operator's output.
        perturbations: the same as a list of :class:`Perturbation` (the YAML form);
            combined with ``forward`` and ``backward``.
        seed: the perturbations are a function of (seed, step, operator, direction,
            forward-call index within the step) only: bitwise reproducible, independent
            of and never touching the global RNG.
        transient: the default of :attr:`Perturbation.transient` for every perturbation
            that does not set it (those of ``forward`` and ``backward`` included).

    Which passes it perturbs is the pass context's rule (:mod:`spikeguard.passes`): every
    training pass; in a re-run only its persistent perturbations; in a measurement only
    when it is the measurement's owner.

    Usage without Lightning::

        injector = Injector(chain, forward={"transformer.h.1": Gaussian(0.1, relative=True)})
        injector.set_step(step)
        with injector:
            loss = model(**batch).loss
            loss.backward()

    Hidden-state rule: the perturbed tensor is the first tensor of the operator's
    output (itself, the first tensor of a tuple, the first tensor field of a
    ``ModelOutput``); see :func:`spikeguard.operators.hidden_tensor`.

    Activation checkpointing: a forward hook that fires again while autograd recomputes
    a checkpointed region (``torch.utils.checkpoint``, reentrant or not) reuses the call
    index of the operator's latest forward, so the recomputed δ equals the original one
    bitwise. This assumes each forward is followed by its backward before the next
    forward of the same operator, which is how gradient accumulation runs.
    """

    def __init__(
        self,
        chain: OperatorChain,
        forward: Mapping[str, SpecLike] | None = None,
        backward: Mapping[str, SpecLike] | None = None,
        seed: int = 0,
        perturbations: Sequence[Perturbation] | None = None,
        transient: bool = False,
    ):
        if not isinstance(chain, OperatorChain):
            raise TypeError(f"Injector.chain must be an OperatorChain, got {type(chain).__name__}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"Injector.seed must be an int, got {seed!r}")
        if not isinstance(transient, bool):
            raise TypeError(f"Injector.transient must be True or False, got {transient!r}")
        self.chain = chain
        self.seed = seed
        self.specs: dict[str, dict[str, Spec]] = {
            FORWARD: _normalise_specs(chain, forward, FORWARD),
            BACKWARD: _normalise_specs(chain, backward, BACKWARD),
        }
        #: Per direction, the operators whose perturbation is transient.
        self.transient: dict[str, set[str]] = {d: (set(self.specs[d]) if transient else set()) for d in _DIRECTION_CODE}
        for i, p in enumerate(perturbations or ()):
            if not isinstance(p, Perturbation):
                raise TypeError(f"Injector.perturbations[{i}] must be a Perturbation, got {p!r}")
            for name in chain.select(p.operators):
                if name in self.specs[p.direction]:
                    raise ValueError(
                        f"Injector.perturbations[{i}]: operator {name!r} already has a {p.direction} perturbation"
                    )
                self.specs[p.direction][name] = (p.noise, p.schedule)
                if (transient if p.transient is None else p.transient):
                    self.transient[p.direction].add(name)
        if not self.specs[FORWARD] and not self.specs[BACKWARD]:
            raise ValueError("Injector needs at least one forward or backward perturbation, got none")
        self.step = 0
        self.enabled = {FORWARD: True, BACKWARD: True}
        self._calls: dict[str, int] = {}
        self._last_call: dict[str, int] = {}
        self._applied: dict[tuple[str, str], torch.Tensor] = {}
        self._recorders: list[Applied] = []
        self._handles: list[Any] = []
        self._generators: dict[torch.device, torch.Generator] = {}

    # -- lifecycle -------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> Injector:
        """Register the hooks (idempotent)."""
        if self._handles:
            return self
        targets = set(self.specs[FORWARD]) | set(self.specs[BACKWARD])
        for index, op in enumerate(self.chain):
            if op.name in targets:
                # prepend: the Injector's hook runs before every other forward hook (and so
                # registers its gradient hook first), whenever those were attached. Observers
                # (statistics, probes) always see ẑ_i = f_i(ẑ_{i-1}) + δ_i and ĝ_i with ε_i.
                self._handles.append(
                    op.module.register_forward_hook(self._make_hook(op.name, index), prepend=True)
                )
        return self

    def detach(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> Injector:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def set_step(self, step: int) -> None:
        """Move the schedules to optimizer step ``step`` and start a new step's records."""
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"Injector.set_step: step must be an int >= 0, got {step!r}")
        self.step = step
        self._calls.clear()
        self._last_call.clear()
        self._applied.clear()

    @contextmanager
    def only(self, *, forward: bool = True, backward: bool = True) -> Iterator[Injector]:
        """Temporarily switch a direction off, e.g. ``with injector.only(backward=False):``.

        The forward switch acts when an operator runs; the backward one when its
        gradient arrives.
        """
        saved = dict(self.enabled)
        self.enabled = {FORWARD: forward, BACKWARD: backward}
        try:
            yield self
        finally:
            self.enabled = saved

    # -- what was applied ------------------------------------------------------------

    @contextmanager
    def recording(self, deltas: bool = False) -> Iterator[Applied]:
        """Hand back what is applied inside the block: ``with injector.recording() as applied:``.

        ``deltas=True`` also keeps the δ and ε tensors (memory: one activation per
        perturbed operator), e.g. for a first-order prediction along them.
        """
        rec = Applied(keep_deltas=deltas)
        self._recorders.append(rec)
        try:
            yield rec
        finally:
            self._recorders.remove(rec)

    def magnitude(self, name: str, direction: str) -> float:
        """The schedule magnitude m_t of an operator and direction at the current step."""
        spec = self.specs[direction].get(name)
        return 0.0 if spec is None else spec[1].magnitude(self.step)

    def applied_norms(self, direction: str = FORWARD) -> dict[str, torch.Tensor]:
        """``{operator: |δ_i|}`` (or ``|ε_i|``) of the latest application this step.

        0-dim tensors (at least float32) on the model's device (reading them syncs; do it once
        per logging step). Operators not perturbed this step are absent.
        """
        if direction not in _DIRECTION_CODE:
            raise ValueError(f"direction must be one of {sorted(_DIRECTION_CODE)}, got {direction!r}")
        return {name: v for (name, d), v in self._applied.items() if d == direction}

    # -- the hooks -------------------------------------------------------------------

    def _generator(self, device: torch.device, *key: int) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        gen.manual_seed(_mix(self.seed, self.step, *key))
        return gen

    def _perturb(
        self, x: torch.Tensor, name: str, index: int, direction: str, call: int, record: bool
    ) -> torch.Tensor:
        noise, schedule = self.specs[direction][name]
        m = schedule.magnitude(self.step)
        gen = self._generator(x.device, index, _DIRECTION_CODE[direction], call)
        with torch.no_grad():
            q, delta = noise(x.detach(), gen, m)
            if record:
                size = norm(delta)
                self._applied[(name, direction)] = size
                for rec in self._recorders:
                    rec._record(name, direction, delta, size)
        return q

    def _scheduled(self, spec: Spec | None) -> bool:
        return spec is not None and not spec[0].is_identity and spec[1].active(self.step)

    def _make_hook(self, name: str, index: int):
        forward_spec = self.specs[FORWARD].get(name)
        backward_spec = self.specs[BACKWARD].get(name)

        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            y = hidden_tensor(output)
            if y is None or not y.is_floating_point():
                raise TypeError(
                    f"Injector: operator {name!r} returned {type(output).__name__} with no "
                    "floating-point tensor to perturb"
                )
            recompute = in_backward()
            if recompute:
                call = self._last_call.get(name, 0)
            else:
                call = self._calls.get(name, 0)
                self._calls[name] = call + 1
                self._last_call[name] = call
            # The pass this forward belongs to decides, now, for the forward and for the
            # gradient hook registered below (which may run on another thread).
            now = passes.current()
            forward_on = passes.applies(self, name in self.transient[FORWARD], now)
            backward_on = passes.applies(self, name in self.transient[BACKWARD], now)
            new = y
            if forward_on and self.enabled[FORWARD] and self._scheduled(forward_spec):
                perturb = lambda x: self._perturb(x, name, index, FORWARD, call, not recompute)  # noqa: E731
                new = _PerturbedOutput.apply(y, perturb) if y.requires_grad else perturb(y)
            if backward_on and new.requires_grad and self._scheduled(backward_spec):
                # Registered in the original forward and (harmlessly, it never fires) in a
                # non-reentrant recompute; in a reentrant recompute this is the one that fires.
                # The backward switch is read when the gradient arrives, so one forward can
                # serve a clean and a perturbed backward (the probe relies on it).
                new.register_hook(
                    lambda g: self._perturb(g, name, index, BACKWARD, call, record=True)
                    if self.enabled[BACKWARD]
                    else None
                )
            return None if new is y else replace_hidden_tensor(output, new)

        return hook

    def __repr__(self) -> str:
        fwd = {k: type(v[0]).__name__ for k, v in self.specs[FORWARD].items()}
        bwd = {k: type(v[0]).__name__ for k, v in self.specs[BACKWARD].items()}
        return f"Injector(forward={fwd}, backward={bwd}, seed={self.seed}, step={self.step})"
