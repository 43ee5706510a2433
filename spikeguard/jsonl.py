"""Append-only JSON-lines files: the one writer and the one reader of spikeguard's logs.

One encoding everywhere: non-finite floats are written as the strings ``"inf"``,
``"-inf"`` and ``"nan"`` (JSON has no such numbers; a bare ``NaN`` token is not JSON),
and :func:`decode_float` reads them back.

The writer never loses a record and never stops training: each record goes out in a
single write followed by flush and fsync; a write that fails (disk full, folder gone)
is undone to the last whole line, the record stays in memory, a warning says so once,
and the next append (or :meth:`JsonlWriter.flush`) tries again. A file that a crash cut
off mid-line is repaired to its last whole line before anything is appended, so a new
record is never glued onto half of an old one.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["encode", "decode_float", "JsonlWriter", "read_jsonl"]

_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def encode(value: Any) -> Any:
    """``value`` as JSON-ready plain Python: non-finite floats become ``"inf"``/``"-inf"``/``"nan"``.

    Objects with a ``to_dict`` method (the records of :mod:`spikeguard.records`) are
    written as their dict.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return encode(value.to_dict())
    return value


def decode_float(value: Any) -> Any:
    """The inverse of :func:`encode` for one number (other values pass through)."""
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    return value


def dumps(record: dict[str, Any]) -> str:
    """One record as one line of JSON (keys sorted: stable, diffable logs), newline included."""
    return json.dumps(encode(record), sort_keys=True, allow_nan=False) + "\n"


class JsonlWriter:
    """Append records to a JSON-lines file; faults are kept in memory and retried, never raised.

    Args:
        path: the file (its folder is created on the first write).
        owner: who writes, for the warning a failed write gives (once per writer).
    """

    def __init__(self, path: str | os.PathLike, owner: str = "spikeguard"):
        self.path = Path(path)
        self.owner = owner
        self._pending: list[str] = []
        self._checked_tail = False
        self._warned = False
        self.num_written = 0

    @property
    def pending(self) -> int:
        """Records waiting to be written (after a failed write)."""
        return len(self._pending)

    def append(self, record: dict[str, Any]) -> bool:
        """Queue ``record`` and write everything queued; True when the file holds it now."""
        self._pending.append(dumps(record))
        return self.flush()

    def flush(self) -> bool:
        """Write the queued records; False (with a warning, once) when the file refuses them."""
        if not self._pending:
            return True
        data = "".join(self._pending).encode("utf-8")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as f:
                if not self._checked_tail:
                    self._repair_tail(f)
                start = f.tell()
                try:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                except OSError:
                    _truncate(f, start)  # never leave half a record for the next append to glue onto
                    raise
        except OSError as err:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"{self.owner}: could not write {self.path} ({type(err).__name__}: {err}); "
                    f"{len(self._pending)} record(s) kept in memory and retried at the next write; "
                    "training goes on",
                    stacklevel=3,
                )
            return False
        if self._warned:
            warnings.warn(f"{self.owner}: {self.path} is writable again; {len(self._pending)} kept record(s) written", stacklevel=3)
            self._warned = False
        self.num_written += len(self._pending)
        self._pending.clear()
        return True

    def _repair_tail(self, f: Any) -> None:
        """Cut a last line that a crash left unfinished (no newline), so appends start clean."""
        self._checked_tail = True
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        with open(self.path, "rb") as r:
            r.seek(max(0, size - 65536))
            tail = r.read()
        if tail.endswith(b"\n"):
            return
        cut = tail.rfind(b"\n")
        keep = size - len(tail) + cut + 1 if cut >= 0 else (0 if size <= 65536 else size)
        if keep == size:
            return
        _truncate(f, keep)
        warnings.warn(
            f"{self.owner}: {self.path} ended in a cut-off line (a crash mid-write); it was dropped "
            "before appending",
            stacklevel=4,
        )


def _truncate(f: Any, size: int) -> None:
    try:
        f.truncate(size)
        f.seek(size)
    except OSError:
        pass  # the reader skips a cut-off last line; the next repair cuts it


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each record of an append-only JSON-lines file.

    Every record ends with a newline, so only the piece after the last newline can have
    been cut off mid-write (a crash), whatever character it stops at: it is skipped. Any
    other line that is not a JSON object is a ``ValueError`` naming ``file:line``.
    Values are as written: use :func:`decode_float` (or the records' ``from_dict``) for
    the non-finite floats.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                return
            raise ValueError(f"{path}:{number}: not a JSON object ({err.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: not a JSON object (got {type(record).__name__})")
        yield number, record
