"""Step-time overhead of the spikeguard callbacks and of their peers, in real Lightning fits.

Model: ``CausalLMModule`` with GPT-2, 4 layers, n_embd 128, 4 heads, n_positions 128,
byte vocabulary (256), dropout off; ``TextDataModule`` byte batches (8, 128) of the
embedded pydoc corpus; AdamW (the module's defaults); CPU, one thread (``--threads``).

Variants, each its own model (same initial weights), data module and ``pl.Trainer``
(``log_every_n_steps=50``, no progress bar, no checkpointing, no validation; a
CSVLogger, except the W&B peer):

=============================  ============================================================
variant                        callbacks or code added to the bare run
=============================  ============================================================
``bare``                       none
``bare_2``                     none: a second, independent bare fit (A/A check)
``spikeguard/monitor``         ``SpikeGuard()`` (action "none")
``spikeguard/skip``            ``SpikeGuard(action="skip")``
``perturb/gaussian``           ``Perturb(forward={"**": Gaussian(1e-3, relative=True)})``
``perturb/e4m3``               ``Perturb(forward={"**": Rounding("e4m3")})``
``peer/wandb_watch``           WandbLogger (offline) and ``wandb.watch(model, log="gradients",
                               log_freq=50)`` before ``fit``
``peer/lightning_grad_norm``   ``self.log_dict(grad_norm(self.model, norm_type=2))`` in
                               ``on_before_optimizer_step`` (Lightning's documented recipe)
``peer/zclip``                 the zclip package's ``ZClipLightningCallback()`` (defaults)
=============================  ============================================================

``"**"`` is every operator of the chain (embeddings, the 4 blocks, ln_f, lm_head); a
plain ``"*"`` does not cross dots and would match ``lm_head`` alone.

Method. Every variant's ``trainer.fit`` runs once, for the whole benchmark, in a thread
of its own, and the fits take turns: a callback (last in the list) parks its fit after
the steps it was given (at ``on_train_batch_end``) until the main thread hands it the
baton again, so only one fit ever runs. A turn of ``--steps-per-turn`` K steps is one
sample of ``_common.compare`` (interleaved rounds, order rotated each round, the bare fit
also timed as an A/A copy). A turn covers K whole loop iterations: data loading,
forward, backward, optimizer, every hook, Lightning's logging between steps, and the
periodic work of the logging steps (every 50th: SpikeGuard's read-out, W&B's gradient
histograms). Before the timed rounds, ``--warmup`` rounds of ``--warmup-steps`` steps
(the first one is each fit's cold start). Why not a fresh Trainer per turn: a fit's
start-up (and a W&B run's) costs seconds, and it would reset the optimizer state, the
detector's window and the loggers, which no real run does.

Three views of the same turns, each over the bare fit's:

- ``cpu_ratios`` (the goals use these): the CPU time of this process (all its threads,
  ``time.process_time``) summed over the timed turns, per step: a mean step, periodic
  work included at its real rate. On a machine other jobs share, CPU time barely moves
  when the fit is descheduled; wall time does. Not counted: W&B's separate service
  process (it writes the histograms), which flatters that peer. ``cpu_ratios_paired``:
  quartiles of the per-round ratios (a variant's turn over the bare fit's in that round).
- ``wall_ratios``: the harness's median wall time per turn (``timing``). Equal to the CPU
  view on a quiet machine; ``noise.aa_ratio`` and ``baseline_iqr_rel`` say how quiet.
- ``step_cpu_ratios``: the median over single steps of the fit thread's CPU time from
  ``on_train_batch_start`` to ``on_train_batch_end``, leaving out the first
  ``STEADY_SKIP`` steps of each turn (another fit has just used the caches): the cost
  in the step itself, without Lightning's logging between steps or the periodic work.

A/A: ``bare_2`` is a second, independent bare fit; its ratio in each view is that view's
resolution. One process, one torch thread, malloc in a steady state (:func:`steady_malloc`).

Goals (CPU view): SpikeGuard monitor <= 1.03, skip <= 1.05, Perturb Gaussian <= 1.05,
e4m3 <= 1.15, and each spikeguard variant cheaper than each peer. ``--profile`` adds a
cProfile of one turn of each variant that misses its goal, against one of bare.
"""

from __future__ import annotations

import contextlib
import cProfile
import functools
import logging
import os
import pstats
import statistics
import sys
import tempfile
import threading
import time
import warnings
from typing import Any

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.loggers import CSVLogger, WandbLogger  # noqa: E402
from pytorch_lightning.utilities import grad_norm  # noqa: E402

