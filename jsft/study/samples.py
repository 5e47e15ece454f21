"""The GEM study's samples: validity, diversity and first-token entropy of answers sampled from a
run's latest checkpoint."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jsft.data import formats, sources, templates
from jsft.evals import generate
from jsft.modes.evaluate import load


def sample_report(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Validity, diversity and first-token entropy of samples from the latest checkpoint."""
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
