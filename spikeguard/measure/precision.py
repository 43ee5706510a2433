"""The precision probe: each operator's local low-precision error, propagated by Proposition 1.

"How much of my gradient is numerical noise, and which operator contributes it?" For the
training precision in use (``torch.autocast`` to bf16 or fp16) the probe measures, on one
batch, each operator's *local* error: the operator run on its clean fp32 input once in
the low precision and once in fp32. Those errors are THEORY §1's |δ_i| (forward) and
|ε_i| (backward); Proposition 1 with the measured constants turns them into a predicted
end-to-end gradient error, which the probe puts next to the observed one (the whole
forward and backward under autocast against the whole pass in fp32).

Indexing (0-based over the chain's N operators, as in :mod:`spikeguard.theory`):

- ``local_forward[i]`` = |δ_i| = |f_i^low(z_{i-1}) - f_i(z_{i-1})|: operator i re-run on
  its clean fp32 input, the low-precision output compared with the fp32 one in float64.
- ``local_backward[i]`` = |ε_i|, the error of the gradient message with respect to
  operator i's *output*. The backward that produces that message belongs to what sits
  above operator i, so

  - for i < N-1: ``|J_{i+1}^low(z_i)^T g_{i+1} - J_{i+1}(z_i)^T g_{i+1}|``, operator
    i+1's backward through its autocast graph on the clean fp32 message g_{i+1} (cast to
    operator i+1's low-precision output dtype, as the low-precision pass holds it), read
    at an fp32 leaf in place of z_i;
  - for i = N-1: ``|∂h^low/∂z_N - ∂h/∂z_N|``, the loss head h (whatever ``loss_fn`` does
    after the last operator) run under autocast on the clean fp32 z_N, against fp32.

  The rounding of a message into an operator's low-precision output dtype is thus
  charged to that operator's backward (to ε of the operator below it), once.
- ``local_param[i]`` = |κ_i| = |K_i^low(z_{i-1})^T g_i - K_i^T g_i|: the rounding of the
  parameter-gradient computation itself (a bf16 weight-gradient matmul), which THEORY §1
  does not perturb. By the triangle inequality it adds to Proposition 1's
  ``d_i ≤ M_i b_i + H'_i e_{i-1}|g_i|`` term for term, so the prediction carries it as
  ``d_i + |κ_i|`` (see :attr:`PrecisionResult.predicted`).

The predicted error is attributed to operators twice (:class:`PrecisionResult`): by
where each error lands (Proposition 1's index, ``contribution``) and by the computation
that produced it (``source``): the latter names the operator whose low precision costs.

Local errors are measured at the clean point and the constants are first-order
estimates there (THEORY §1): the prediction is a first-order bound, labelled as such.

Nothing here touches ``.grad``, the parameters, the optimizer or the global RNG: every
gradient is taken with ``torch.autograd.grad``; the full passes replay the RNG state the
probe started with and each operator's re-runs replay the state it ran with, so dropout
masks match across all passes.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from spikeguard import theory
from spikeguard._tensor import RngState, diff_norm64, nan_ratio, norm64
from spikeguard.measure.precision_result import LOSS_HEAD, PRECISION_DTYPES, PrecisionResult
from spikeguard.measure.probe import AmplificationProbe
from spikeguard.measure.results import Constants
from spikeguard.operators import OperatorChain, hidden_tensor, replace_hidden_tensor
from spikeguard.perturb import Injector, Rounding
from spikeguard.perturb.noise import FORMATS

__all__ = ["PrecisionResult", "precision_probe", "PRECISION_DTYPES", "LOSS_HEAD"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def _grads(output: torch.Tensor, inputs: list[torch.Tensor], message: torch.Tensor) -> list[torch.Tensor]:
    """``J^T message`` at each input (zeros where unused); the message in the output's dtype."""
    if not inputs:
        return []
    if not output.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    res = torch.autograd.grad(output, inputs, grad_outputs=message.to(output.dtype), allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(res, inputs)]


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``obj`` with ``fn`` applied to every tensor inside tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_map_tensors(x, fn) for x in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(x, fn) for x in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _find_cache(obj: Any) -> Any | None:
    """A ``transformers`` Cache object anywhere inside ``obj`` (found by class, no import)."""
    if any(c.__name__ == "Cache" and c.__module__.startswith("transformers") for c in type(obj).__mro__):
        return obj
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    for item in items:
        found = _find_cache(item)
        if found is not None:
            return found
    return None


