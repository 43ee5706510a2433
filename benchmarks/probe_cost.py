"""Cost of the per-step statistics and of one amplification probe, against a bare training step.

Model: GPT-2 with 4 layers, n_embd 128, 4 heads, byte vocabulary (256), dropout off,
in train mode; batches (8, 128) of bytes of the embedded pydoc corpus; AdamW, lr 1e-3.
A training step is forward with labels, backward, ``optimizer.step()``,
``zero_grad(set_to_none=True)``.

Statistics (goal: <= 1.03x a bare step): StepStatistics attached, ``reset`` before the
forward, ``collect`` after the backward, ``to_host`` every ``--log-every`` steps as a
logger would; and the same model after ``detach`` (should be 1.0 within noise).

Probe (goal: one warm probe <= 4 step equivalents): ``AmplificationProbe.run`` with
relative Gaussian noise 1e-3 forward on transformer.h.1 and backward on
transformer.h.2, timed interleaved with bare steps (5 consecutive steps per sample);
its median over the step's median.
Options: ``default`` (all configurations, linearize, one power-iteration step),
``no_linearize`` and ``observed_only`` (configs=("both",), linearize=False). The first
call of each is the cold probe (``first_power_iterations`` steps, first-use costs).
Per-phase times of the default probe come from timing its pass methods on the instance
(probe.py is unchanged); ``other`` is the rest (norms, host syncs, bookkeeping).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from spikeguard.measure.probe import AmplificationProbe
from spikeguard.measure.stats import StepStatistics
from spikeguard.operators import OperatorChain
from spikeguard.perturb import Gaussian, Injector
from spikeguard.recipes.data import ByteTokenizer, load_text, tokenize

from _common import Benchmark, goal  # benchmarks/ is on sys.path when run as a script

CONFIG = dict(
    n_layer=4, n_embd=128, n_head=4, vocab_size=256, n_positions=128, bos_token_id=0, eos_token_id=0,
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
)
BATCH_SIZE, SEQ_LEN = 8, 128
LR = 1e-3

#: In the probe comparison a bare-step sample is this many consecutive steps, so that its
#: median is a steady-state step rather than the first step after a probe (cold caches).
STEPS_PER_SAMPLE = 5

STATS_GOAL = 1.03
PROBE_GOAL = 4.0

#: Probe method (dotted: ``passes.`` are the decoupled passes) -> phase name. None of
#: these calls another, so their times add up.
PHASES = {
    "passes.graph_forward": "graph_forwards",
    "passes.backward": "chained_backwards",
    "_smoothness": "smoothness_H",
    "_power_gains": "power_iteration_L",
    "_power_param_gains": "power_iteration_M",
    "_measure_loss_curvature": "loss_curvature_L_h",
    "_linearize": "linearized_prediction",
}

PROBE_OPTIONS = {
    "default": {},
    "no_linearize": {"linearize": False},
    "observed_only": {"configs": ("both",), "linearize": False},
}


def loss_fn(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss


def corpus_blocks(device: torch.device) -> torch.Tensor:
    """(K, T) non-overlapping byte blocks of the pydoc corpus."""
    ids = tokenize(load_text("pydoc"), ByteTokenizer())  # (N,)
    k = ids.numel() // SEQ_LEN
    return ids[: k * SEQ_LEN].view(k, SEQ_LEN).to(device)


def build(device: torch.device) -> tuple[GPT2LMHeadModel, torch.optim.Optimizer]:
    torch.manual_seed(0)  # every model starts from the same weights
    model = GPT2LMHeadModel(GPT2Config(**CONFIG)).to(device).train()
    return model, torch.optim.AdamW(model.parameters(), lr=LR)


class Trainer:
    """One model, its optimizer and its own walk through the corpus; ``step()`` trains once."""

    def __init__(self, blocks: torch.Tensor, device: torch.device, stats: bool = False, log_every: int = 50):
        self.model, self.optimizer = build(device)
        self.blocks = blocks
        self.position = 0
        self.steps = 0
        self.log_every = log_every
        self.stats = StepStatistics(OperatorChain.from_model(self.model), self.model) if stats else None
        self.logged: dict[str, Any] | None = None

    def next_batch(self) -> torch.Tensor:
        if self.position + BATCH_SIZE > len(self.blocks):
            self.position = 0
        batch = self.blocks[self.position : self.position + BATCH_SIZE]  # (B, T)
        self.position += BATCH_SIZE
        return batch

    def step(self) -> None:
        batch = self.next_batch()
        watching = self.stats is not None and self.stats.attached
        if watching:
            self.stats.reset()
        loss_fn(self.model, batch).backward()
        if watching:
            collected = self.stats.collect()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        if watching and self.steps % self.log_every == 0:
            self.logged = collected.to_host()


def statistics_overhead(bench: Benchmark, blocks: torch.Tensor, device: torch.device, log_every: int):
    bare = Trainer(blocks, device)
    attached = Trainer(blocks, device, stats=True, log_every=log_every)
    attached.stats.attach()
    detached = Trainer(blocks, device, stats=True, log_every=log_every)
    detached.stats.attach()
    detached.step()  # hooks fire once, then go
    detached.stats.detach()
    timing = bench.compare(
        {"bare_step": bare.step, "stats_attached": attached.step, "stats_detached": detached.step},
        baseline="bare_step",
    )
    return timing, attached


class PhaseTimer:
    """Wraps the probe's pass methods on one instance; records seconds per phase per run."""

    def __init__(self, probe: AmplificationProbe):
        self.runs: list[dict[str, float]] = []  # per run: seconds per phase, "other", "total"
        self.calls: list[dict[str, int]] = []  # per run: calls per phase
        self._current: dict[str, float] = {}
        self._calls: dict[str, int] = {}
        for method, phase in PHASES.items():
            owner, name = probe, method
            if "." in method:
                attr, name = method.split(".")
                owner = getattr(probe, attr)
            setattr(owner, name, self._wrap(getattr(owner, name), phase))
        run = probe.run

        @functools.wraps(run)
        def timed_run(*args, **kwargs):
            self._current = dict.fromkeys(PHASES.values(), 0.0)
            self._calls = dict.fromkeys(PHASES.values(), 0)
            start = time.perf_counter()
            result = run(*args, **kwargs)
            total = time.perf_counter() - start
            self._current["other"] = total - sum(self._current.values())
            self._current["total"] = total
            self.runs.append(self._current)
            self.calls.append(self._calls)
            return result

        probe.run = timed_run

    def _wrap(self, method: Callable, phase: str) -> Callable:
        @functools.wraps(method)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self._current[phase] += time.perf_counter() - start
                self._calls[phase] += 1

        return timed

    def report(self, runs: slice, step_s: float) -> dict[str, Any]:
        """Per phase over the runs ``runs`` selects: median seconds, step equivalents, share, calls."""
        times, calls = self.runs[runs], self.calls[runs]
        total = statistics.median(r["total"] for r in times)
        out = {}
        for phase in [*PHASES.values(), "other"]:
            s = statistics.median(r[phase] for r in times)
            out[phase] = {
                "seconds": round(s, 5),
                "step_equivalents": round(s / step_s, 3),
                "share": round(s / total, 3),
                "calls": calls[-1].get(phase, 1),
            }
        return out


