"""OperatorChain: the ordered operators f_1..f_N of a model, as THEORY.md §1 names them."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Operator", "OperatorChain", "hidden_tensor", "replace_hidden_tensor"]


@dataclass(frozen=True)
class Operator:
    """One operator f_i of the chain.

    Attributes:
        name: the operator's name in the chain (usually its module path in the model).
        module: the module whose forward output is z_i, the operator's output; the
            Injector and the statistics hook here.
        param_modules: the modules whose parameters are w_i. Usually ``(module,)``; for
            GPT-2's embedding the output comes from ``transformer.drop`` while the
            parameters live in ``wte`` and ``wpe``.
    """

    name: str
    module: nn.Module = field(repr=False)
    param_modules: tuple[nn.Module, ...] = field(repr=False, default=())

    def parameters(self) -> list[nn.Parameter]:
        """The parameters w_i of this operator (deduplicated, in module order)."""
        seen: set[int] = set()
        params = []
        for m in self.param_modules or (self.module,):
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params


def hidden_tensor(output: Any) -> torch.Tensor | None:
    """The hidden-state tensor z_i inside an operator's output.

    The rule (used by the Injector and the statistics alike): a tensor is itself; a
    tuple or list yields its first element that is a tensor (Hugging Face blocks return
    ``(hidden_states, ...)``); a mapping or ``ModelOutput`` yields its first value that is
    a tensor (``last_hidden_state`` or ``logits``). Anything else has no hidden state.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
        return None
    if isinstance(output, dict):  # ModelOutput is an OrderedDict
        for item in output.values():
            if isinstance(item, torch.Tensor):
                return item
    return None


def replace_hidden_tensor(output: Any, new: torch.Tensor) -> Any:
    """``output`` with its hidden-state tensor (see :func:`hidden_tensor`) replaced by ``new``."""
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, (tuple, list)):
        items = list(output)
        for i, item in enumerate(items):
            if isinstance(item, torch.Tensor):
                items[i] = new
                break
        return type(output)(items) if isinstance(output, list) else _same_tuple(output, items)
    if isinstance(output, dict):
        for key, item in output.items():
            if isinstance(item, torch.Tensor):
                output[key] = new  # ModelOutput keeps attribute and key in sync
                return output
    raise TypeError(f"no tensor to replace in an output of type {type(output).__name__}")


def _same_tuple(original: tuple, items: list) -> tuple:
    if hasattr(original, "_fields"):  # namedtuple
        return type(original)(*items)
    return tuple(items)


