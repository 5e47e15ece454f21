"""Run reports: one PNG of a run's curves from its metrics.jsonl, or several runs overlaid.

    python -m jsft.main --mode report --workdir A [--workdir B ...] [--report_out FILE]

Panels: train loss, learning rate, gradient norm, tokens/s, eval loss and every other eval metric
(perplexity aside), each over steps; the best checkpoint's step (checkpoints/best.json) is a
dashed line in the run's colour. Training writes WORKDIR/report.png after an evaluation (at most once
a minute: a drawing costs ~0.5 s of CPU) and always at the end. matplotlib's object API with the Agg
canvas: no display, no pyplot state.
"""

from __future__ import annotations

import json
import math
import os
import time

TRAIN_PANELS = ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s")


def read_metrics(workdir: str, live: bool = False) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} of a workdir's metrics.jsonl (non-finite values left out).
    `live`: the run may still be writing it, or was killed mid-line (a sweep's trial): a missing file
    reads as empty and a line that does not parse is skipped."""
    series: dict[str, list[tuple[int, float]]] = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        if live:
            return series
        raise FileNotFoundError(f"--workdir={workdir}: no metrics.jsonl (has a run written there?)")
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                if live:
                    continue
                raise
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                    series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


def best_step(workdir: str) -> int | None:
    """The best step of a local workdir, from its best.json (a run's copy for people)."""
    for path in (
        os.path.join(workdir, "checkpoints", "best.json"),
        os.path.join(workdir, "checkpoints_best", "best.json"),
    ):
        try:
            with open(path) as f:
                return json.load(f).get("step")
        except (OSError, ValueError):
            continue
    return None


def panels(runs: list[dict[str, list]]) -> list[str]:
    """The metrics to draw: the train panels, then eval loss and every other eval metric, in order."""
    keys = set().union(*(r.keys() for r in runs))
    evals = sorted(
        k for k in keys if k.startswith("eval/") and not k.endswith("perplexity") and k != "eval/loss"
    )
    wanted = [*TRAIN_PANELS, "eval/loss", *evals]
    return [k for k in wanted if k in keys]


def write_report(workdirs: list[str], out_path: str) -> str:
    """Draw the runs of `workdirs` (overlaid) into `out_path`; returns the path."""
    from matplotlib.figure import Figure  # noqa: PLC0415 - Agg by default, no pyplot needed

    runs = [read_metrics(w) for w in workdirs]
    names = panels(runs)
    cols = 3
    rows = max(1, math.ceil(len(names) / cols))
    fig = Figure(figsize=(5 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for i, (workdir, run) in enumerate(zip(workdirs, runs, strict=True)):
            color = f"C{i % 10}"
            if name in run:
                steps, values = zip(*run[name], strict=True)
                ax.plot(
                    steps,
                    values,
                    color=color,
                    marker="." if len(steps) < 30 else None,
                    label=os.path.basename(os.path.normpath(workdir)),
                )
            best = best_step(workdir)
            if best is not None and name.startswith("eval/"):
                ax.axvline(best, color=color, linestyle="--", linewidth=0.8)
        ax.set_title(name)
        ax.set_xlabel("step")
        if name in ("train/loss", "eval/loss"):
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    # Fixed margins: the panels have the same furniture, and tight_layout measured every label
    # (2/3 of a drawing's time).
    fig.subplots_adjust(
        left=0.05, right=0.98, bottom=0.3 / rows, top=1 - 0.25 / rows, hspace=0.55, wspace=0.22
    )
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.tmp.png"
    fig.savefig(tmp, dpi=80)
    os.replace(tmp, out_path)
    return out_path


class LiveReport:
    """WORKDIR/report.png of a training run: redrawn after an evaluation when `min_interval_s` have
    passed since the last drawing (or the start), and always at the end (`final`)."""

    def __init__(self, workdir: str, min_interval_s: float = 60.0):
        self.workdir = workdir
        self.min_interval_s = min_interval_s
        self._drawn_at = time.monotonic()

    def update(self, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._drawn_at < self.min_interval_s:
            return
        self._drawn_at = now
        write_report([self.workdir], os.path.join(self.workdir, "report.png"))