def probe_cost(bench: Benchmark, blocks: torch.Tensor, device: torch.device, rounds: int):
    trainer = Trainer(blocks, device)
    model = trainer.model
    chain = OperatorChain.from_model(model)
    probe_batch = blocks[-BATCH_SIZE:]  # (B, T), fixed across probes
    for _ in range(bench.args.warmup):
        trainer.step()

    probes, results = {}, {}
    for name, options in PROBE_OPTIONS.items():
        injector = Injector(
            chain,
            forward={"transformer.h.1": Gaussian(1e-3, relative=True)},
            backward={"transformer.h.2": Gaussian(1e-3, relative=True)},
        )
        probes[name] = AmplificationProbe(model, chain, loss_fn, injector, **options)
    phases = PhaseTimer(probes["default"])

    def runner(name: str) -> Callable[[], None]:
        def run() -> None:
            results[name] = probes[name].run(probe_batch, step=trainer.steps)

        return run

    # One warm-up call per variant: the probes' first call is the cold probe.
    timing = bench.compare(
        {"bare_step": (trainer.step, STEPS_PER_SAMPLE), **{f"probe/{name}": runner(name) for name in probes}},
        baseline="bare_step",
        rounds=rounds,
        warmup=1,
    )
    step_s = timing["variants"]["bare_step"]["median_s"]
    breakdown = {
        "warm": phases.report(slice(1, None), step_s),
        "cold": phases.report(slice(0, 1), step_s),
    }
    notes = sorted({note for r in results.values() for note in r.notes})
    return timing, breakdown, notes


def main() -> None:
    bench = Benchmark("probe_cost", __doc__, rounds=60, warmup=3, quick_rounds=3, quick_warmup=1)
    add = bench.parser.add_argument
    add("--probe-rounds", type=int, default=10, help="timed rounds of the probe comparison (default 10; --quick: 1)")
    add("--log-every", type=int, default=50, help="to_host() every this many steps (default 50)")
    args = bench.parse_args()
    if args.probe_rounds < 1 or args.log_every < 1:
        bench.parser.error(f"need --probe-rounds >= 1 and --log-every >= 1, got {args.probe_rounds}, {args.log_every}")
    if args.quick:
        args.probe_rounds = 1
    device = torch.device(args.device)
    blocks = corpus_blocks(device)

    stats_timing, attached = statistics_overhead(bench, blocks, device, args.log_every)
    probe_timing, breakdown, notes = probe_cost(bench, blocks, device, args.probe_rounds)

    stats_ratio = stats_timing["variants"]["stats_attached"]["ratio"]
    step_s = probe_timing["variants"]["bare_step"]["median_s"]
    probes = {}
    for name in PROBE_OPTIONS:
        v = probe_timing["variants"][f"probe/{name}"]
        probes[name] = {
            "options": {k: list(o) if isinstance(o, tuple) else o for k, o in PROBE_OPTIONS[name].items()},
            "warm_s": v["median_s"],
            "warm_step_equivalents": v["ratio"],
            "warm_step_equivalents_paired": v["ratio_paired"],
            "cold_s": v["first_s"],
            "cold_step_equivalents": round(v["first_s"] / step_s, 3),
        }
    bench.emit({
        "goals": {
            "statistics_overhead": goal(stats_ratio, STATS_GOAL, f"stats-attached step / bare step <= {STATS_GOAL}"),
            "probe_step_equivalents": goal(
                probes["default"]["warm_step_equivalents"], PROBE_GOAL,
                f"one warm default probe / bare step <= {PROBE_GOAL}",
            ),
        },
        "statistics": {
            "ratio_attached": stats_ratio,
            "ratio_detached": stats_timing["variants"]["stats_detached"]["ratio"],
            "log_every": args.log_every,
            "steps_logged": attached.steps // args.log_every,
            "timing": stats_timing,
        },
        "probe": {
            "bare_step_s": step_s,
            "options": probes,
            "phases": breakdown,
            "notes": notes,
            "timing": probe_timing,
        },
    })


if __name__ == "__main__":
    main()
