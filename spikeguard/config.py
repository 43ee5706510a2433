"""Validated settings: errors that name the dotted key, the value and what is allowed.

A settings dataclass raises :class:`ConfigError` from ``__post_init__``; whoever embeds
it (``SpikeGuard(detector=...)``) re-raises it under its own dotted prefix with
:meth:`ConfigError.under`, so a user reads ``SpikeGuard.detector.window must be an int >=
1, got 0`` whichever way the value came in (Python or LightningCLI YAML).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["ConfigError", "from_mapping", "check_int", "check_number", "check_choice"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting with a value it may not take.

    Attributes:
        owner: who holds the setting (``"DetectorConfig"``, ``"SpikeGuard.detector"``).
        key: its name under ``owner``.
        value: the value given.
        allowed: what it may be, in words (``"an int >= 1"``).
    """

    def __init__(self, owner: str, key: str, value: Any, allowed: str, unknown: bool = False):
        self.owner, self.key, self.value, self.allowed, self.unknown = owner, key, value, allowed, unknown
        if unknown:
            super().__init__(f"{owner}.{key} is not a setting ({allowed}); got {key}={value!r}")
        else:
            super().__init__(f"{owner}.{key} must be {allowed}, got {value!r}")

    def under(self, owner: str) -> ConfigError:
        """The same error for a setting reached through ``owner`` (``SpikeGuard.detector``)."""
        return ConfigError(owner, self.key, self.value, self.allowed, self.unknown)


def check_int(owner: str, key: str, value: Any, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(owner, key, value, f"an int >= {minimum}")
    return value


def check_number(owner: str, key: str, value: Any, *, above: float | None = None, at_least: float | None = None) -> float:
    """A finite number, ``> above`` or ``>= at_least``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and above is not None:
        ok = value > above
        allowed = f"a finite number > {above:g}"
    elif ok and at_least is not None:
        ok = value >= at_least
        allowed = f"a finite number >= {at_least:g}"
    else:
        allowed = "a finite number" if above is None and at_least is None else (
            f"a finite number > {above:g}" if above is not None else f"a finite number >= {at_least:g}"
        )
    if not ok:
        raise ConfigError(owner, key, value, allowed)
    return float(value)


def check_choice(owner: str, key: str, value: Any, choices: tuple[Any, ...]) -> Any:
    if value not in choices:
        raise ConfigError(owner, key, value, f"one of {list(choices)}")
    return value


def from_mapping(cls: type[T], values: Mapping[str, Any] | T | None, owner: str) -> T:
    """A ``cls`` from an instance, a mapping of its fields, or None (the defaults).

    An unknown key is a :class:`ConfigError` naming it and its close matches; a bad value
    is the dataclass's own error, re-raised under ``owner``.
    """
    if values is None:
        values = {}
    if isinstance(values, cls):
        return values
    if not isinstance(values, Mapping):
        raise TypeError(f"{owner} must be a {cls.__name__} or a dict of its fields, got {type(values).__name__}")
    fields = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=3)
            hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else f"the settings are {fields}"
            raise ConfigError(owner, str(key), values[key], hint, unknown=True)
    try:
        return cls(**values)
    except ConfigError as err:
        raise err.under(owner) from None
