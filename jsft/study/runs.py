"""The runs of a study: variants of one config, each trained (or resumed to its end) in its own
workdir W/<variant>, and the table of their final metrics."""

from __future__ import annotations

import json
import math
import os

import ml_collections

from jsft.modes.export import run_export
from jsft.modes.train import train_and_evaluate
from jsft.study.samples import sample_report


def _variant(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(config.to_dict())
    for key, value in overrides.items():
        *parents, field = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[field] = value
    return config


def qsft_variants(config: ml_collections.ConfigDict) -> list[tuple[str, dict, str]]:
    """(name, overrides, the run whose export it starts from or "") in training order."""
    data = os.path.dirname(config.data.sources.qsft.path)
    multi = {
        "data.sources.qsft.path": os.path.join(data, "multiturn.jsonl"),
        "data.sources.qsft.val_path": os.path.join(data, "val_chat.jsonl"),
    }
    return [
        ("sft", {"loss.objective": "ce"}, ""),
        ("qsft", {}, "sft"),
        (
            "filtered_sft",
            {"loss.objective": "ce", "data.sources.qsft.path": os.path.join(data, "train_filtered.jsonl")},
            "",
        ),
        ("multiturn_sft", {"loss.objective": "ce", **multi}, ""),
        ("multiturn_qsft", dict(multi), "multiturn_sft"),
    ]


def qsft_study(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
    rows = {}
    for name, overrides, start in qsft_variants(config):
        if start:  # Q-SFT starts from the SFT run: its weights are the behaviour policy
            overrides = dict(overrides, **{"model.hf_path": os.path.join(workdir, start, "hf")})
        variant = _variant(config, overrides)
        final = train_variant(variant, os.path.join(workdir, name))
        rows[name] = {k: final[k] for k in ("eval/exact_match", "eval/loss") if k in final}
        if name in ("sft", "multiturn_sft") and not os.path.exists(
            os.path.join(workdir, name, "hf", "config.json")
        ):
            run_export(
                variant, os.path.join(workdir, name), os.path.join(workdir, name, "hf"), dtype="float32"
            )
    return rows


def train_variant(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (or resume to the end) and return the final metrics of metrics.jsonl."""
    train_and_evaluate(config, workdir)
    final: dict = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            final.update({k: v for k, v in json.loads(line).items() if v is not None})
    return final


def run_study(
    name: str, variants: dict[str, dict], base: ml_collections.ConfigDict, workdir: str
) -> dict[str, dict]:
    """Train study `name` on `base` under `workdir`: each of `variants` ({variant: overrides}), after
    the chain of qsft_variants for `qsft`; returns a row of final metrics per variant."""
    rows = qsft_study(base, workdir) if name == "qsft" else {}
    for variant_name, overrides in variants.items():
        config = _variant(base, overrides)
        run_dir = os.path.join(workdir, variant_name)
        final = train_variant(config, run_dir)
        row = {k: v for k, v in final.items() if k.startswith("eval/")}
        # Cross-entropy on the training batches (a GEM run's train/loss is the GEM objective).
        row["train/ce"] = final.get("train/loss/ce", final["train/loss"])
        if name == "gem":
            row.update(sample_report(config, run_dir))
            row["val_minus_train_ce"] = row["eval/loss"] - row["train/ce"]
        rows[variant_name] = row
    return rows


def table(rows: dict[str, dict]) -> str:
    """The rows as a Markdown table, one line per variant."""
    keys = sorted({k for r in rows.values() for k in r})
    lines = ["| " + " | ".join(["variant", *keys]) + " |", "|" + "---|" * (len(keys) + 1)]
    for name, r in rows.items():
        cells = [
            f"{r[k]:.4f}" if isinstance(r.get(k), float) and math.isfinite(r[k]) else str(r.get(k, ""))
            for k in keys
        ]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)
