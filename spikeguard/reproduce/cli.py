"""``spikeguard reproduce``: run the theory's reproduction experiments, write figures and numbers."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run", "parse_only", "summary_markdown"]

_DESCRIPTION = """\
Reproduce THEORY.md on regularized logistic regression (scikit-learn's breast-cancer
data) with spikeguard's own injection, probe and theory functions. Writes one figure
per experiment, results.json (every number the figures show) and summary.md.

  1  constant perturbation: loss floor against ζ², Proposition 3's neighbourhood
  2  decaying perturbation: t^-1/4 keeps Proposition 2's O(1/√T) rate
  3  spikes: recovery in ≈ k_rec steps, divergence when m ≥ 1 or γλ_max ≥ threshold
  4  phase diagram: relative bias × step size, predicted boundary, agreement
  5  forward versus backward perturbations over depth, A^f/A^b

Needs the optional extra: pip install 'spikeguard[reproduce]'."""


def parse_only(text: str) -> tuple[int, ...]:
    """``"1,3"`` -> (1, 3): experiment numbers, each once, in the order given."""
    from spikeguard.reproduce.experiments import EXPERIMENTS

    allowed = sorted(EXPERIMENTS)
    picked: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) not in EXPERIMENTS:
            raise argparse.ArgumentTypeError(
                f"--only takes experiment numbers from {allowed} separated by commas (e.g. 1,3), got {text!r}"
            )
        if int(part) in picked:
            raise argparse.ArgumentTypeError(f"--only names experiment {part} twice in {text!r}")
        picked.append(int(part))
    return tuple(picked)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "reproduce",
        help="reproduce the theory's experiments on logistic regression (figures + results.json)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", required=True, type=Path, metavar="DIR",
        help="directory for the figures, results.json and summary.md (created)",
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes: the whole run in well under 30 s")
    parser.add_argument("--seed", type=int, default=0, help="seed of every injector and minibatch draw (default 0)")
    parser.add_argument(
        "--only", type=parse_only, default=None, metavar="N[,N...]",
        help="run only these experiments, e.g. --only 1,3",
    )
    parser.set_defaults(func=run)
    return parser


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None (strict JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def run(args: argparse.Namespace) -> int:
    """Run the selected experiments; 0 on success, 2 when a dependency or the output directory is unusable."""
    import torch

    from spikeguard.reproduce import experiments as ex
    from spikeguard.reproduce.problems import breast_cancer, require

    out: Path = args.out
    if out.exists() and not out.is_dir():
        print(f"spikeguard reproduce: --out {str(out)!r} exists and is not a directory", file=sys.stderr)
        return 2
    try:
        require("matplotlib")
        data = breast_cancer()
    except ModuleNotFoundError as err:
        print(f"spikeguard reproduce: {err}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    settings = ex.Settings.quick_preset(args.seed) if args.quick else ex.Settings.full(args.seed)
    numbers = args.only or tuple(sorted(ex.EXPERIMENTS))
    command = "spikeguard reproduce --out DIR" + (" --quick" if args.quick else "") + (
        f" --seed {args.seed}" if args.seed else "") + (f" --only {','.join(map(str, numbers))}" if args.only else "")

    # One thread: the tensors are tiny, and a fixed reduction order keeps the run bitwise repeatable.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    try:
        for i, number in enumerate(numbers, 1):
            name = ex.EXPERIMENTS[number][0]
            print(f"[{i}/{len(numbers)}] experiment {number}: {name} ...", file=sys.stderr, flush=True)
            result, seconds = ex.run_experiment(number, data, settings, out)
            results[str(number)] = result
            timings[str(number)] = seconds
            print(f"[{i}/{len(numbers)}] experiment {number}: {name} done in {seconds:.1f} s", file=sys.stderr, flush=True)
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - start

    import spikeguard

    document = _clean({
        "command": command,
        "spikeguard_version": spikeguard.__version__,
        "torch_version": torch.__version__,
        "wall_time_s": wall,
        "experiment_seconds": timings,
        "quick": args.quick,
        "seed": args.seed,
        "data": {"name": data.name, "num_samples": data.num_samples, "num_features": data.num_features},
        "settings": ex.settings_dict(settings),
        "agreement": agreement(results),
        "experiments": results,
    })
    (out / "results.json").write_text(json.dumps(document, indent=1, allow_nan=False) + "\n")
    (out / "summary.md").write_text(summary_markdown(document))
    print(f"wrote {len(numbers)} figure(s), results.json and summary.md to {out} in {wall:.1f} s", file=sys.stderr)
    return 0


def agreement(results: dict[str, Any]) -> dict[str, Any]:
    """The agreement figures of the run, from whichever experiments ran."""
    out: dict[str, Any] = {}
    if "1" in results:
        out["constant_floor_below_prop3"] = results["1"]["observed_below_prediction"]
    if "2" in results:
        out["decay_mean_grad_sq_below_prop2"] = results["2"]["observed_below_bound"]
        out["decay_log_slopes"] = results["2"]["log_slope_observed"]
    if "3" in results:
        r = results["3"]
        out["spike_outcome_agreement"] = r["outcome_agreement"]
        out["spike_recovery_observed_over_k_rec"] = r["recovery_ratio_observed_over_predicted"]
    if "4" in results:
        r = results["4"]
        out["phase_diagram_agreement"] = r["agreement"]
        out["phase_diagram_agreement_literal"] = r["agreement_literal"]
        out["phase_diagram_cells"] = sum(len(p["cells"]) for p in r["panels"].values())
    if "5" in results:
        out["probe_bound_holds_on_every_probe"] = results["5"]["bound_holds_on_every_probe"]
        out["probe_configurations"] = results["5"]["num_probes"]
    return out


def _fmt(x: Any, spec: str = ".3g") -> str:
    return "n/a" if x is None else format(x, spec)


def summary_markdown(doc: dict[str, Any]) -> str:
    """A short human-readable summary of a results document."""
    ex = doc["experiments"]
    lines = [
        "# spikeguard reproduce: summary",
        "",
        f"Command: `{doc['command']}`  ",
        f"Wall time: {doc['wall_time_s']:.1f} s ({'quick' if doc['quick'] else 'full'} settings, seed {doc['seed']}, "
        f"torch {doc['torch_version']}, one CPU thread)  ",
        f"Data: {doc['data']['name']}, n = {doc['data']['num_samples']}, p = {doc['data']['num_features']} "
        "(standardized, intercept column)",
        "",
    ]
    if "1" in ex:
        r = ex["1"]
        slopes = ", ".join(
            f"{k}: {v:.2f}" if v is not None else f"{k}: n/a (never above twice the unperturbed floor)"
            for k, v in r["log_slope_floor_vs_zeta_sq"].items()
        )
        looseness = min(row["floor_predicted"] / row["floor_observed"] for rows in r["series"].values() for row in rows)
        lines += [
            "## 1. Constant perturbation",
            f"- Observed floor below Proposition 3's neighbourhood on every run: **{r['observed_below_prediction']}** "
            f"(also with the measured ζ: {r['observed_below_prediction_measured_zeta']}).",
            f"- The bound is loose: at least {looseness:.3g}x above the observed floor "
            "(ζ from Proposition 1's worst case).",
            f"- Log-slope of the excess floor against ζ² (1 = the ζ² law): {slopes}.",
            "",
        ]
    if "2" in ex:
        r = ex["2"]
        slopes = ", ".join(f"{k}: {v:+.2f}" for k, v in r["log_slope_observed"].items())
        lines += [
            "## 2. Decaying perturbation",
            f"- Log-slope of (1/T) Σ|∇loss|² against T (Proposition 2: -0.5 for no perturbation and t^-1/4, "
            f"-0.25 for t^-1/8, 0 for a constant bias): {slopes}.",
            f"- Observed below Proposition 2's bound everywhere: **{r['observed_below_bound']}**.",
            "",
        ]
    if "3" in ex:
        r = ex["3"]
        lines += [
            "## 3. Spikes",
            f"- Outcome agreement (predicted vs observed): **{r['outcome_agreement']:.0%}** of {len(r['cases'])} runs.",
            "",
            "| run | predicted | predicted (literal) | observed | k_rec predicted (μ est.) | k_rec (μ = λ) "
            "| observed recovery |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, c in r["cases"].items():
            lines.append(
                f"| {name} | {c['predicted']} | {c['predicted_literal']} | {c['observed']} | "
                f"{_fmt(c.get('k_rec_predicted'), '.0f')} | "
                f"{_fmt(c.get('k_rec_predicted_certified_mu'), '.0f')} | {_fmt(c['recovery_steps_observed'], 'd')} |"
            )
        ratios = r["recovery_ratio_observed_over_predicted"]
        if ratios:
            lines += ["", f"- Observed recovery / predicted k_rec: {', '.join(f'{x:.2f}' for x in ratios)} "
                          "(k_rec is a worst-case bound: the theory's contraction q = 1 - γμ(1-m)/2 is four times slower "
                          "than gradient descent's on a quadratic, and the spike mostly excites sharp directions)."]
        lines.append("")
    if "4" in ex:
        r = ex["4"]
        per = ", ".join(f"{k}: {p['agreement']:.0%} (literal {p['agreement_literal']:.0%})" for k, p in r["panels"].items())
        lines += [
            "## 4. Phase diagram",
            f"- Agreement of predicted and observed outcome: **{r['agreement']:.0%}** over "
            f"{sum(len(p['cells']) for p in r['panels'].values())} cells ({per}).",
            f"- With THEORY read literally (clean-loss sharpness at the post-spike point): {r['agreement_literal']:.0%}.",
            "",
        ]
    if "5" in ex:
        r = ex["5"]
        rel = [row["relative"] for row in r["rows"]]
        lines += [
            "## 5. Forward versus backward",
            f"- Proposition 1's bound ≥ observed |Ĝ - G| on every probe: **{r['bound_holds_on_every_probe']}** "
            f"({r['num_probes']} probe configurations).",
            f"- Relative perturbation at every operator: observed forward/backward ratio "
            f"{min(x['observed_ratio'] for x in rel):.2f}-{max(x['observed_ratio'] for x in rel):.2f}, the bounds' ratio "
            f"{min(x['bound_ratio'] for x in rel):.1f}-{max(x['bound_ratio'] for x in rel):.1f}; both flat in depth.",
            "- Absolute perturbation at operator 1, per-operator log-slope of the forward/backward ratio "
            "(observed vs A^f_1/A^b_1): "
            + "; ".join(f"c={g}: {v['absolute_observed_ratio']:+.3f} vs {v['A_ratio_first_op']:+.3f}"
                        for g, v in r["log_slope_per_operator"].items()) + ".",
            "",
        ]
    lines.append("Figures: " + ", ".join(f"`{ex[k]['figure']}`" for k in sorted(ex)) + ".")
    return "\n".join(lines) + "\n"
