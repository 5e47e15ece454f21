"""A sweep's report: `DIR/report.md` (every trial: state, parameters, objective, final metrics,
wall time, directory) and PNGs: the objective against each swept field (mean and spread over seeds
when `seed` is swept), the curves of every finished trial overlaid, and the best trial's curves."""

from __future__ import annotations

import collections
import os
from typing import Any

import ml_collections
import numpy as np

from jsft.sweep import lib as sweep_lib
from jsft.train import report


def label(value: Any) -> str:
    """A parameter as a table cell or tick: a file path by its name without extension."""
    if isinstance(value, str) and os.sep in value:
        return os.path.splitext(os.path.basename(value))[0]
    return str(value)


def trained_tokens(workdir: str) -> float:
    """Target (loss) tokens the run trained on: the sum of its train/target_tokens lines."""
    return float(sum(v for _, v in report.read_metrics(workdir, live=True).get("train/target_tokens", [])))


def summary(rows: list[dict], fields: list[str], objective: str) -> str:
    """Per value of each swept field but `seed`: the objective's mean, sample standard deviation
    (ddof 1), min and max over the trials with that value (over seeds, when only seeds vary besides),
    and the loss tokens trained."""
    lines = []
    for field in (f for f in fields if f != "seed"):
        groups: dict = collections.defaultdict(list)
        for r in rows:
            groups[r["params"][field]].append(r)
        lines += [
            f"| {field} | trials | {objective} mean | std (ddof 1) | min | max | loss tokens trained |",
            "|---|---|---|---|---|---|---|",
        ]
        for value in _order(rows, field):
            vals = np.array([r["value"] for r in groups[value]])
            std = vals.std(ddof=1) if len(vals) > 1 else 0.0
            tokens = np.mean([trained_tokens(r["metrics"]) for r in groups[value]])
            lines.append(
                f"| {label(value)} | {len(vals)} | {vals.mean():.4f} | {std:.4f} | {vals.min():.4f} "
                f"| {vals.max():.4f} | {tokens:,.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def _order(rows: list[dict], field: str) -> list:
    """The field's values: numbers sorted, strings (e.g. file names) in the order of the trials."""
    values = list(dict.fromkeys(r["params"][field] for r in rows))
    return values if any(isinstance(v, str) for v in values) else sorted(values)


def _final(workdir: str) -> dict[str, float]:
    """The last train and eval loss of a trial (one read of its metrics.jsonl)."""
    series = report.read_metrics(workdir, live=True)
    return {key: series[key][-1][1] for key in ("train/loss", "eval/loss") if series.get(key)}


def _plot_objective(rows: list[dict], field: str, objective: str, path: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    groups: dict = collections.defaultdict(list)
    for r in rows:
        groups[r["params"][field]].append(r["value"])
    xs = _order(rows, field)
    means = [float(np.mean(groups[x])) for x in xs]
    spread = [float(np.std(groups[x], ddof=1)) if len(groups[x]) > 1 else 0.0 for x in xs]
    fig, ax = plt.subplots(figsize=(6, 4))
    categorical = any(isinstance(x, str) for x in xs)
    positions = list(range(len(xs))) if categorical else xs
    # Categories get no connecting line (their order means nothing); every trial is a small dot.
    ax.errorbar(positions, means, yerr=spread, fmt="o" if categorical else "o-", capsize=4, zorder=2)
    for pos, x in zip(positions, xs, strict=True):
        ax.plot([pos] * len(groups[x]), groups[x], ".", color="grey", alpha=0.6, zorder=1)
    if categorical:
        ax.set_xticks(positions, [label(x) for x in xs], rotation=20)
    if all(isinstance(x, float) for x in xs) and min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(field)
    ax.set_ylabel(objective)
    if len(rows) > len(xs):
        ax.set_title("mean and sample std over the other fields (dots: trials)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write(study: Any, sweep: ml_collections.ConfigDict, root: str) -> str:
    """Write DIR/report.md and its PNGs; returns the table (markdown)."""
    import optuna  # noqa: PLC0415

    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state == optuna.trial.TrialState.WAITING:
            continue
        paths = sweep_lib.trial_paths(sweep, root, t.number, t.params)
        wall = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        rows.append(
            dict(
                number=t.number,
                state=t.state.name,
                params=dict(t.params),
                value=t.value,
                wall=wall,
                dir=paths.dir,
                metrics=paths.metrics,
            )
        )
    fields = list(sweep_lib.space_of(sweep))
    header = ["trial", "state", *fields, sweep.objective, "train/loss", "eval/loss", "wall (s)", "directory"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        final = _final(r["metrics"])
        cells = [str(r["number"]), r["state"], *(label(r["params"].get(f)) for f in fields)]
        cells.append("" if r["value"] is None else f"{r['value']:.4f}")
        cells += [f"{final[k]:.4f}" if k in final else "" for k in ("train/loss", "eval/loss")]
        cells += ["" if r["wall"] is None else f"{r['wall']:.0f}", os.path.relpath(r["dir"], root)]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    done = [r for r in rows if r["state"] == "COMPLETE" and r["value"] is not None]
    images = []
    for field in fields:
        if done:
            name = f"objective_vs_{field.replace('.', '_')}.png"
            _plot_objective(done, field, sweep.objective, os.path.join(root, name))
            images.append(name)
    if done:
        report.write_report([r["metrics"] for r in done], os.path.join(root, "curves.png"))
        best = (min if sweep.direction == "minimize" else max)(done, key=lambda r: r["value"])
        report.write_report([best["metrics"]], os.path.join(root, "best.png"))
        images += ["curves.png", "best.png"]
        where = os.path.relpath(best["dir"], root)
        table += f"\n\nBest: trial {best['number']} ({sweep.objective} {best['value']:.4f}), {where}"
        table += "\n\n" + summary(done, fields, sweep.objective)
    text = (
        f"# Sweep {os.path.basename(root)}\n\n{table}\n\n" + "\n".join(f"![{i}]({i})" for i in images) + "\n"
    )
    tmp = os.path.join(root, "report.md.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(root, "report.md"))
    return table
