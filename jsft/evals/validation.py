"""The validation evaluator: loss on held-out responses and exact match of greedy generations."""

from __future__ import annotations

import math

import jax
import numpy as np

from jsft.data import pipeline
from jsft.evals import generate, metrics
from jsft.models.registry import ModelDef
from jsft.train.step import make_eval_step


class ValidationEvaluator:
    """`run(params) -> (metrics, samples)`; metric keys are `eval/loss`, `eval/perplexity`,
    `eval/exact_match`."""

    def __init__(
        self,
        model: ModelDef,
        data: pipeline.Data,
        seq_len: int,
        batch_size: int,
        max_new_tokens: int,
        exact_match_examples: int,
    ):
        self.data = data
        self.loss_batches = pipeline.eval_batches(data.val_examples, seq_len, batch_size)
        self.eval_step = jax.jit(make_eval_step(model))
        self.records = data.val_records[:exact_match_examples]
        tok = data.tokenizer
        self.prompts = [data.template.prompt_ids(tok, r.prompt) for r in self.records]
        longest = max((len(p) for p in self.prompts), default=1)
        # One buffer shape for every batch (one compile): the longest prompt plus the new tokens.
        self.buffer_len = min(seq_len, -(-(longest + max_new_tokens) // 8) * 8)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.decoder = generate.make_greedy_decoder(model, max_new_tokens, tok.eos_id, tok.pad_id)

    def run(self, params) -> tuple[dict[str, float], list[dict]]:
        loss_sum = weight_sum = 0.0
        for batch in self.loss_batches:
            sums = jax.device_get(self.eval_step(params, batch))
            loss_sum, weight_sum = loss_sum + float(sums["loss_sum"]), weight_sum + float(sums["weight_sum"])
        out = {}
        if weight_sum:
            out["eval/loss"] = loss_sum / weight_sum
            out["eval/perplexity"] = math.exp(min(out["eval/loss"], 50.0))
        samples = []
        if self.records:
            tok = self.data.tokenizer
            generated = generate.greedy_generate(
                self.decoder,
                params,
                self.prompts,
                self.buffer_len,
                self.max_new_tokens,
                self.batch_size,
                tok.eos_id,
                tok.pad_id,
            )
            for rec, ids in zip(self.records, generated, strict=True):
                text = tok.decode(ids)
                samples.append(
                    {
                        "prompt": rec.prompt,
                        "reference": rec.response,
                        "output": text,
                        "exact_match": metrics.exact_match(text, rec.response),
                    }
                )
            out["eval/exact_match"] = float(np.mean([s["exact_match"] for s in samples]))
        return out, samples
