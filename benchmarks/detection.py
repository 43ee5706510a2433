"""Detection quality: SpikeGuard against the rules of Lightning SpikeDetection, ZClip and OLMo-core, on the same runs.

Runs: a byte-level GPT-2 (4 layers, n_embd 64, 4 heads, dropout off) trained from scratch
on the embedded pydoc corpus, batches (8, 64), AdamW (lr 1e-3 after a 20-step linear
warm-up, betas (0.9, 0.95), weight decay 0.1), gradients clipped to norm 1, a step with
non-finite gradients skipped (as torch.amp's GradScaler does). Each run gets bursts at
random known steps (one per 12-step slot from step 70, after every detector's warm-up;
at least 4 steps apart), of three kinds, each one step long:

- ``forward``: the final norm's output (``transformer.ln_f``) scaled by U(5, 20), an
  outlier activation that reaches the logits;
- ``backward``: relative Gaussian noise of size U(10, 50) on the gradient message of a
  random block (``transformer.h.i``), a gradient fault;
- ``bitflip``: one element of a random block's output gets bit 30 (the exponent's top
  bit of float32) flipped. Elements under 2 in size become ~1e38; the next LayerNorm
  absorbs it, so the loss and the gradients barely move (silent data corruption).

Every step records the loss, the global gradient norm and the per-operator statistics
(:class:`spikeguard.measure.StepStatistics`); the detectors then replay the same
recorded stream offline, each seeing what it would see online:

- ``lightning``: Lightning's ``SpikeDetection`` (``lightning_fabric/utilities/spike.py``,
  v2.6): mode "min", window 10, warmup 1, rtol 2, atol None, finite_only. A step is a
  spike when the loss is non-finite, or when it did not improve on the last accepted
  loss and ``|loss - running mean| >= 2 · running mean`` (loss >= 3x the mean of the
  last 10 accepted losses); spikes stay out of the mean.
- ``zclip``: the ``zclip`` package's own ``ZClip`` class (defaults: alpha 0.97,
  z_thresh 2.5, warmup_steps 25, mode "zscore", adaptive scaling), fed the recorded
  norm: the mean and variance of the first 25 norms start an EMA; a step is a spike
  when ``(g - mean) / (std + eps) > 2.5``; the EMA is then updated with the clip value.
- ``olmo_core``: ``SkipStepOptimizer.get_step_factor`` (allenai/OLMo-core,
  ``src/olmo_core/optim/skip_step_optimizer.py``): rolling interval 128, sigma factor
  6; no decision before max(20, 64) losses; a step is a spike when
  ``|x - mean| / std > 6`` (torch.std_mean over the previous up-to-128 values, spikes
  included) for the loss or for the gradient norm (a NaN z-score skips too).
- ``spikeguard``: :class:`spikeguard.detect.SpikeDetector` with the default
  :class:`~spikeguard.detect.DetectorConfig`, fed the loss and the StepStats; a step is
  flagged when it starts or extends an event (any kind, operator anomalies included).
  ``spikeguard_device_flag`` is the device flag alone (loss, gradient norm, non-finite:
  what clip/skip act on).

Scoring: consecutive flagged steps merge into one detection. A burst at step t is
detected when some step in [t, t+2] is flagged (delay: the first such step minus t); a
detection that covers no burst's [t, t+2] is a false positive, and one detection is
credited with one burst at most (the first it covers: a detector that flags every step
for a while does not detect every burst in that while). Precision = detections covering
a burst / detections; recall = detected bursts / bursts. Per burst type,
detections covering other types are left out and every false positive counts. The
headline scores the whole run; ``from_step_64`` leaves out detections that end before
step 64, where OLMo-core is still warming up and no burst has happened yet: up to the
first burst a run is bitwise the clean run, so whatever is flagged there is a natural
event of early training (gradient-norm spikes of 2-5x are common here), which the
ground truth cannot label.

Goals: SpikeGuard's F1 >= 0.95 and above each peer's, on the evaluation seeds. The
``tuning`` section scores candidate DetectorConfig changes on separate seeds.

Run ``python benchmarks/detection.py [--quick] [--seeds N] [--steps N] [--save]``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from spikeguard.detect import DetectorConfig, SpikeDetector
from spikeguard.measure.stats import StepStatistics, StepStats
from spikeguard.operators import OperatorChain
from spikeguard.perturb import BitFlip, Burst, Gaussian, Injector, Scale
from spikeguard.recipes.data import ByteTokenizer, load_text, tokenize

from _common import Benchmark  # benchmarks/ is on sys.path when run as a script

MODEL = dict(
    n_layer=4, n_embd=64, n_head=4, vocab_size=256, n_positions=64, bos_token_id=0, eos_token_id=0,
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
)
BATCH_SIZE, SEQ_LEN = 8, 64
LR, LR_WARMUP, CLIP = 1e-3, 20, 1.0

BURST_TYPES = ("forward", "backward", "bitflip")
TOLERANCE = 2  # a burst at t counts as detected when flagged within [t, t + TOLERANCE]
MIN_GAP = 12  # one burst per slot of this many steps...
JITTER = MIN_GAP - TOLERANCE - 1  # ...at a random offset below this: bursts >= 4 steps apart
LIVE_FROM = 64  # OLMo-core decides from its 64th value on: from here every detector is live
FIRST_BURST = 70  # bursts come after every detector's warm-up

EVAL_SEEDS, TUNE_SEEDS = (0, 1, 2, 3, 4, 5, 6, 7), (100, 101, 102)
STEPS, BURSTS_PER_RUN = 300, 9
QUICK = dict(eval_seeds=(0,), tune_seeds=(100,), steps=140, bursts=4)

#: DetectorConfig candidates scored on the tuning seeds (name -> overrides of the defaults).
CANDIDATES: dict[str, dict[str, Any]] = {
    "default": {},
    # Blind for as long as OLMo-core: no flags in early training, where every run here
    # has natural gradient spikes that no burst explains.
    "warmup64": {"warmup": 64},
}

F1_GOAL = 0.95


# -- the runs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BurstSpec:
    step: int
    kind: str  # one of BURST_TYPES
    operator: str
    size: float  # Scale factor, relative Gaussian scale, or the flipped bit


def burst_slots(steps: int) -> list[int]:
    """First steps of the MIN_GAP-step slots: from FIRST_BURST, each burst's [t, t+2] inside the run."""
    return list(range(FIRST_BURST, steps - TOLERANCE - JITTER + 1, MIN_GAP))