from spikeguard.callbacks import Perturb, SpikeGuard  # noqa: E402
from spikeguard.perturb import Gaussian, Rounding  # noqa: E402
from spikeguard.recipes.data import TextDataModule  # noqa: E402
from spikeguard.recipes.modules import CausalLMModule  # noqa: E402

from _common import Benchmark, goal  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

MODEL_CONFIG = {
    "model_type": "gpt2", "n_layer": 4, "n_embd": 128, "n_head": 4, "n_positions": 128,
    "bos_token_id": 0, "eos_token_id": 0, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
}
VOCAB_SIZE = 256
BATCH_SIZE, SEQ_LEN = 8, 128
LOG_EVERY = 50  # Trainer(log_every_n_steps=...), and wandb.watch's log_freq
STEADY_SKIP = 2  # steps left out at the start of each turn in step_cpu_ratios

GOALS = {
    "spikeguard/monitor": 1.03,
    "spikeguard/skip": 1.05,
    "perturb/gaussian": 1.05,
    "perturb/e4m3": 1.15,
}
SPIKEGUARD = ("spikeguard/monitor", "spikeguard/skip", "perturb/gaussian", "perturb/e4m3")
PEERS = ("peer/wandb_watch", "peer/lightning_grad_norm", "peer/zclip")


class GradNormModule(CausalLMModule):
    """The module with Lightning's documented gradient-norm logging (every step)."""

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.log_dict(grad_norm(self.model, norm_type=2))


def zclip_callback() -> pl.Callback:
    """The zclip package's Lightning callback, made acceptable to a ``pytorch_lightning`` Trainer.

    ``ZClipLightningCallback`` derives from ``lightning.Callback``; ``pytorch_lightning``'s
    Trainer accepts only its own ``Callback`` class (the same interface). Adding that base
    changes nothing else: its ``on_before_optimizer_step`` calls ``ZClip.step(pl_module)``.
    """
    from zclip import ZClipLightningCallback

    cls = type("ZClipLightningCallback", (ZClipLightningCallback, pl.Callback), {})
    return cls()  # defaults: zscore mode, alpha 0.97, z_thresh 2.5, max_grad_norm 1.0


# -- one fit per thread, taking turns ---------------------------------------------------


def steady_malloc() -> bool:
    """Put glibc's malloc in one steady state for every fit: one arena, no trimming, no mmap.

    With glibc's defaults the page faults of a step (re-touching memory that ``free``
    gave back to the system) depended on the allocation history of the whole process:
    0 to 7,000 faults and up to 10 ms of system time per 90 ms step, from run to run and
    from variant to variant, which swamped the differences measured here. Each thread
    also had an arena of its own, so a fit in a worker thread faulted more than the same
    fit in the main thread (per-operator statistics measured 1.11x a bare step against
    1.06x). One arena (``M_ARENA_MAX``), freed memory kept (``M_TRIM_THRESHOLD``) and
    the heap used for blocks up to 32 MiB (``M_MMAP_THRESHOLD``) leave only the compute,
    as a caching allocator (jemalloc, tcmalloc, CUDA's) would. Returns False where this
    is not glibc (then the numbers carry that noise). Call before any thread starts.
    """
    import ctypes
    import ctypes.util

    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8  # <malloc.h>
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        settings = ((m_arena_max, 1), (m_trim_threshold, 1 << 30), (m_mmap_threshold, 32 << 20))
        return all(libc.mallopt(option, value) == 1 for option, value in settings)
    except (OSError, AttributeError):
        return False


