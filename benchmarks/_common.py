"""Shared timing harness for the benchmarks: interleaved rounds, medians, ratios to a baseline, JSON out.

Every benchmark measures its variants in one process, interleaved (after warm-up, each
round calls every variant once, in an order rotated by one each round), and reports
each variant's median time and its ratio to the baseline's median. Machines drift (other
jobs, thermal state, frequency scaling) on the scale of seconds; interleaving spreads
that drift over all variants alike, so ratios stay meaningful where absolute times are
not. Noise is reported next to every ratio:

- ``noise.aa_ratio``: the baseline against itself, timed as a second interleaved copy
  (an A/A test). Its distance from 1 is the resolution of every other ratio.
- ``iqr_rel``: each variant's interquartile range over its median.
- ``ratio_paired``: the quartiles of the per-round ratios variant/baseline.

Usage::

    bench = Benchmark("my_bench", __doc__)
    args = bench.parse_args()
    timing = bench.compare({"bare": f, "hooked": g}, baseline="bare")
    bench.emit({"timing": timing, "goals": {...}})

Run a benchmark as ``python benchmarks/<name>.py [--rounds N] [--warmup N] [--threads N]
[--quick] [--save]``; it prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch

__all__ = ["Benchmark", "compare", "goal", "machine_info", "RESULTS_DIR"]

#: Where ``--save`` writes ``<name>.json``.
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(q1, median, q3), inclusive method (exact on the sample, defined for n = 1)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


Variant = Union[Callable[[], Any], tuple[Callable[[], Any], int]]


def compare(
    variants: Mapping[str, Variant],
    *,
    baseline: str,
    rounds: int,
    warmup: int,
    sync: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Time ``variants`` interleaved and report each against ``baseline``.

    A variant is a callable, or ``(callable, number)``: then one sample is ``number``
    consecutive calls and the time reported is per call (as :mod:`timeit`'s ``number``),
    e.g. to time a steady-state training step next to a variant that disturbs caches.

    Warm-up: ``warmup`` interleaved rounds, untimed except that each variant's very first
    sample is kept as ``first_s`` (a cold start: allocation, lazy initialisation, caches).
    Then ``rounds`` timed rounds. Round r (counting warm-up) calls the variants in the
    listed order rotated by r, so each variant sits in each position equally often. The baseline also runs
    as a second copy in every round, which gives the A/A noise estimate. ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs before and after each call so asynchronous work is
    counted. The garbage collector is paused while timing, as :mod:`timeit` does.

    Returns ``{"baseline": name, "rounds": R, "warmup": W, "variants": {name: {"number", "median_s",
    "q1_s", "q3_s", "min_s", "iqr_rel", "first_s", "ratio", "ratio_paired": [q1, median,
    q3]}}, "noise": {"aa_ratio", "aa_paired": [q1, median, q3], "baseline_iqr_rel"}}``.
    """
    if baseline not in variants:
        raise ValueError(f"baseline {baseline!r} is not one of the variants {list(variants)}")
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    copy = f"{baseline} (A/A copy)"
    calls = {name: v if isinstance(v, tuple) else (v, 1) for name, v in variants.items()}
    calls[copy] = calls[baseline]
    bad = {name: number for name, (_, number) in calls.items() if not (isinstance(number, int) and number >= 1)}
    if bad:
        raise ValueError(f"a variant's number of calls per sample must be an int >= 1, got {bad}")
    names = list(calls)
    sync = sync or (lambda: None)

    def timed(variant: tuple[Callable[[], Any], int]) -> float:
        fn, number = variant
        sync()
        start = time.perf_counter()
        for _ in range(number):
            fn()
        sync()
        return (time.perf_counter() - start) / number

    first: dict[str, float] = {}
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(warmup + rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                dt = timed(calls[name])
                first.setdefault(name, dt)
                if r >= warmup:
                    samples[name].append(dt)
    finally:
        if was_enabled:
            gc.enable()

    base = samples[baseline]
    _, base_median, _ = _quartiles(base)

    def summary(name: str) -> dict[str, Any]:
        q1, med, q3 = _quartiles(samples[name])
        paired = _quartiles([t / b for t, b in zip(samples[name], base)])
        return {
            "number": calls[name][1],
            "median_s": round(med, 6),
            "q1_s": round(q1, 6),
            "q3_s": round(q3, 6),
            "min_s": round(min(samples[name]), 6),
            "iqr_rel": round((q3 - q1) / med, 4) if med > 0 else math.nan,
            "first_s": round(first[name], 6),
            "ratio": round(med / base_median, 4),
            "ratio_paired": [round(x, 4) for x in paired],
        }

    out = {name: summary(name) for name in names}
    aa = out.pop(copy)
    return {
        "baseline": baseline,
        "rounds": rounds,
        "warmup": warmup,
        "variants": out,
        "noise": {
            "aa_ratio": aa["ratio"],
            "aa_paired": aa["ratio_paired"],
            "baseline_iqr_rel": out[baseline]["iqr_rel"],
        },
    }


def goal(value: float, limit: float, text: str) -> dict[str, Any]:
    """One goal of the form ``value <= limit``, reported as measured, met or not."""
    return {"goal": text, "limit": limit, "value": round(value, 4), "met": bool(value <= limit)}


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": device,
    }
    if hasattr(os, "sched_getaffinity"):
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return info