def _check_autocast(device_type: str, dtype: torch.dtype) -> None:
    """Raise unless ``torch.autocast(device_type, dtype=dtype)`` really runs in ``dtype``."""
    try:
        available = torch.amp.is_autocast_available(device_type)
    except RuntimeError:  # not a device type torch knows
        available = False
    if not available:
        raise ValueError(
            f"precision_probe.device_type must be a device type with autocast in torch "
            f"{torch.__version__} (such as 'cpu' or 'cuda'), got {device_type!r}"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.autocast(device_type, dtype=dtype):
            active = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == dtype
    if not active:
        why = "; ".join(str(w.message) for w in caught) or "autocast stayed disabled"
        raise RuntimeError(
            f"precision_probe: autocast to {dtype} is not available on {device_type!r} in torch "
            f"{torch.__version__} ({why}); try another of {list(PRECISION_DTYPES)}"
        )


@dataclass
class _Call:
    """One operator's captured module call: detached arguments, its hidden input, the RNG."""

    args: tuple
    kwargs: dict
    position: int | str | None  # where the hidden input sits: an args index, "hidden_states", or None
    hidden: torch.Tensor | None  # a clone of z_{i-1}, detached
    rng: RngState

    def with_input(self, x: torch.Tensor | None) -> tuple[tuple, dict]:
        """The call's arguments with the hidden input replaced by ``x`` (when it has one)."""
        args, kwargs = self.args, dict(self.kwargs)
        if x is not None and isinstance(self.position, int):
            args = args[: self.position] + (x,) + args[self.position + 1 :]
        elif x is not None:
            kwargs[self.position] = x
        return args, kwargs


def _hidden_position(args: tuple, kwargs: dict) -> int | str | None:
    """The hidden-state input: ``kwargs["hidden_states"]``, else the first float tensor in args."""
    h = kwargs.get("hidden_states")
    if isinstance(h, torch.Tensor) and h.is_floating_point():
        return "hidden_states"
    for k, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return k
    return None


class _Recorder:
    """Hooks, live for one fp32 forward only, that record each operator's call and output.

    The recursion guard is structural: the hooks are removed before the probe
    re-invokes any module, so a re-call can never record over the clean pass.
    """

    def __init__(self, chain: OperatorChain, cuda: bool):
        n = len(chain)
        self.chain = chain
        self.cuda = cuda
        self.calls: list[_Call | None] = [None] * n
        self.outputs: list[torch.Tensor | None] = [None] * n

    def _pre_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            name = self.chain.names[index]
            if self.calls[index] is not None:
                raise ValueError(
                    f"precision_probe: operator {name!r} ran twice in one forward; the chain must "
                    "fire each operator once (OperatorChain.verify checks this)"
                )
            cache = _find_cache((args, kwargs))
            if cache is not None:
                raise ValueError(
                    f"precision_probe: operator {name!r} was called with a {type(cache).__name__} "
                    "(a transformers KV cache); the probe re-invokes each operator's module on its "
                    "captured input, which a cache would corrupt, so the module must be "
                    "re-invocable without a KV cache: pass use_cache=False in loss_fn, e.g. "
                    "lambda m, b: m(input_ids=b, labels=b, use_cache=False).loss"
                )
            args, kwargs = _map_tensors(args, torch.Tensor.detach), _map_tensors(kwargs, torch.Tensor.detach)
            position = _hidden_position(args, kwargs)
            hidden = None
            if position is not None:
                hidden = (args[position] if isinstance(position, int) else kwargs[position]).clone()
            self.calls[index] = _Call(args, kwargs, position, hidden, RngState.capture(["cuda"] if self.cuda else []))

        return hook

    def _hook(self, index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            z = hidden_tensor(output)
            if z is None:
                raise TypeError(f"precision_probe: operator {self.chain.names[index]!r} returned no tensor")
            self.outputs[index] = z

        return hook

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        handles = []
        try:
            for i, op in enumerate(self.chain):
                handles.append(op.module.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True))
                handles.append(op.module.register_forward_hook(self._hook(i)))
            yield
        finally:
            for h in handles:
                h.remove()
        missing = [name for name, c in zip(self.chain.names, self.calls) if c is None]
        if missing:
            raise ValueError(f"precision_probe: operators did not run on the probe batch: {missing}")


@contextlib.contextmanager
def _replaced_output(module: nn.Module, leaf: torch.Tensor) -> Iterator[None]:
    """While active, ``module``'s hidden output is replaced by ``leaf``."""
    handle = module.register_forward_hook(lambda m, a, out: replace_hidden_tensor(out, leaf))
    try:
        yield
    finally:
        handle.remove()


def _scalar_loss(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0 or not loss.requires_grad:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else ""
        raise ValueError(
            "precision_probe.loss_fn must return a scalar tensor that requires grad, got "
            f"{type(loss).__name__}{shape}"
        )
    return loss


# -- the probe -------------------------------------------------------------------------


def precision_probe(
    model: nn.Module,
    chain: OperatorChain,
    loss_fn: LossFn,
    batch: Any,
    *,
    dtype: torch.dtype = torch.bfloat16,
    constants: Constants | None = None,
    device_type: str | None = None,
) -> PrecisionResult:
    """Local low-precision errors per operator, their predicted effect, and the observed one.

    Args:
        model: an fp32 model (its mode, train or eval, is used as is).
        chain: its operators.
        loss_fn: ``loss_fn(model, batch) -> scalar loss``. Hugging Face decoders must run
            without a KV cache (``use_cache=False``): the probe re-invokes each operator.
        batch: the probe batch.
        dtype: the autocast dtype, one of :data:`PRECISION_DTYPES`.
        constants: Proposition 1's constants; when None they are measured by an
            :class:`AmplificationProbe` that rounds every operator output to ``dtype``
            (forward configuration, no linearization).
        device_type: autocast's device type; default the type of the model's parameters.

    Cost: four forward-backward passes (the whole model in fp32 and under autocast, and
    the same two for the loss head on the clean z_N), two re-runs of each operator with
    their backward, plus the amplification probe when ``constants`` is None.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"precision_probe.model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(chain, OperatorChain):
        raise TypeError(f"precision_probe.chain must be an OperatorChain, got {type(chain).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"precision_probe.loss_fn must be callable (model, batch) -> loss, got {loss_fn!r}")
    if dtype not in PRECISION_DTYPES:
        raise ValueError(f"precision_probe.dtype must be one of {list(PRECISION_DTYPES)}, got {dtype!r}")
    if constants is not None and not isinstance(constants, Constants):
        raise TypeError(f"precision_probe.constants must be a Constants or None, got {type(constants).__name__}")
    if constants is not None and constants.gains.numel() != len(chain):
        raise ValueError(
            f"precision_probe.constants are for {constants.gains.numel()} operators, the chain has {len(chain)}"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("precision_probe.model has no parameter that requires grad")
    not_fp32 = sorted({str(p.dtype) for p in params if p.dtype != torch.float32})
    if not_fp32:
        raise ValueError(
            "precision_probe compares autocast against fp32 and needs float32 parameters, got "
            f"{not_fp32} (autocast leaves float64 alone and a low-precision model has no fp32 reference)"
        )
    device = params[0].device
    if device_type is None:
        device_type = device.type
    if not isinstance(device_type, str):
        raise TypeError(f"precision_probe.device_type must be a string such as 'cpu' or 'cuda', got {device_type!r}")
    _check_autocast(device_type, dtype)
    fmt = PRECISION_DTYPES[dtype]

    start = RngState.capture([device])
    with start.forked():
        return _Probe(model, chain, loss_fn, batch, dtype, device_type, fmt, params, start).run(constants)


class _Probe:
    """The state of one precision probe; :meth:`run` does the work."""

    def __init__(self, model, chain, loss_fn, batch, dtype, device_type, fmt, params, start: RngState):
        self.model, self.chain, self.loss_fn, self.batch = model, chain, loss_fn, batch
        self.dtype, self.device_type, self.fmt = dtype, device_type, fmt
        self.params = params
        self.start = start
        self.notes: list[str] = []

    def _low(self):
        return torch.autocast(self.device_type, dtype=self.dtype)

    def _loss(self, low: bool) -> torch.Tensor:
        """One full forward from the probe's starting RNG state, under autocast when ``low``."""
        self.start.restore()
        with self._low() if low else contextlib.nullcontext(), torch.enable_grad():
            return _scalar_loss(self.loss_fn(self.model, self.batch))

    def run(self, constants: Constants | None) -> PrecisionResult:
        n = len(self.chain)
        recorder = _Recorder(self.chain, self.start.cuda is not None)

        # -- the fp32 pass: calls, outputs z_i, messages g_i, the gradient G
        with recorder.recording():
            loss = self._loss(low=False)
        z = recorder.outputs
        calls: list[_Call] = recorder.calls  # type: ignore[assignment]
        live = [i for i in range(n) if z[i].requires_grad]
        res = torch.autograd.grad(loss, [z[i] for i in live] + self.params, allow_unused=True)
        g = [torch.zeros_like(t) for t in z]
        for i, r in zip(live, res[: len(live)]):
            if r is not None:
                g[i] = r
        G = [torch.zeros_like(p) if r is None else r for r, p in zip(res[len(live) :], self.params)]
        del loss, res

        # -- the low-precision pass, whole: the observation
        loss_low = self._loss(low=True)
        G_low = torch.autograd.grad(loss_low, self.params, allow_unused=True)
        G_low = [torch.zeros_like(p) if r is None else r for r, p in zip(G_low, self.params)]
        del loss_low
        observed = diff_norm64(G_low, G)
        grad_norm = norm64(G)

        # -- local errors, operator by operator
        delta = torch.zeros(n, dtype=torch.float64)
        eps = torch.zeros(n, dtype=torch.float64)
        kappa = torch.zeros(n, dtype=torch.float64)
        own = torch.zeros(n, dtype=torch.float64)  # |K_i^T g_i|
        for i, op in enumerate(self.chain):
            call = calls[i]
            op_params = [p for p in op.parameters() if p.requires_grad]
            leaf = None
            if i > 0 and call.hidden is not None:
                leaf = call.hidden.clone().requires_grad_(True)
            inputs = ([leaf] if leaf is not None else []) + op_params
            ref = self._recall(op.module, call, leaf, low=False)
            low = self._recall(op.module, call, leaf, low=True)
            delta[i] = diff_norm64([low], [ref])
            r_ref = _grads(ref, inputs, g[i])
            r_low = _grads(low, inputs, g[i])
            k = 1 if leaf is not None else 0
            if leaf is not None:
                eps[i - 1] = diff_norm64([r_low[0]], [r_ref[0]])
            kappa[i] = diff_norm64(r_low[k:], r_ref[k:])
            own[i] = norm64(r_ref[k:])
            if i > 0 and call.hidden is None:
                self._note(
                    f"operator {op.name!r} has no floating-point input to re-run it on: "
                    f"ε of {self.chain.names[i - 1]!r} is not measured (0)"
                )
            self._note_outside(op)
        eps[n - 1] = self._head_error(z[n - 1])

        if constants is None:
            self.start.restore()
            injector = Injector(self.chain, forward={"*": Rounding(self.fmt)})
            probe = AmplificationProbe(
                self.model, self.chain, self.loss_fn, injector, configs=("forward",), linearize=False
            )
            probed = probe.run(self.batch)
            constants = probed.constants
            self._note(
                f"constants measured by AmplificationProbe with every operator output rounded to {self.fmt} "
                "(first-order estimates at the clean point)"
            )
            for note in probed.notes:
                self._note(f"AmplificationProbe: {note}")
        kw = constants.theory_kwargs()
        bound = theory.propagate(forward=delta, backward=eps, **kw)
        d = bound.d + kappa  # d_i ≤ M_i b_i + H'_i e_{i-1}|g_i| + |κ_i|
        predicted = theory.PropagationBound(e=bound.e, b=bound.b, d=d, total=float(torch.linalg.vector_norm(d)))
        amp = theory.amplification(**kw)
        contribution = amp.forward * delta + amp.backward * eps + kappa
        source = torch.cat([amp.forward * delta + kappa, torch.zeros(1, dtype=torch.float64)])
        source[1:] += amp.backward * eps  # ε_i comes from operator i+1's backward, ε_N from the head

        z_norm = torch.tensor([norm64([t]) for t in z], dtype=torch.float64)
        g_norm = torch.tensor([norm64([t]) for t in g], dtype=torch.float64)
        if observed == 0.0:
            self._note(
                f"the autocast pass gave bitwise the fp32 gradient: did autocast on {self.device_type!r} "
                "reach the model's operations?"
            )
        return PrecisionResult(
            names=tuple(self.chain.names), dtype=self.dtype, unit_roundoff=float(FORMATS[self.fmt][2]),
            local_forward=delta, local_backward=eps, local_param=kappa,
            relative_forward=nan_ratio(delta, z_norm), relative_backward=nan_ratio(eps, g_norm),
            relative_param=nan_ratio(kappa, own),
            constants=constants, predicted=predicted, contribution=contribution, source=source,
            observed_total=observed, grad_norm=grad_norm, notes=tuple(self.notes),
        )

    def _recall(self, module: nn.Module, call: _Call, x: torch.Tensor | None, low: bool) -> torch.Tensor:
        """Operator i's module on its captured call (hidden input ``x``), its RNG replayed."""
        args, kwargs = call.with_input(x)
        call.rng.restore()
        with self._low() if low else contextlib.nullcontext(), torch.enable_grad():
            out = module(*args, **kwargs)
        return hidden_tensor(out)

    def _head_error(self, z_last: torch.Tensor) -> float:
        """|ε_N|: the loss head's ∂h/∂z_N on the clean fp32 z_N, under autocast against fp32."""
        module = self.chain[len(self.chain) - 1].module
        grads = []
        for low in (False, True):
            leaf = z_last.detach().clone().requires_grad_(True)
            with _replaced_output(module, leaf):
                loss = self._loss(low=low)
            (r,) = torch.autograd.grad(loss, leaf, allow_unused=True)
            grads.append(torch.zeros_like(leaf) if r is None else r)
        return diff_norm64([grads[1]], [grads[0]])

    def _note_outside(self, op) -> None:
        inside = {id(m) for m in op.module.modules()}
        outside = [m for m in op.param_modules if id(m) not in inside]
        if outside:
            names = {id(m): n for n, m in self.model.named_modules()}
            self._note(
                f"operator {op.name!r} is re-run through its output module only: its local errors "
                f"exclude {[names.get(id(m), type(m).__name__) for m in outside]}"
            )

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