class _Baton(pl.Callback):
    """Parks the fit (last callback of the list) whenever it has run the steps it was given."""

    def __init__(self) -> None:
        self.go = threading.Semaphore(0)
        self.parked = threading.Semaphore(0)
        self.stop = False
        self.num_steps = 0
        self.target = 0  # park once num_steps reaches it
        self.profile: cProfile.Profile | None = None  # set by the main thread while parked
        self._profiling: cProfile.Profile | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._park(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.num_steps += 1
        if self.num_steps >= self.target:
            self._park(trainer)

    def _park(self, trainer: pl.Trainer) -> None:
        if self._profiling is not None:  # cProfile sees only its own thread: run it here
            self._profiling.disable()
            self._profiling = None
        self.parked.release()
        self.go.acquire()
        if self.stop:
            trainer.should_stop = True
        elif self.profile is not None:
            self._profiling, self.profile = self.profile, None
            self._profiling.enable()


class _StepClock(pl.Callback):
    """Thread CPU seconds from ``on_train_batch_start`` to ``on_train_batch_end`` of each step, per turn."""

    def __init__(self) -> None:
        self.recording = False
        self.turns: list[list[float]] = []
        self._start = 0.0

    def new_turn(self) -> None:
        if self.recording:
            self.turns.append([])

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.thread_time()  # the fit's own thread: other jobs' load does not count

    def on_train_batch_end(self, *args: Any) -> None:
        if self.recording:
            self.turns[-1].append(time.thread_time() - self._start)

    def steady(self) -> list[float]:
        return [dt for turn in self.turns for dt in turn[STEADY_SKIP:]]


class Lane:
    """One variant's ``trainer.fit`` in its own thread; :meth:`advance` runs one turn of it."""

    def __init__(
        self,
        name: str,
        root: str,
        callbacks: list[pl.Callback],
        module_cls: type[CausalLMModule] = CausalLMModule,
        wandb_watch: bool = False,
    ):
        self.name = name
        self.module = module_cls(config=dict(MODEL_CONFIG), vocab_size=VOCAB_SIZE)
        self.data = TextDataModule("pydoc", batch_size=BATCH_SIZE, seq_len=SEQ_LEN)
        directory = os.path.join(root, name.replace("/", "_"))
        if wandb_watch:
            import wandb

            logger = WandbLogger(project="spikeguard-overhead", save_dir=directory, offline=True)
            _ = logger.experiment  # the run starts here, in the main thread, as before any fit
            wandb.watch(self.module, log="gradients", log_freq=LOG_EVERY)
        else:
            logger = CSVLogger(directory)
        self.logger = logger
        self.callbacks = callbacks
        self.clock = _StepClock()
        self.baton = _Baton()
        self.trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_steps=10**9, logger=logger,
            callbacks=[*callbacks, self.clock, self.baton],
            log_every_n_steps=LOG_EVERY, enable_progress_bar=False, enable_checkpointing=False,
            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
            default_root_dir=directory,
        )
        self.cpu_turns: list[float] = []  # CPU seconds of this process per timed turn
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._fit, name=f"fit:{name}", daemon=True)

    def _fit(self) -> None:
        try:
            self.trainer.fit(self.module, datamodule=self.data)
        except BaseException as err:  # reported in the main thread
            self.error = err
        finally:
            self.baton.parked.release()  # never leave the main thread waiting

    def start(self) -> None:
        """Run the fit's set-up up to ``on_train_start``, where it parks."""
        self._thread.start()
        self._wait()

    def advance(self, steps: int) -> None:
        """Run the next ``steps`` training steps (the caller waits)."""
        self.clock.new_turn()
        self.baton.target += steps
        cpu = time.process_time()
        self.baton.go.release()
        self._wait()
        if self.clock.recording:
            self.cpu_turns.append(time.process_time() - cpu)

    def finish(self) -> None:
        self.baton.stop = True
        self.baton.go.release()
        self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"variant {self.name!r}: the fit failed while finishing") from self.error

    def _wait(self) -> None:
        self.baton.parked.acquire()
        if self.error is not None:
            raise RuntimeError(f"variant {self.name!r}: the fit failed") from self.error


def make_lanes(root: str) -> dict[str, Lane]:
    """Every variant's lane, in the order of the module docstring's table."""
    gaussian = Perturb(forward={"**": Gaussian(1e-3, relative=True)})  # "**": every operator, at any depth
    e4m3 = Perturb(forward={"**": Rounding("e4m3")})
    return {
        "bare": Lane("bare", root, []),
        "bare_2": Lane("bare_2", root, []),
        "spikeguard/monitor": Lane("spikeguard/monitor", root, [SpikeGuard()]),
        "spikeguard/skip": Lane("spikeguard/skip", root, [SpikeGuard(action="skip")]),
        "perturb/gaussian": Lane("perturb/gaussian", root, [gaussian]),
        "perturb/e4m3": Lane("perturb/e4m3", root, [e4m3]),
        "peer/wandb_watch": Lane("peer/wandb_watch", root, [], wandb_watch=True),
        "peer/lightning_grad_norm": Lane("peer/lightning_grad_norm", root, [], module_cls=GradNormModule),
        "peer/zclip": Lane("peer/zclip", root, [zclip_callback()]),
    }


# -- profiling a miss ---------------------------------------------------------------------


def profile_turn(lane: Lane, steps: int) -> tuple[float, list[dict[str, Any]]]:
    """cProfile of ``steps`` steps of ``lane``, run in its fit's thread: (total own seconds, rows)."""
    profile = cProfile.Profile()
    lane.baton.profile = profile
    lane.advance(steps)
    rows = [
        {"function": f"{_short(file)}:{line}({func})", "calls": ncalls, "own_s": own, "cum_s": cum}
        for (file, line, func), (_, ncalls, own, cum, _) in pstats.Stats(profile).stats.items()
    ]
    return sum(r["own_s"] for r in rows), rows