def plan_bursts(seed: int, steps: int, count: int, num_blocks: int) -> list[BurstSpec]:
    """``count`` bursts in distinct random slots, at a random offset in each, kinds in turn
    (shuffled), operators and sizes drawn from ``random.Random(seed)``."""
    rng = random.Random(seed)
    slots = burst_slots(steps)
    if len(slots) < count:
        raise ValueError(f"{steps} steps hold at most {len(slots)} bursts ({MIN_GAP}-step slots from step {FIRST_BURST})")
    starts = sorted(rng.sample(slots, count))
    kinds = [BURST_TYPES[i % len(BURST_TYPES)] for i in range(count)]
    rng.shuffle(kinds)
    out = []
    for slot, kind in zip(starts, kinds):
        step = slot + rng.randrange(JITTER)
        if kind == "forward":
            out.append(BurstSpec(step, kind, "transformer.ln_f", round(rng.uniform(5, 20), 2)))
        elif kind == "backward":
            out.append(BurstSpec(step, kind, f"transformer.h.{rng.randrange(num_blocks)}", round(rng.uniform(10, 50), 2)))
        else:
            out.append(BurstSpec(step, kind, f"transformer.h.{rng.randrange(num_blocks)}", 30))
    return out


def _injector(chain: OperatorChain, burst: BurstSpec, seed: int) -> Injector:
    when = Burst((burst.step,))
    if burst.kind == "forward":
        return Injector(chain, forward={burst.operator: (Scale(burst.size), when)}, seed=seed)
    if burst.kind == "backward":
        return Injector(chain, backward={burst.operator: (Gaussian(burst.size, relative=True), when)}, seed=seed)
    return Injector(chain, forward={burst.operator: (BitFlip(count=1, bits=[int(burst.size)]), when)}, seed=seed)


