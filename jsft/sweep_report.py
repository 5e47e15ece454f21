"""A sweep's report: `DIR/report.md` (every trial: state, parameters, objective, final metrics,
wall time, directory) and PNGs: the objective against each swept field (mean and spread over seeds
when `seed` is swept), the curves of every finished trial overlaid, and the best trial's curves."""

from __future__ import annotations

import collections
import os
from typing import Any

import ml_collections
import numpy as np

from jsft import sweep_lib
from jsft.train import report


def _final(workdir: str) -> dict[str, float]:
    out = {}
    for key in ("train/loss", "eval/loss"):
        value, _ = sweep_lib.last_value(workdir, key)
        if value is not None:
            out[key] = value
    return out


def _plot_objective(rows: list[dict], field: str, objective: str, path: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    groups: dict = collections.defaultdict(list)
    for r in rows:
        groups[r["params"][field]].append(r["value"])
    xs = sorted(groups, key=lambda v: (isinstance(v, str), v))
    means = [float(np.mean(groups[x])) for x in xs]
    spread = [float(np.std(groups[x])) for x in xs]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    positions = list(range(len(xs))) if any(isinstance(x, str) for x in xs) else xs
    ax.errorbar(positions, means, yerr=spread, fmt="o-", capsize=4)
    if positions is not xs:
        ax.set_xticks(positions, [str(x) for x in xs])
    if all(isinstance(x, float) for x in xs) and min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(field)
    ax.set_ylabel(objective + (" (mean +- std over the other fields)" if len(rows) > len(xs) else ""))
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
        workdir = sweep_lib.trial_dir(root, t.number, t.params)
        wall = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        rows.append(
            dict(
                number=t.number,
                state=t.state.name,
                params=dict(t.params),
                value=t.value,
                wall=wall,
                dir=workdir,
            )
        )
    fields = list(sweep_lib.space_of(sweep))
    header = ["trial", "state", *fields, sweep.objective, "train/loss", "eval/loss", "wall (s)", "directory"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        final = _final(r["dir"])
        cells = [str(r["number"]), r["state"], *(str(r["params"].get(f)) for f in fields)]
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
        report.write_report([r["dir"] for r in done], os.path.join(root, "curves.png"))
        best = (min if sweep.direction == "minimize" else max)(done, key=lambda r: r["value"])
        report.write_report([best["dir"]], os.path.join(root, "best.png"))
        images += ["curves.png", "best.png"]
        where = os.path.relpath(best["dir"], root)
        table += f"\n\nBest: trial {best['number']} ({sweep.objective} {best['value']:.4f}), {where}"
    text = (
        f"# Sweep {os.path.basename(root)}\n\n{table}\n\n" + "\n".join(f"![{i}]({i})" for i in images) + "\n"
    )
    tmp = os.path.join(root, "report.md.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(root, "report.md"))
    return table