def _short(file: str) -> str:
    for marker in ("site-packages/", "/spikeguard/"):
        if marker in file:
            return ("spikeguard/" if marker == "/spikeguard/" else "") + file.split(marker, 1)[1]
    return file


def profile_misses(lanes: dict[str, Lane], names: list[str], steps: int, top: int) -> dict[str, Any]:
    """Per variant, one profiled turn against one of bare: where the extra time goes.

    cProfile slows Python code more than torch kernels, so absolute numbers are inflated;
    shares of the profiled step are comparable. ``own_time_growth``: functions whose own
    time per step grew most over bare's. ``callback_code``: the cumulative time per step
    of the functions of spikeguard, zclip and wandb.
    """
    base_total, base_rows = profile_turn(lanes["bare"], steps)
    base_own = {r["function"]: r["own_s"] for r in base_rows}
    out: dict[str, Any] = {}
    for name in names:
        total, rows = profile_turn(lanes[name], steps)
        grown = sorted(rows, key=lambda r: r["own_s"] - base_own.get(r["function"], 0.0), reverse=True)
        ours = [r for r in rows if r["function"].startswith(("spikeguard/", "zclip/", "wandb/"))
                and "recipes/" not in r["function"]]  # the LightningModule is the workload
        ours.sort(key=lambda r: r["cum_s"], reverse=True)
        out[name] = {
            "profiled_step_ms": round(1e3 * total / steps, 2),
            "bare_profiled_step_ms": round(1e3 * base_total / steps, 2),
            "own_time_growth": [
                {"function": r["function"], "calls_per_step": round(r["calls"] / steps, 2),
                 "extra_ms_per_step": round(1e3 * (r["own_s"] - base_own.get(r["function"], 0.0)) / steps, 3)}
                for r in grown[:top]
            ],
            "callback_code": [
                {"function": r["function"], "calls_per_step": round(r["calls"] / steps, 2),
                 "cum_ms_per_step": round(1e3 * r["cum_s"] / steps, 3),
                 "share_of_profiled_step": round(r["cum_s"] / total, 4)}
                for r in ours[:top]
            ],
        }
    return out


# -- main ---------------------------------------------------------------------------------


def extras(lanes: dict[str, Lane]) -> dict[str, Any]:
    """What the variants did, so that a cheap step is not mistaken for a skipped one."""
    out: dict[str, Any] = {name: {"steps": lane.baton.num_steps} for name, lane in lanes.items()}
    for name in ("spikeguard/monitor", "spikeguard/skip"):
        guard = lanes[name].callbacks[0]
        out[name].update(spikes=len(guard.events), skipped_steps=guard.num_skipped)
    zclip = lanes["peer/zclip"].callbacks[0].zclip
    out["peer/zclip"].update(initialized=zclip.initialized, ema_mean_grad_norm=zclip.mean)
    return out


