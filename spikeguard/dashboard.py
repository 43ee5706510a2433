"""The W&B spike dashboard: a plain spec (sections, panels, metric keys) and the workspace built from it.

:func:`dashboard_spec` names every key through :mod:`spikeguard.keys`, so the dashboard,
the report and the tests read the same keys the callbacks log; a test runs a real
training and checks that every key a panel names was logged. :func:`build_workspace`
turns the spec into a ``wandb_workspaces`` Workspace (the optional ``dashboard`` extra);
``spikeguard dashboard`` saves it, or with ``--dry-run`` prints the spec.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from spikeguard import keys, paths
from spikeguard.measure.results import CONFIGS
from spikeguard.rundir import RunError, find_run, load_run
from spikeguard.wandb import EVENT_TABLE_KEY

__all__ = [
    "dashboard_spec", "build_workspace", "spec_keys", "spec_regexes", "operators_from_run",
    "add_parser", "run", "DEFAULT_NAME", "PANEL_KINDS",
]

DEFAULT_NAME = "spikeguard: spikes"
#: What a spec panel can be: a line plot against ``trainer/global_step`` (of ``keys``, or
#: of every key matching ``regex``), a bar per key (its latest value), or a logged table.
PANEL_KINDS = ("line", "bar", "table")
_INSTALL = "pip install 'spikeguard[dashboard]'"
_SENTINEL = "\x00"  # stands for an operator name while a key is turned into a pattern


def _pattern(*builds: Callable[[str], str]) -> str:
    """A regex matching the keys ``build(operator)`` for any operator name (one path segment)."""
    parts = [re.escape(build(_SENTINEL)).replace(re.escape(_SENTINEL), "[^/]+") for build in builds]
    return "^" + (parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")") + "$"


def _line(title: str, metric_keys: Sequence[str], log_y: bool = False) -> dict[str, Any]:
    panel: dict[str, Any] = {"kind": "line", "title": title, "keys": list(metric_keys)}
    if log_y:
        panel["log_y"] = True
    return panel


def _regex_line(title: str, *builds: Callable[[str], str]) -> dict[str, Any]:
    return {"kind": "line", "title": title, "regex": _pattern(*builds)}


def _check(operators: Sequence[str] | None, configs: Sequence[str]) -> None:
    if operators is not None:
        if isinstance(operators, str) or not all(isinstance(o, str) and o for o in operators) or not operators:
            raise ValueError(f"operators must be None or a non-empty list of operator names, got {operators!r}")
        if "/" in "".join(operators):
            raise ValueError(f"operator names cannot contain '/' (a key segment), got {list(operators)}")
        if len(set(operators)) != len(operators):
            raise ValueError(f"operators names an operator twice: {list(operators)}")
    if isinstance(configs, str) or not configs or any(c not in CONFIGS for c in configs) or len(set(configs)) != len(configs):
        raise ValueError(f"configs must be a non-empty subset of {list(CONFIGS)} without repeats, got {configs!r}")


def dashboard_spec(
    operators: Sequence[str] | None,
    configs: Sequence[str] = CONFIGS,
    *,
    name: str = DEFAULT_NAME,
) -> dict[str, Any]:
    """The spike dashboard as plain JSON-able data: ``{"sections": [{"name", "panels": [...]}]}``.

    Sections: Overview (loss, gradient norm, z-scores, spike counters), Spike events (the
    event table; spike factor and recovery, observed versus predicted), Amplification
    (|Ĝ - G| and each operator's d_i, observed versus Proposition 1's bound and the
    first-order prediction), Forward versus backward (the configurations side by side,
    A^f, A^b and A^f/A^b by operator, each operator's output and gradient-message ratios,
    the applied perturbations), Stability (sharpness against its threshold, m against 1).

    Each panel is ``{"kind": "line" | "bar" | "table", "title", "keys": [...]}`` (lines
    plot against ``trainer/global_step``; ``"log_y": true`` on some), or a line panel with
    ``"regex"`` instead of ``"keys"``: every logged key matching it.

    Args:
        operators: the operator names (``OperatorChain.names``), in forward order; None
            for a dashboard that fits any model: per-operator panels become one regex
            panel each (W&B's ``metric_regex``).
        configs: the probe configurations logged (``AmplificationProbe(configs=...)``).
        name: the workspace's name.
    """
    _check(operators, configs)
    configs = list(configs)
    primary = "both" if "both" in configs else configs[0]
    named = operators is not None
    ops = list(operators or ())
    m = keys.metric

    overview = [
        _line("Loss", [m("loss")]),
        _line("Gradient norm |G| and its upper band", [m("grad_norm"), m("grad_norm_band")], log_y=True),
        _line("Robust z-scores", [m("loss_z"), m("grad_norm_z")]),
        _line("Spikes, skipped and clipped steps (counters)", [m("spikes"), m("skipped_steps"), m("clipped_steps")]),
    ]
    events = [
        {"kind": "table", "title": "Spike events", "keys": [EVENT_TABLE_KEY]},
        _line("Spike factor: observed vs predicted", [m("spike", "factor"), m("spike", "predicted_factor")], log_y=True),
        _line("Recovery steps: observed vs predicted k_rec", [m("spike", "recovery_steps"), m("spike", "predicted_k_rec")]),
        _line("Spike z-score", [m("spike", "z")]),
    ]

    def observed_vs_predicted(op: str) -> list[str]:
        return [keys.probe_operator_metric(primary, op, f) for f in ("d_observed", "d_linear", "d_bound")]

    amplification = [
        _line(
            f"|Ĝ - G| ({primary}): observed vs first-order vs bound",
            [keys.probe_metric(primary, f) for f in ("total_observed", "total_linear", "total_bound")],
            log_y=True,
        ),
    ]
    if named:
        amplification += [_line(f"{op}: d_i ({primary}) observed vs first-order vs bound", observed_vs_predicted(op), log_y=True) for op in ops]
    else:
        amplification.append(_regex_line(
            f"d_i ({primary}) observed vs first-order vs bound, every operator",
            *(lambda op, f=f: keys.probe_operator_metric(primary, op, f) for f in ("d_observed", "d_linear", "d_bound")),
        ))

    forward_backward = [
        _line("|Ĝ - G| observed: " + " vs ".join(configs), [keys.probe_metric(c, "total_observed") for c in configs], log_y=True),
    ]
    for field, title in (("A_f", "A^f (forward) by operator"), ("A_b", "A^b (backward) by operator"),
                         ("A_ratio", "A^f / A^b by operator")):
        if named:
            forward_backward.append({"kind": "bar", "title": title, "keys": [keys.probe_constant_metric(op, field) for op in ops]})
        else:
            forward_backward.append(_regex_line(title, lambda op, field=field: keys.probe_constant_metric(op, field)))
    stats = ("out_rms_ratio", "msg_norm_ratio")  # forward: activations, backward: gradient messages
    if named:
        forward_backward += [
            _line(f"{op}: output RMS vs gradient message, / baseline", [keys.operator_metric(op, s) for s in stats], log_y=True)
            for op in ops
        ]
    else:
        forward_backward.append(_regex_line(
            "Output RMS vs gradient message, / baseline, every operator",
            *(lambda op, s=s: keys.operator_metric(op, s) for s in stats),
        ))
    # Only operators with a perturbation log these: a pattern whatever the operators.
    forward_backward.append(_regex_line(
        "Applied perturbations |δ_i| (forward), |ε_i| (backward)",
        *(lambda op, d=d: keys.perturb_metric(d, op) for d in ("forward", "backward")),
    ))

    stability = [
        _line("Sharpness against the stability threshold",
              [m("probe", "sharpness"), m("probe", "stability_threshold")], log_y=True),
        _line("Sharpness / threshold (>= 1: unstable)", [m("probe", "sharpness_ratio")]),
        _line("Relative bias m (>= 1: diverges)", [keys.probe_metric(c, "m") for c in configs]),
    ]
    return {
        "name": name,
        "x_axis": keys.STEP,
        "operators": ops if named else None,
        "configs": configs,
        "sections": [
            {"name": "Overview", "panels": overview},
            {"name": "Spike events", "panels": events},
            {"name": "Amplification", "panels": amplification},
            {"name": "Forward versus backward", "panels": forward_backward},
            {"name": "Stability", "panels": stability},
        ],
    }


def _panels(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for section in spec["sections"] for panel in section["panels"]]


def spec_keys(spec: dict[str, Any]) -> list[str]:
    """Every metric key a panel of ``spec`` names, each once, in order."""
    return list(dict.fromkeys(k for panel in _panels(spec) for k in panel.get("keys", ())))


def spec_regexes(spec: dict[str, Any]) -> list[str]:
    """Every ``metric_regex`` of ``spec``'s panels, each once, in order."""
    return list(dict.fromkeys(panel["regex"] for panel in _panels(spec) if "regex" in panel))


# -- the workspace ---------------------------------------------------------------------


def build_workspace(spec: dict[str, Any], entity: str, project: str, name: str | None = None) -> Any:
    """A ``wandb_workspaces.workspaces.Workspace`` of ``spec`` (not saved: call ``.save()``).

    Needs the optional ``wandb-workspaces`` package (``pip install 'spikeguard[dashboard]'``).
    """
    for arg, value in (("entity", entity), ("project", project)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"build_workspace: {arg} must be a non-empty string, got {value!r}")
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as err:
        raise ImportError(f"building the W&B dashboard needs wandb-workspaces: {_INSTALL} ({err})") from err

    x_axis = spec["x_axis"]

    def panel(p: dict[str, Any]) -> Any:
        kind = p["kind"]
        if kind == "line" and "regex" in p:
            return wr.LinePlot(title=p["title"], x=x_axis, metric_regex=p["regex"])
        if kind == "line":
            return wr.LinePlot(title=p["title"], x=x_axis, y=list(p["keys"]), log_y=p.get("log_y") or None)
        if kind == "bar":
            return wr.BarPlot(title=p["title"], metrics=list(p["keys"]), orientation="v")
        if kind == "table":
            return wr.WeavePanelSummaryTable(table_name=p["keys"][0], layout=wr.Layout(w=24, h=10))
        raise ValueError(f"spec panel {p.get('title')!r}: kind must be one of {list(PANEL_KINDS)}, got {kind!r}")

    sections = [
        ws.Section(
            name=s["name"], panels=[panel(p) for p in s["panels"]], is_open=True,
            panel_settings=ws.SectionPanelSettings(x_axis=x_axis),
        )
        for s in spec["sections"]
    ]
    return ws.Workspace(
        entity=entity, project=project, name=name or spec["name"], sections=sections,
        settings=ws.WorkspaceSettings(x_axis=x_axis),
    )


# -- operator names from a run ---------------------------------------------------------


def operators_from_run(run_dir: str | Path) -> tuple[list[str], list[str]]:
    """The operator names and probe configurations a run logged.

    The run is read by :func:`spikeguard.rundir.load_run`, the reader the report uses,
    and the names are :attr:`Run.operators <spikeguard.rundir.Run.operators>`: the newest
    probe's names in forward order, then any that only ``metrics.csv``
    (``spikeguard/op/<op>/...`` columns) or an event's operator ratios name. The
    configurations are the newest probe's, else those whose relative bias m was logged in
    ``metrics.csv``; empty when no probe ran. ``run_dir`` is the run's log directory
    (``trainer.log_dir``) or its ``spikeguard`` folder.

    Raises:
        ValueError: ``run_dir`` is not a directory or holds no run or no operator names
            (the message says where it looked), or a file of the run cannot be read
            (:class:`~spikeguard.rundir.RunError`, a ValueError naming the file).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"--run {str(run_dir)!r} is not a directory")
    root = run_dir
    if run_dir.name == paths.ARTIFACTS and any((run_dir / name).is_file() for name in (paths.EVENTS, paths.PROBES)):
        root = run_dir.parent  # the run's spikeguard folder: the run is the directory above it

    def missing(directory: Path, why: str = "") -> ValueError:
        files = paths.RunPaths.at(directory)
        looked = ", ".join(str(path) for path in (files.probes, files.metrics, files.events))
        message = f"no operator names in {str(run_dir)!r}: looked in {looked}; pass --operators a,b,c instead"
        return ValueError(message + (f" ({why})" if why else ""))

    try:
        directory = find_run(root)
    except RunError as err:  # no run there (or several): as before, no names, and the reader's reason
        raise missing(root, str(err)) from None
    run = load_run(directory)  # a file that cannot be read: the RunError names it
    names, _ = run.operators
    if not names:
        raise missing(directory)
    if run.probes:
        observed = run.probes[-1].result.observed
        configs = [c for c in CONFIGS if c in observed]
    else:
        configs = [c for c in CONFIGS if keys.probe_metric(c, "m") in run.metrics]
    return names, configs


# -- the command -----------------------------------------------------------------------

_DESCRIPTION = """\
Create the W&B spike workspace for a project: sections Overview, Spike events,
Amplification, Forward versus backward and Stability, every panel on spikeguard's
logged keys against trainer/global_step.

Per-operator panels need the operator names: from a run's log directory (--run) or
listed (--operators). Without either, each per-operator panel is one panel over
every operator (a W&B metric regex).

--dry-run prints the spec as JSON (no network, no W&B account). Saving needs the
optional extra (pip install 'spikeguard[dashboard]') and a W&B login."""


def _operator_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"--operators takes operator names separated by commas (e.g. a,b,c), got {text!r}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"--operators names an operator twice in {text!r}")
    return names


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "dashboard",
        help="create the W&B spike workspace (or print its spec with --dry-run)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--entity", metavar="E", help="W&B entity (user or team) that owns the workspace")
    parser.add_argument("--project", metavar="P", help="W&B project of the workspace")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--run", type=Path, metavar="DIR", help="a run's log directory: read its operator names")
    which.add_argument("--operators", type=_operator_list, metavar="A,B,...", help="operator names, comma-separated, in forward order")
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"workspace name (default {DEFAULT_NAME!r})")
    parser.add_argument("--dry-run", action="store_true", help="print the spec as JSON; no network")
    parser.set_defaults(func=run)
    return parser


def _fail(message: str, code: int = 2) -> int:
    print(f"spikeguard dashboard: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    """Print the spec (--dry-run) or build and save the workspace; 0 on success, 2 on a usage error, 1 when W&B refuses."""
    if not args.dry_run:
        missing = [flag for flag, value in (("--entity", args.entity), ("--project", args.project)) if not value]
        if missing:
            return _fail(f"{' and '.join(missing)} required to create the workspace (or --dry-run to print its spec)")
    configs: Sequence[str] = CONFIGS
    operators = args.operators
    if args.run is not None:
        try:
            operators, found = operators_from_run(args.run)
        except ValueError as err:
            return _fail(str(err))
        configs = found or CONFIGS
    try:
        spec = dashboard_spec(operators, configs, name=args.name)
    except ValueError as err:
        return _fail(str(err))
    if args.dry_run:
        print(json.dumps(spec, indent=2, ensure_ascii=False))
        return 0
    try:
        workspace = build_workspace(spec, args.entity, args.project)
    except ImportError as err:
        return _fail(str(err))
    try:
        workspace.save()
    except Exception as err:  # no login, no network, no such entity: say so, no traceback
        return _fail(
            f"saving the workspace to W&B failed ({type(err).__name__}: {err}); check `wandb login` and that "
            f"{args.entity}/{args.project} exists",
            1,
        )
    print(f"saved W&B workspace {spec['name']!r} to {args.entity}/{args.project}", file=sys.stderr)
    return 0