def record_run(seed: int, steps: int, bursts: Sequence[BurstSpec], tokens: torch.Tensor) -> dict[str, Any]:
    """Train with the bursts injected; per step the loss and StepStats as host numbers."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**MODEL)).train()
    chain = OperatorChain.from_model(model)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.95)
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: min(1.0, (t + 1) / LR_WARMUP))
    injectors = [_injector(chain, b, seed * 1000 + i).attach() for i, b in enumerate(bursts)]
    stats = StepStatistics(chain, model).attach()
    gen = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []
    applied: dict[int, float] = {}  # step -> max |δ| of the burst (a norm would overflow)
    try:
        for step in range(steps):
            for injector in injectors:
                injector.set_step(step)
            starts = torch.randint(0, len(tokens) - SEQ_LEN, (BATCH_SIZE,), generator=gen)
            batch = torch.stack([tokens[s : s + SEQ_LEN] for s in starts.tolist()])  # (B, T)
            stats.reset()
            with contextlib.ExitStack() as stack:
                # The δ itself, one activation each, only at its burst step.
                records = [stack.enter_context(inj.recording(deltas=b.step == step)) for inj, b in zip(injectors, bursts)]
                loss = model(input_ids=batch, labels=batch).loss
                loss.backward()
            host = stats.collect().to_host()
            host["loss"] = loss.item()
            rows.append(host)
            for record, burst in zip(records, bursts):
                if burst.step == step:
                    delta = record.delta(burst.operator, "backward" if burst.kind == "backward" else "forward")
                    applied[step] = float(delta.abs().max()) if delta is not None else 0.0
            if math.isfinite(host["grad_norm"]):
                torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
    finally:
        stats.detach()
        for injector in injectors:
            injector.detach()
    return {"seed": seed, "names": chain.names, "rows": rows, "bursts": list(bursts), "applied_amax": applied}


# -- the detectors, each replaying one recorded run ---------------------------------------


def lightning_flags(losses: Sequence[float], window: int = 10, warmup: int = 1, rtol: float | None = 2.0,
                    atol: float | None = None) -> list[bool]:
    """Lightning ``SpikeDetection`` (lightning_fabric/utilities/spike.py), mode "min"."""
    running: deque[float] = deque(maxlen=window)  # torchmetrics Running(MeanMetric, window)
    last = 0.0
    flags = []
    for batch_idx, loss in enumerate(losses):
        mean = sum(running) / len(running) if running else math.nan
        if not math.isfinite(loss):  # finite_only=True: a non-finite loss is a spike
            spike = True
        elif loss - last <= 0:  # _is_better: an improvement on the last value never is
            spike = False
        else:
            spike = (atol is None or abs(loss - mean) >= abs(atol)) and (rtol is None or abs(loss - mean) >= abs(rtol * mean))
        spike = batch_idx >= warmup and spike
        flags.append(spike)
        if not spike:  # the real callback raises on a spike instead; finite_only adds the rest
            running.append(loss)
            last = loss
    return flags


def zclip_flags(grad_norms: Sequence[float], **kwargs: Any) -> list[bool]:
    """The ``zclip`` package's ZClip, its statistics and decision unchanged, fed recorded norms."""
    from zclip import ZClip

    class Replay(ZClip):
        norm = 0.0
        spike = False

        def _compute_grad_norm(self, model: Any) -> float:
            return self.norm

        def _apply_clipping(self, model: Any, clip_val: float | None, total_norm: float) -> float:
            self.spike = clip_val is not None  # ZClip clips exactly when it sees a spike
            return total_norm

    zclip = Replay(max_grad_norm=None, **kwargs)  # max_grad_norm only clips; it does not detect
    flags = []
    for g in grad_norms:
        zclip.norm, zclip.spike = g, False
        zclip.step(None)
        flags.append(zclip.spike)
    return flags