class Benchmark:
    """Command line, harness defaults and output of one benchmark script.

    Args:
        name: the benchmark's name; ``--save`` writes ``benchmarks/results/<name>.json``.
        description: the ``--help`` text (the script's docstring).
        rounds, warmup: defaults of ``--rounds`` and ``--warmup``.
        quick_rounds, quick_warmup: what ``--quick`` sets them to (a smoke test).
    """

    def __init__(
        self,
        name: str,
        description: str | None = None,
        *,
        rounds: int = 30,
        warmup: int = 3,
        quick_rounds: int = 3,
        quick_warmup: int = 1,
    ):
        self.name = name
        self.quick_rounds = quick_rounds
        self.quick_warmup = quick_warmup
        self.parser = argparse.ArgumentParser(
            description=description, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        add = self.parser.add_argument
        add("--rounds", type=int, default=rounds, help=f"timed interleaved rounds (default {rounds})")
        add("--warmup", type=int, default=warmup, help=f"untimed warm-up rounds (default {warmup})")
        add("--threads", type=int, default=1, help="torch.set_num_threads (default 1: less noise)")
        add("--device", default="cpu", help="torch device (default cpu)")
        add("--quick", action="store_true", help=f"{quick_rounds} rounds, {quick_warmup} warm-up: a smoke test")
        add("--save", action="store_true", help=f"also write benchmarks/results/{name}.json")
        self.args: argparse.Namespace | None = None

    def parse_args(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        """Parse the command line (``self.parser`` may have gained arguments) and set threads."""
        args = self.parser.parse_args(argv)
        if args.quick:
            args.rounds, args.warmup = self.quick_rounds, self.quick_warmup
        if args.rounds < 1 or args.warmup < 0 or args.threads < 1:
            self.parser.error(
                f"need --rounds >= 1, --warmup >= 0, --threads >= 1; got {args.rounds}, {args.warmup}, {args.threads}"
            )
        torch.set_num_threads(args.threads)
        self.args = args
        return args

    @property
    def sync(self) -> Callable[[], None] | None:
        device = self._parsed().device
        return torch.cuda.synchronize if device.startswith("cuda") else None

    def compare(
        self,
        variants: Mapping[str, Variant],
        *,
        baseline: str,
        rounds: int | None = None,
        warmup: int | None = None,
    ) -> dict[str, Any]:
        """:func:`compare` with ``--rounds``/``--warmup`` and the device's sync as defaults."""
        args = self._parsed()
        return compare(
            variants,
            baseline=baseline,
            rounds=args.rounds if rounds is None else rounds,
            warmup=args.warmup if warmup is None else warmup,
            sync=self.sync,
        )

    def emit(self, result: Mapping[str, Any]) -> dict[str, Any]:
        """Print ``result`` with the settings and machine info as one JSON object (indent 2).

        With ``--save`` also write it to ``benchmarks/results/<name>.json``. Returns the
        object printed.
        """
        args = self._parsed()
        payload = {
            "benchmark": self.name,
            **result,
            "settings": {k: v for k, v in vars(args).items() if k != "save"},
            "machine": machine_info(args.device),
        }
        text = json.dumps(payload, indent=2)
        print(text, flush=True)
        if args.save:
            RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            (RESULTS_DIR / f"{self.name}.json").write_text(text + "\n", encoding="utf-8")
        return payload

    def _parsed(self) -> argparse.Namespace:
        if self.args is None:
            raise RuntimeError(f"Benchmark {self.name!r}: call parse_args() first")
        return self.args