def main() -> None:
    bench = Benchmark("overhead", __doc__, rounds=15, warmup=1, quick_rounds=2, quick_warmup=1)
    add = bench.parser.add_argument
    add("--steps-per-turn", type=int, default=10, help="training steps per turn, one timed sample (default 10; --quick: 5)")
    add("--warmup-steps", type=int, default=10, help="steps per variant in each warm-up round (default 10; --quick: 5)")
    add("--profile", action="store_true", help="profile one turn of each variant that misses its goal, and of bare")
    add("--profile-steps", type=int, default=30, help="steps per profiled turn (default 30)")
    add("--profile-top", type=int, default=12, help="rows per list in a profile (default 12)")
    args = bench.parse_args()
    if args.device != "cpu":
        bench.parser.error(f"this benchmark runs on the CPU (its goals are set there), got --device {args.device}")
    if args.quick:
        args.steps_per_turn, args.warmup_steps = 5, 5
    if args.steps_per_turn <= STEADY_SKIP or min(args.warmup_steps, args.profile_steps, args.profile_top) < 1:
        bench.parser.error(
            f"need --steps-per-turn > {STEADY_SKIP} and --warmup-steps, --profile-steps, --profile-top >= 1; got "
            f"{args.steps_per_turn}, {args.warmup_steps}, {args.profile_steps}, {args.profile_top}"
        )
    steps = args.steps_per_turn

    warnings.filterwarnings("ignore", module=r"(pytorch_)?lightning.*")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    steady = steady_malloc()

    # Libraries print; stdout must hold only the JSON.
    with tempfile.TemporaryDirectory(prefix="spikeguard-overhead-") as root, contextlib.redirect_stdout(sys.stderr):
        lanes = make_lanes(root)
        try:
            for lane in lanes.values():
                lane.start()
            cold: dict[str, float] = {}  # the first warm-up round: each fit's first steps
            for r in range(args.warmup):
                for name, lane in lanes.items():
                    start = time.perf_counter()
                    lane.advance(args.warmup_steps)
                    cold.setdefault(name, (time.perf_counter() - start) / args.warmup_steps)
            for lane in lanes.values():
                lane.clock.recording = True
            timing = bench.compare(
                {name: functools.partial(lane.advance, steps) for name, lane in lanes.items()},
                baseline="bare", warmup=0,
            )
            for lane in lanes.values():
                lane.clock.recording = False
            did = extras(lanes)
            timing = per_step(timing, steps)
            cpu, _ = cpu_view(lanes, steps)
            misses = [name for name, limit in GOALS.items() if cpu[name] > limit]
            profiles = profile_misses(lanes, misses, args.profile_steps, args.profile_top) if args.profile and misses else None
        finally:
            for lane in lanes.values():
                with contextlib.suppress(Exception):
                    lane.finish()
            with contextlib.suppress(Exception):
                lanes["peer/wandb_watch"].logger.experiment.finish()

    cpu, cpu_paired = cpu_view(lanes, steps)
    step_cpu = {name: statistics.median(lane.clock.steady()) for name, lane in lanes.items()}
    step_cpu = {name: round(c / step_cpu["bare"], 4) for name, c in step_cpu.items()}
    wall = {name: v["ratio"] for name, v in timing["variants"].items()}
    result: dict[str, Any] = {
        "goals": {
            name: goal(cpu[name], limit, f"{name}: mean CPU time per step / bare's <= {limit}")
            for name, limit in GOALS.items()
        },
        "cheaper_than_peers": {
            name: {**{peer: cpu[name] < cpu[peer] for peer in PEERS}, "all": all(cpu[name] < cpu[p] for p in PEERS)}
            for name in SPIKEGUARD
        },
        "cpu_ratios": cpu,
        "cpu_ratios_paired": cpu_paired,
        "wall_ratios": wall,
        "step_cpu_ratios": step_cpu,
        "noise": {
            "bare_2_cpu_ratio": cpu["bare_2"],
            "bare_2_wall_ratio": wall["bare_2"],
            "bare_2_step_cpu_ratio": step_cpu["bare_2"],
            **timing["noise"],
        },
        "bare_step_cpu_ms": round(1e3 * sum(lanes["bare"].cpu_turns) / (steps * len(lanes["bare"].cpu_turns)), 3),
        "bare_step_wall_ms": round(1e3 * timing["variants"]["bare"]["median_s"], 3),
        "cold_ms_per_step": {name: round(1e3 * s, 3) for name, s in cold.items()},
        "variants_did": did,
        "malloc_steady": steady,
        "timing": timing,
    }
    if profiles is not None:
        result["profiles"] = profiles
    bench.emit(result)


def cpu_view(lanes: dict[str, Lane], steps: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Mean CPU time per step over the bare fit's, and the quartiles of the per-round ratios.

    The bare fit ran two turns a round (the harness's A/A copy); a round's bare time is
    their mean.
    """
    base = lanes["bare"].cpu_turns
    rounds = len(base) // 2
    base_rounds = [(base[2 * r] + base[2 * r + 1]) / 2 for r in range(rounds)]
    base_mean = sum(base) / len(base)
    ratios, paired = {}, {}
    for name, lane in lanes.items():
        turns = base_rounds if name == "bare" else lane.cpu_turns
        ratios[name] = round(sum(turns) / len(turns) / base_mean, 4)
        per_round = [c / b for c, b in zip(turns, base_rounds)]
        quartiles = statistics.quantiles(per_round, n=4, method="inclusive") if len(per_round) > 1 else per_round * 3
        paired[name] = [round(q, 4) for q in quartiles]
    return ratios, paired


def per_step(timing: dict[str, Any], steps: int) -> dict[str, Any]:
    """compare's per-turn seconds as per-step seconds (ratios unchanged)."""
    out = {**timing, "steps_per_sample": steps, "variants": {}}
    for name, v in timing["variants"].items():
        v = dict(v)
        for key in ("median_s", "q1_s", "q3_s", "min_s", "first_s"):
            v[key] = round(v[key] / steps, 6)
        out["variants"][name] = v
    return out


if __name__ == "__main__":
    main()