def olmo_core_flags(losses: Sequence[float], grad_norms: Sequence[float], rolling: int = 128,
                    sigma: float = 6.0) -> list[bool]:
    """OLMo-core ``SkipStepOptimizer.get_step_factor``: 6σ over a rolling window of 128."""
    kept_losses: list[float] = []
    kept_norms: list[float] = []
    flags = []
    for loss, g in zip(losses, grad_norms):
        kept_losses.append(loss)
        kept_norms.append(g)
        del kept_losses[: max(0, len(kept_losses) - (rolling + 1))]
        del kept_norms[: max(0, len(kept_norms) - (rolling + 1))]
        if len(kept_losses) < max(20, rolling // 2):
            flags.append(False)
            continue
        z = []
        for values in (kept_losses, kept_norms):
            std, mean = torch.std_mean(torch.tensor(values[:-1], dtype=torch.float32))
            z.append(float((values[-1] - mean).abs() / std))
        flags.append(not all(v <= sigma for v in z))  # NaN compares False: a skip
    return flags


def _step_stats(names: Sequence[str], row: dict[str, Any]) -> StepStats:
    f = lambda key: torch.tensor(row[key], dtype=torch.float32)  # noqa: E731
    i = lambda key: torch.tensor(row[key], dtype=torch.int64)  # noqa: E731
    return StepStats(
        names=tuple(names), out_rms=f("out_rms"), out_amax=f("out_amax"), out_nonfinite=i("out_nonfinite"),
        msg_norm=f("msg_norm"), msg_nonfinite=i("msg_nonfinite"), param_grad_norm=f("param_grad_norm"),
        grad_norm=f("grad_norm"), grad_nonfinite=i("grad_nonfinite"),
    )


def spikeguard_flags(run: dict[str, Any], config: DetectorConfig | None = None) -> tuple[list[bool], list[bool], list[Any]]:
    """(event flags, device flags, events): a step is flagged when it starts or extends an event."""
    detector = SpikeDetector(run["names"], config or DetectorConfig())
    flags, device = [], []
    for step, row in enumerate(run["rows"]):
        device.append(bool(detector.update(step, torch.tensor(row["loss"]), _step_stats(run["names"], row))))
        new, _ = detector.poll()
        last = detector.events[-1] if detector.events else None
        flags.append(bool(new) or (last is not None and last.step + last.duration - 1 == step))
    return flags, device, detector.events


# -- scoring -----------------------------------------------------------------------------


def detections(flags: Sequence[bool]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive flagged steps, as (first, last)."""
    out: list[tuple[int, int]] = []
    for t, f in enumerate(flags):
        if f and out and out[-1][1] == t - 1:
            out[-1] = (out[-1][0], t)
        elif f:
            out.append((t, t))
    return out


def score_run(flags: Sequence[bool], bursts: Sequence[BurstSpec], start: int = 0) -> dict[str, Any]:
    """Per burst: detected and delay; per detection: the burst it is credited with (none:
    a false positive).

    A detection meets a burst at t when it overlaps [t, t + TOLERANCE]; it is credited with
    the first burst it meets only, so one long alarm cannot stand for several bursts
    (OLMo-core's rule flags every step for 128 steps once a NaN is in its window).
    Detections that end before ``start`` are left out (the live-steps variant).
    """
    runs = [r for r in detections(flags) if r[1] >= start]
    per_burst: list[dict[str, Any]] = [{"kind": b.kind, "detected": False, "delay": None} for b in bursts]
    credited = []
    for first, last in runs:
        met = [i for i, b in enumerate(bursts) if first <= b.step + TOLERANCE and last >= b.step]
        if met and not per_burst[met[0]]["detected"]:
            b = bursts[met[0]]
            per_burst[met[0]] = {"kind": b.kind, "detected": True, "delay": max(first, b.step) - b.step}
        credited.append([bursts[met[0]].kind] if met else [])
    return {"bursts": per_burst, "detections": credited,
            "false_positive_steps": [first for (first, _), kinds in zip(runs, credited) if not kinds]}


def _prf(tp_runs: int, runs: int, detected: int, bursts: int, delays: list[int]) -> dict[str, Any]:
    precision = tp_runs / runs if runs else 1.0
    recall = detected / bursts if bursts else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
        "mean_delay": round(statistics.fmean(delays), 3) if delays else None,
        "detected": detected, "bursts": bursts,
    }


def aggregate(scores: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Precision, recall, F1 and mean delay over runs, overall and per burst type."""
    bursts = [b for s in scores for b in s["bursts"]]
    covered = [c for s in scores for c in s["detections"]]
    fps = sum(1 for c in covered if not c)
    out = _prf(sum(1 for c in covered if c), len(covered), sum(b["detected"] for b in bursts), len(bursts),
               [b["delay"] for b in bursts if b["detected"]])
    out["false_positives"] = fps
    out["per_type"] = {}
    for kind in BURST_TYPES:
        mine = [b for b in bursts if b["kind"] == kind]
        tp = sum(1 for c in covered if kind in c)
        out["per_type"][kind] = _prf(tp, tp + fps, sum(b["detected"] for b in mine), len(mine),
                                     [b["delay"] for b in mine if b["detected"]])
    return out


def evaluate(runs: Sequence[dict[str, Any]], detectors: dict[str, Callable[[dict[str, Any]], list[bool]]]) -> dict[str, Any]:
    """Every detector on every run: the whole run (the headline), and from LIVE_FROM on."""
    results = {}
    for name, detect in detectors.items():
        flags = [detect(run) for run in runs]
        scores = [score_run(f, run["bursts"]) for f, run in zip(flags, runs)]
        results[name] = aggregate(scores)
        live = aggregate([score_run(f, run["bursts"], LIVE_FROM) for f, run in zip(flags, runs)])
        results[name][f"from_step_{LIVE_FROM}"] = {k: live[k] for k in ("precision", "recall", "f1", "false_positives")}
        results[name]["false_positive_steps"] = {run["seed"]: s["false_positive_steps"] for run, s in zip(runs, scores)}
        results[name]["missed"] = [
            {"seed": run["seed"], **asdict(b)}
            for run, s in zip(runs, scores) for b, r in zip(run["bursts"], s["bursts"]) if not r["detected"]
        ]
    return results


def peers() -> dict[str, Callable[[dict[str, Any]], list[bool]]]:
    def losses(run):
        return [r["loss"] for r in run["rows"]]

    def norms(run):
        return [r["grad_norm"] for r in run["rows"]]

    return {
        "lightning": lambda run: lightning_flags(losses(run)),
        "zclip": lambda run: zclip_flags(norms(run)),
        "olmo_core": lambda run: olmo_core_flags(losses(run), norms(run)),
    }


def spikeguard_detectors(config: DetectorConfig | None = None) -> dict[str, Callable[[dict[str, Any]], list[bool]]]:
    cache: dict[int, tuple[list[bool], list[bool], list[Any]]] = {}

    def replay(run):
        key = id(run)
        if key not in cache:
            cache[key] = spikeguard_flags(run, config)
        return cache[key]

    return {"spikeguard": lambda run: replay(run)[0], "spikeguard_device_flag": lambda run: replay(run)[1]}


def bitflip_effect(run: dict[str, Any], burst: BurstSpec) -> dict[str, Any]:
    """What a bit flip did: the flipped value, and the loss and gradient norm at its step
    over their medians of the 16 steps before."""
    rows, t = run["rows"], burst.step
    before = rows[max(0, t - 16) : t]

    def ratio(key: str) -> float:
        return rows[t][key] / statistics.median(r[key] for r in before)

    return {"seed": run["seed"], "step": t, "operator": burst.operator, "delta_amax": run["applied_amax"][t],
            "loss_ratio": ratio("loss"), "grad_norm_ratio": ratio("grad_norm")}


def main() -> None:
    bench = Benchmark("detection", __doc__)
    bench.parser.add_argument("--seeds", type=int, default=None, help=f"evaluation seeds (default {len(EVAL_SEEDS)})")
    bench.parser.add_argument("--steps", type=int, default=None, help=f"steps per run (default {STEPS})")
    args = bench.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    eval_seeds, tune_seeds = (QUICK["eval_seeds"], QUICK["tune_seeds"]) if args.quick else (EVAL_SEEDS, TUNE_SEEDS)
    if args.seeds is not None:
        eval_seeds = tuple(range(args.seeds))
    steps = args.steps or (QUICK["steps"] if args.quick else STEPS)
    num_bursts = QUICK["bursts"] if args.quick else BURSTS_PER_RUN
    num_bursts = min(num_bursts, len(burst_slots(steps)))

    tokens = tokenize(load_text(), ByteTokenizer())
    start = time.perf_counter()
    record = lambda seed: record_run(seed, steps, plan_bursts(seed, steps, num_bursts, MODEL["n_layer"]), tokens)  # noqa: E731
    eval_runs = [record(seed) for seed in eval_seeds]
    tune_runs = [record(seed) for seed in tune_seeds]
    record_s = time.perf_counter() - start

    results = evaluate(eval_runs, {**spikeguard_detectors(), **peers()})
    # Candidate DetectorConfig changes, scored on the tuning seeds only (peers alongside).
    keys = ("f1", "precision", "recall", "false_positives", f"from_step_{LIVE_FROM}", "missed", "false_positive_steps")
    tuning: dict[str, Any] = {"peers_f1": {name: r["f1"] for name, r in evaluate(tune_runs, peers()).items()}}
    for name, overrides in CANDIDATES.items():
        scored = evaluate(tune_runs, {"spikeguard": spikeguard_detectors(DetectorConfig(**overrides))["spikeguard"]})
        tuning[name] = {"overrides": overrides, **{k: scored["spikeguard"][k] for k in keys}}

    ours = results["spikeguard"]["f1"]
    goals = {"f1": {"goal": f"SpikeGuard F1 >= {F1_GOAL}", "limit": F1_GOAL, "value": ours, "met": bool(ours >= F1_GOAL)}}
    for peer in peers():
        goals[f"better_than_{peer}"] = {
            "goal": f"SpikeGuard F1 > {peer} F1", "limit": results[peer]["f1"], "value": ours,
            "met": bool(ours > results[peer]["f1"]),
        }
    bitflips = [bitflip_effect(run, b) for run in eval_runs for b in run["bursts"] if b.kind == "bitflip"]
    bench.emit({
        "setup": {
            "model": MODEL, "batch_size": BATCH_SIZE, "seq_len": SEQ_LEN, "lr": LR, "clip": CLIP, "steps": steps,
            "bursts_per_run": num_bursts, "tolerance": TOLERANCE, "eval_seeds": list(eval_seeds),
            "tune_seeds": list(tune_seeds), "record_s": round(record_s, 1),
        },
        "detectors": results,
        "bitflip_effects": {
            "count": len(bitflips),
            "nonfinite_loss": sum(not math.isfinite(e["loss_ratio"]) for e in bitflips),
            "loss_within_10pct": sum(abs(e["loss_ratio"] - 1) <= 0.1 for e in bitflips),
            "grad_norm_within_1.5x": sum(1 / 1.5 <= e["grad_norm_ratio"] <= 1.5 for e in bitflips),
            "runs": [{k: v if not isinstance(v, float) or math.isfinite(v) else str(v) for k, v in e.items()}
                     for e in bitflips],  # JSON has no NaN
        },
        "tuning": tuning,
        "goals": goals,
    })


if __name__ == "__main__":
    main()