class OperatorChain(Sequence[Operator]):
    """The ordered operators f_1..f_N whose outputs and gradients spikeguard watches.

    Build one with :meth:`from_model` (GPT-2, Llama-family, BERT-family Hugging Face
    models and ``nn.Sequential``) or :meth:`from_patterns` (any model). Iterating yields
    :class:`Operator` objects in forward order; ``chain["transformer.h.0"]`` indexes by
    name, ``chain[0]`` by position.
    """

    def __init__(self, operators: Sequence[Operator]):
        if not operators:
            raise ValueError("an OperatorChain needs at least one operator, got none")
        names = [op.name for op in operators]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"operator names must be unique, repeated: {dupes}")
        modules = [id(op.module) for op in operators]
        if len(set(modules)) != len(modules):
            shared = [op.name for op in operators if modules.count(id(op.module)) > 1]
            raise ValueError(f"operators {shared} share one module; each operator needs its own")
        self._ops = tuple(operators)
        self._index = {op.name: i for i, op in enumerate(self._ops)}

    # -- construction ----------------------------------------------------------------

    @classmethod
    def from_model(cls, model: nn.Module) -> OperatorChain:
        """Discover the chain of a supported model: embeddings, each block, final norm, head.

        Supported (by structure, so variants with the same layout work too):

        - GPT-2 (``GPT2LMHeadModel``, ``GPT2Model``): the embedding (``wte`` + ``wpe``,
          observed at ``drop``, their sum after dropout), ``h.*``, ``ln_f``, ``lm_head``.
        - Llama family (``LlamaForCausalLM``, Qwen2, Mistral, ``LlamaModel``):
          ``embed_tokens``, ``layers.*``, ``norm``, ``lm_head``.
        - BERT family (``BertModel``, ``BertForMaskedLM``,
          ``BertForSequenceClassification``): ``embeddings``, ``encoder.layer.*``, then
          ``pooler`` + ``classifier`` or ``cls`` when present.
        - ``nn.Sequential``: each child.

        Anything else: use :meth:`from_patterns`.
        """
        for discover in (_gpt2, _llama, _bert, _sequential):
            ops = discover(model)
            if ops is not None:
                return cls(ops)
        raise ValueError(
            f"cannot discover the operators of a {type(model).__name__}: from_model supports "
            "GPT-2, Llama-family (model.layers), BERT-family and nn.Sequential models. "
            "Name them yourself with OperatorChain.from_patterns(model, patterns), e.g. "
            f"patterns={_pattern_hint(model)}"
        )

    @classmethod
    def from_patterns(
        cls, model: nn.Module, patterns: Sequence[str], *, regex: bool = False
    ) -> OperatorChain:
        """Operators named by patterns over ``model.named_modules()`` names.

        Patterns are globs over dotted names, as paths are globbed over ``/``: ``*``
        matches within one dotted component, ``**`` across components, ``?`` one
        character, ``[...]`` a character class. So ``"transformer.h.*"`` matches the
        blocks ``transformer.h.0`` .. ``transformer.h.11`` and not their submodules
        ``transformer.h.0.attn``; ``"transformer.h.**"`` matches both. With
        ``regex=True`` a pattern is a regular expression that must match the whole name
        (:func:`re.fullmatch`). The chain is the patterns in the order given; the
        modules one pattern matches keep the model's own order.
        """
        if isinstance(patterns, str):
            raise TypeError(f"patterns must be a list of strings, got the string {patterns!r}")
        names = [n for n, _ in model.named_modules() if n]
        modules = dict(model.named_modules())
        chosen: list[str] = []
        for pattern in patterns:
            compiled = _compile(pattern, regex)
            hits = [n for n in names if compiled.fullmatch(n)]
            if not hits:
                close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.3)
                kind = "regex" if regex else "pattern"
                raise ValueError(
                    f"{kind} {pattern!r} matches no module of {type(model).__name__}; "
                    f"close module names: {close or names[:5]}"
                )
            for hit in hits:
                if hit in chosen:
                    raise ValueError(f"module {hit!r} is matched by more than one pattern")
                chosen.append(hit)
        return cls([Operator(n, modules[n], (modules[n],)) for n in chosen])

    # -- sequence protocol -----------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return [op.name for op in self._ops]

    def __len__(self) -> int:
        return len(self._ops)

    def __iter__(self) -> Iterator[Operator]:
        return iter(self._ops)

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, str):
            if key not in self._index:
                close = difflib.get_close_matches(key, self.names, n=5, cutoff=0.3)
                raise KeyError(f"no operator named {key!r}; close names: {close or self.names[:5]}")
            return self._ops[self._index[key]]
        return self._ops[key]

    def __contains__(self, key: object) -> bool:
        return key in self._index if isinstance(key, str) else key in self._ops

    def index(self, name: str) -> int:  # type: ignore[override]
        """Position (0-based) of the operator named ``name``."""
        return self._ops.index(self[name])

    def __repr__(self) -> str:
        shown = self.names if len(self) <= 8 else self.names[:4] + ["..."] + self.names[-2:]
        return f"OperatorChain(N={len(self)}, {shown})"

    def select(self, patterns: str | Sequence[str]) -> list[str]:
        """Names of the operators matched by exact names or globs (see :meth:`from_patterns`).

        ``"*"`` alone means every operator (a glob ``*`` would stop at the first dot,
        and operator names are dotted).
        """
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        out: list[str] = []
        for pattern in patterns:
            if pattern == "*":
                out.extend(n for n in self.names if n not in out)
                continue
            compiled = _compile(pattern, regex=False)
            hits = [n for n in self.names if n == pattern or compiled.fullmatch(n)]
            if not hits:
                close = difflib.get_close_matches(pattern, self.names, n=5, cutoff=0.3)
                raise ValueError(
                    f"{pattern!r} matches no operator of the chain; "
                    f"close names: {close or self.names[:5]} (all {len(self)}: {self.names})"
                )
            out.extend(h for h in hits if h not in out)
        return out

    # -- verification ----------------------------------------------------------------

    def firing_order(self, model: nn.Module, *args: Any, **kwargs: Any) -> list[str]:
        """The operator names in the order they fire during ``model(*args, **kwargs)``."""
        fired: list[str] = []
        handles = [
            op.module.register_forward_hook(lambda *_, name=op.name: fired.append(name))
            for op in self._ops
        ]
        try:
            with torch.no_grad():
                model(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        return fired

    def verify(self, model: nn.Module, *args: Any, **kwargs: Any) -> OperatorChain:
        """Check on a sample input that each operator fires once per forward, in order.

        Raises ``ValueError`` naming the operator that never ran, ran more than once (a
        shared module) or ran out of order. Returns the chain, so it can be chained.
        """
        fired = self.firing_order(model, *args, **kwargs)
        never = [n for n in self.names if n not in fired]
        if never:
            raise ValueError(f"operators never ran during the forward pass: {never}")
        twice = sorted({n for n in fired if fired.count(n) > 1})
        if twice:
            counts = {n: fired.count(n) for n in twice}
            raise ValueError(
                f"operators ran more than once per forward pass (a shared or reused "
                f"module?): {counts}"
            )
        if fired != self.names:
            pos = next(i for i, (a, b) in enumerate(zip(fired, self.names)) if a != b)
            raise ValueError(
                f"operators fired out of the declared order: at position {pos} the chain "
                f"declares {self.names[pos]!r} but {fired[pos]!r} ran; fired order: {fired}"
            )
        return self


# -- discovery per architecture ---------------------------------------------------------


def _get(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _has(module: nn.Module, *paths: str) -> bool:
    return all(_get(module, p) is not None for p in paths)


def _ops_for(model: nn.Module, paths: list[str]) -> list[Operator]:
    return [Operator(p, model.get_submodule(p), (model.get_submodule(p),)) for p in paths]


def _blocks(model: nn.Module, path: str) -> list[str]:
    return [f"{path}.{i}" for i in range(len(model.get_submodule(path)))]


def _gpt2(model: nn.Module) -> list[Operator] | None:
    for prefix in ("transformer.", ""):
        if _has(model, f"{prefix}wte", f"{prefix}wpe", f"{prefix}drop", f"{prefix}h", f"{prefix}ln_f"):
            break
    else:
        return None
    embed = Operator(
        f"{prefix}embed",
        model.get_submodule(f"{prefix}drop"),
        (model.get_submodule(f"{prefix}wte"), model.get_submodule(f"{prefix}wpe")),
    )
    ops = [embed] + _ops_for(model, _blocks(model, f"{prefix}h") + [f"{prefix}ln_f"])
    if prefix and _has(model, "lm_head"):
        ops += _ops_for(model, ["lm_head"])
    return ops


def _llama(model: nn.Module) -> list[Operator] | None:
    for prefix in ("model.", ""):
        if _has(model, f"{prefix}embed_tokens", f"{prefix}layers", f"{prefix}norm"):
            break
    else:
        return None
    paths = [f"{prefix}embed_tokens"] + _blocks(model, f"{prefix}layers") + [f"{prefix}norm"]
    if prefix and _has(model, "lm_head"):
        paths.append("lm_head")
    return _ops_for(model, paths)


def _bert(model: nn.Module) -> list[Operator] | None:
    for prefix in ("bert.", "roberta.", ""):
        if _has(model, f"{prefix}embeddings", f"{prefix}encoder.layer"):
            break
    else:
        return None
    paths = [f"{prefix}embeddings"] + _blocks(model, f"{prefix}encoder.layer")
    if _has(model, "cls"):  # masked-LM head: the pooler does not feed it
        paths.append("cls")
    elif _has(model, "lm_head"):  # RoBERTa masked-LM head
        paths.append("lm_head")
    elif getattr(model.get_submodule(prefix.rstrip(".")) if prefix else model, "pooler", None) is not None:
        paths.append(f"{prefix}pooler")
        if _has(model, "classifier"):
            paths.append("classifier")
    elif _has(model, "classifier"):
        paths.append("classifier")
    return _ops_for(model, paths)


def _sequential(model: nn.Module) -> list[Operator] | None:
    if not isinstance(model, nn.Sequential):
        return None
    return _ops_for(model, [name for name, _ in model.named_children()])


def _pattern_hint(model: nn.Module) -> list[str]:
    """A guess at block patterns: the largest ModuleList in the model."""
    lists = [(len(m), n) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n]
    if not lists:
        children = [n for n, _ in model.named_children()]
        return children[:4] or ["<module name>"]
    _, name = max(lists)
    return [f"{name}.*"]


def _compile(pattern: str, regex: bool) -> re.Pattern:
    """A compiled matcher for a dotted-name glob (or a regex when ``regex``)."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"a pattern must be a non-empty string, got {pattern!r}")
    if regex:
        try:
            return re.compile(pattern)
        except re.error as err:
            raise ValueError(f"pattern {pattern!r} is not a valid regex: {err}") from None
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^.]*")
        elif c == "?":
            out.append("[^.]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                raise ValueError(f"pattern {pattern!r} has an unclosed '['")
            body = pattern[i + 1 : end].replace("\\", "\\\\")
            out.append("[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]")
            i = end + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))
