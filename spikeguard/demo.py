"""``spikeguard demo``: the main job on the embedded default, end to end, in a few minutes.

Trains the tiny GPT-2 of ``recipes/tiny-gpt-burst.yaml`` on Python's own documentation,
with a one-step outlier burst at a known step and operator, then prints what SpikeGuard
saw: the spike's step, its origin, the predicted outcome and recovery next to the
observed one, and where the HTML report, the event log and the offline W&B run are.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spikeguard.records import SpikeEvent

__all__ = ["run_demo", "add_parser", "RECIPE"]

RECIPE = "tiny-gpt-burst.yaml"


def recipe_path(name: str = RECIPE) -> Path:
    """A recipe shipped with spikeguard (``recipes/`` in the source tree)."""
    path = resources.files("spikeguard.recipes") / "configs" / name
    if not path.is_file():
        available = sorted(p.name for p in (resources.files("spikeguard.recipes") / "configs").iterdir())
        raise ValueError(f"no recipe named {name!r}; available: {available}")
    return Path(str(path))


def _demo_config(out: Path, steps: int | None, wandb: bool) -> Path:
    """The recipe with its outputs under ``out`` (and a W&B offline logger), written out
    so that the run can be repeated with ``spikeguard fit --config``."""
    import yaml

    config = yaml.safe_load(recipe_path().read_text())
    trainer = config["trainer"]
    trainer["default_root_dir"] = str(out)
    loggers = [{"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": str(out), "name": "logs"}}]
    if wandb:
        loggers.append({
            "class_path": "pytorch_lightning.loggers.WandbLogger",
            "init_args": {"save_dir": str(out), "project": "spikeguard-demo", "offline": True, "name": "tiny-gpt-burst"},
        })
    trainer["logger"] = loggers
    if steps is not None:
        trainer["max_steps"] = steps
    path = out / "demo-config.yaml"
    path.write_text(
        "# Written by `spikeguard demo` from recipes/tiny-gpt-burst.yaml; rerun with\n"
        f"#   spikeguard fit --config {path}\n" + yaml.safe_dump(config, sort_keys=False)
    )
    return path


def _wandb_available() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def run_demo(out: str | os.PathLike = "runs/demo", steps: int | None = None, wandb: bool = True) -> dict[str, Any]:
    """Train the demo recipe into ``out``; return what it found (and print a summary).

    ``result["events"]`` are the run's :class:`~spikeguard.records.SpikeEvent` records, as
    :func:`spikeguard.rundir.load_run` reads them (the report reads the same run object).
    """
    from spikeguard.paths import RunPaths
    from spikeguard.recipes.cli import fit
    from spikeguard.report import ReportError, build_report
    from spikeguard.rundir import RunError, load_run

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    wandb = wandb and _wandb_available()
    if wandb:
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
    config = _demo_config(out, steps, wandb)
    print(f"spikeguard demo: training {RECIPE} into {out}", flush=True)
    start = time.perf_counter()
    fit(["--config", str(config)])
    seconds = time.perf_counter() - start

    runs = sorted(glob.glob(str(out / "logs" / "version_*")), key=os.path.getmtime)
    run_dir = Path(runs[-1])
    files = RunPaths.at(run_dir)
    events: list[SpikeEvent] = []
    report = None
    try:
        run = load_run(run_dir)
    except RunError as err:  # a run that logged nothing of SpikeGuard's: no events, no report, say why
        print(f"(cannot read the run: {err})", file=sys.stderr)
    else:
        events = run.events
        try:
            report = build_report(run)
        except ReportError as err:  # e.g. matplotlib missing: the rest of the demo stands
            print(f"(no HTML report: {err})", file=sys.stderr)
    wandb_runs = sorted(glob.glob(str(out / "wandb" / "offline-run-*")), key=os.path.getmtime) if wandb else []
    result = {
        "run_dir": str(run_dir), "events": events, "report": str(report) if report else None,
        "events_file": str(files.events),
        "wandb_run": wandb_runs[-1] if wandb_runs else None, "seconds": seconds,
    }
    print(summary(result))
    return result


def _num(value: Any, fmt: str = ".3g") -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def summary(result: dict[str, Any]) -> str:
    """The closing summary the demo prints; ``result["events"]`` are typed :class:`SpikeEvent` records."""
    lines = ["", f"spikeguard demo finished in {result['seconds']:.0f} s", ""]
    events: list[SpikeEvent] = result["events"]
    spikes = [e for e in events if e.kind != "operator"]
    if not spikes:
        lines.append("No spike was detected (the burst should have caused one: see the report).")
    for e in spikes:
        pred = e.predicted  # None: no prediction was made, every predicted value is n/a
        where = f"in {e.origin} ({e.direction} pass)" if e.origin else "(origin not attributed)"
        outcome = pred.outcome if pred is not None and pred.outcome else "n/a"
        factor, bound, k_rec = (pred.factor, pred.factor_bound, pred.k_rec) if pred is not None else (None, None, None)
        lines += [
            f"Spike at step {e.step}: {e.kind}, gradient x{_num(e.factor)} its baseline (robust z = {_num(e.z, '.1f')})",
            f"  started {where}",
            f"  predicted: {outcome}, spike factor ~{_num(factor)} (bound {_num(bound)}), k_rec = {_num(k_rec, '.0f')} steps",
            f"  observed: {e.outcome}" + (f" after {e.recovery_steps} step(s)" if e.recovery_steps is not None else ""),
        ]
    others = [e for e in events if e.kind == "operator"]
    if others:
        lines.append(f"Operator anomalies (no loss/gradient spike): steps {[e.step for e in others]}")
    lines += ["", f"HTML report:  {result['report'] or 'not written'}", f"Event log:    {result['events_file']}"]
    if result["wandb_run"]:
        lines += [f"W&B run:      {result['wandb_run']} (offline)", f"  upload it:  wandb sync {result['wandb_run']}"]
    return "\n".join(lines)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo", help="train a tiny GPT-2 with a burst, detect, attribute and report it (CPU, minutes)",
        description=__doc__,
    )
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's max_steps (quick look)")
    parser.add_argument("--no-wandb", action="store_true", help="do not write the offline W&B run")
    parser.set_defaults(func=lambda args: _main(args))
    return parser


def _main(args: argparse.Namespace) -> int:
    if args.steps is not None and args.steps < 1:
        print(f"spikeguard demo: --steps must be >= 1, got {args.steps}", file=sys.stderr)
        return 2
    run_demo(args.out, steps=args.steps, wandb=not args.no_wandb)
    return 0
