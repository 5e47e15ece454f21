"""Studies that compare whole runs on one config, side by side (issue 13's checks of the papers).

    python -m jsft.study gem --config configs/gem_study.py --workdir W --config.model.hf_path=BASE
    python -m jsft.study neftune --config configs/demo.py --workdir W
    python -m jsft.study qsft --config configs/qsft_study.py --workdir W --config.model.hf_path=BASE

`gem` trains the config with cross-entropy and with GEM (`loss.objective`), then samples
`config.study.samples` answers per prompt of `config.study.prompts` (records with `prompt` and the list
of correct `answers`) at `config.study.temperature` and reports: validity (share of samples that are a
correct answer), diversity (distinct correct answers per prompt among the samples), the entropy of
the first answer token's distribution, and the final train / validation losses and their gap.
`neftune` trains with and without NEFTune noise (`loss.neftune_alpha` 0 and 5) and reports the final
evaluation metrics. `qsft` trains plain SFT on rewarded data, exports it, trains Q-SFT from that
export (its behaviour policy), trains SFT on the reward-1 records only, and repeats SFT and Q-SFT on
the multi-turn data; it reports validation exact match. Every run keeps its workdir (W/<variant>), so a
finished variant is not retrained.
"""

from __future__ import annotations

import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from jsft.errors import help_exits_zero

STUDIES = {
    "qsft": {},  # a chain of runs: qsft_variants
    "gem": {
        "ce": {"loss.objective": "ce"},
        "gem": {},  # the config's GEM settings
        "gem_linear": {"loss.objective": "gem", "loss.gem_h": "linear"},
    },
    "neftune": {"plain": {"loss.neftune_alpha": 0.0}, "neftune_5": {"loss.neftune_alpha": 5.0}},
}
_CONFIG = config_flags.DEFINE_config_file("config", None, "The config the study varies.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "One subdirectory per variant.")
flags.mark_flags_as_required(["config", "workdir"])


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
    from jsft.interop.export import run_export  # noqa: PLC0415

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
    from jsft.train.loop import train_and_evaluate  # noqa: PLC0415

    train_and_evaluate(config, workdir)
    final: dict = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            final.update({k: v for k, v in json.loads(line).items() if v is not None})
    return final


def sample_report(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Validity, diversity and first-token entropy of samples from the latest checkpoint."""
    from jsft.data import formats, sources, templates  # noqa: PLC0415
    from jsft.evals import generate  # noqa: PLC0415
    from jsft.evals.run import load  # noqa: PLC0415

    study = config.study
    run, data, model, params, _, _ = load(config, workdir, "latest")
    tok = data.tokenizer
    table = sources.read_table(study.prompts, "train", None)
    records = [sources.row_record(table[i], i, study.prompts)[1] for i in range(len(table))]
    prompts = [
        templates.prompt_ids(
            data.template, tok, formats.Conversation((formats.Message("user", r["prompt"]),))
        )
        for r in records
    ]
    sampling = generate.Sampling(temperature=float(study.temperature), seed=0)
    gen = generate.make_generator(model, 8, data.stop_ids, tok.pad_id, sampling)
    repeated = [p for p in prompts for _ in range(study.samples)]
    longest = max(len(p) for p in prompts)
    outputs = generate.generate_ids(gen, params, repeated, longest, 64, data.stop_ids, tok.pad_id)
    valid, distinct, entropy = [], [], []
    for i, record in enumerate(records):
        texts = [tok.decode(o).strip() for o in outputs[i * study.samples : (i + 1) * study.samples]]
        ok = [t for t in texts if t in set(record["answers"])]
        valid.append(len(ok) / len(texts))
        distinct.append(len(set(ok)))
        logits = model.apply(params, jnp.asarray([prompts[i]], jnp.int32))[0, -1]
        p = jax.nn.softmax(logits)
        entropy.append(float(-jnp.sum(p * jax.nn.log_softmax(logits))))
    return {
        "validity": float(np.mean(valid)),
        "distinct_valid": float(np.mean(distinct)),
        "first_token_entropy": float(np.mean(entropy)),
    }


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in STUDIES:
        raise app.UsageError(f"name one study of {sorted(STUDIES)}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from jsft import config as config_lib  # noqa: PLC0415

    base = _CONFIG.value
    rows = {}
    try:
        config_lib.validate(base)
        if argv[1] == "qsft":
            rows = qsft_study(base, _WORKDIR.value)
        for name, overrides in STUDIES[argv[1]].items():
            config = _variant(base, overrides)
            workdir = os.path.join(_WORKDIR.value, name)
            final = train_variant(config, workdir)
            row = {k: v for k, v in final.items() if k.startswith("eval/")}
            # Cross-entropy on the training batches (a GEM run's train/loss is the GEM objective).
            row["train/ce"] = final.get("train/loss/ce", final["train/loss"])
            if argv[1] == "gem":
                row.update(sample_report(config, workdir))
                row["val_minus_train_ce"] = row["eval/loss"] - row["train/ce"]
            rows[name] = row
    except config_lib.ConfigError as e:
        sys.exit(f"jsft: error: {e}")
    keys = sorted({k for r in rows.values() for k in r})
    lines = ["| " + " | ".join(["variant", *keys]) + " |", "|" + "---|" * (len(keys) + 1)]
    for name, r in rows.items():
        cells = [
            f"{r[k]:.4f}" if isinstance(r.get(k), float) and math.isfinite(r[k]) else str(r.get(k, ""))
            for k in keys
        ]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    print("\n".join(lines))
    with open(os.path.join(_WORKDIR.value, f"{argv[1]}_study.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    app.run(main, flags_parser=help_exits_zero(app.parse_flags_with_usage))
