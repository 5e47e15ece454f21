"""The validation evaluator: loss on held-out responses and exact match of greedy generations."""

from __future__ import annotations

import math

import jax
import numpy as np

from jsft.data import pipeline
from jsft.data.eval_data import eval_batches
from jsft.evals import generate, metrics
from jsft.models.registry import ModelDef, Params
from jsft.parallel.placement import BatchPlacement
from jsft.train.step import make_eval_step


class ValidationEvaluator:
    """`run(params) -> (metrics, samples)`.

    Metric keys: `eval/loss`, `eval/perplexity`, `eval/exact_match`, and with several sources
    `eval/loss/<source>` and `eval/exact_match/<source>`.
    """

    def __init__(
        self,
        model: ModelDef,
        data: pipeline.Data,
        seq_len: int,
        batch_size: int,
        max_new_tokens: int,
        placement: BatchPlacement | None = None,
    ):
        """Batches are placed by `placement` (default: as they are): split over the batch axes (so
        `batch_size` is rounded up to a multiple of its divisor), results replicated to every process."""
        placement = placement or BatchPlacement()
        self.data, self.names, self.placement = data, data.source_names, placement
        self.per_source = len(self.names) > 1
        batch_size = placement.round_up(batch_size)
        self.loss_batches = eval_batches(data.val_examples, seq_len, batch_size)
        self.eval_step = jax.jit(
            make_eval_step(model, num_sources=len(self.names)), out_shardings=placement.replicated
        )
        self.prompts = data.eval_prompts
        longest = max((len(p.prompt_ids) for p in self.prompts), default=1)
        # One prompt shape for every batch (one compile): the longest prompt, rounded up.
        self.max_prompt_len = min(seq_len, -(-longest // 8) * 8)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.generator = generate.make_generator(
            model, max_new_tokens, data.stop_ids, data.tokenizer.pad_id, out_sharding=placement.replicated
        )

    def _loss(self, params) -> dict[str, float]:
        totals = None
        for batch in self.loss_batches:
            sums = jax.device_get(self.eval_step(params, self.placement.put_batch(batch)))
            totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
        if totals is None or not totals["weight_sum"]:
            return {}
        out = {"eval/loss": float(totals["loss_sum"] / totals["weight_sum"])}
        out["eval/perplexity"] = math.exp(min(out["eval/loss"], 50.0))
        if self.per_source:
            for k, name in enumerate(self.names, start=1):
                if totals["target_tokens_by_source"][k]:
                    out[f"eval/loss/{name}"] = float(
                        totals["loss_sum_by_source"][k] / totals["target_tokens_by_source"][k]
                    )
        return out

    def run(self, params: Params) -> tuple[dict[str, float], list[dict]]:
        out = self._loss(params)
        if not self.prompts:
            return out, []
        tok = self.data.tokenizer
        generated = generate.generate_ids(
            self.generator,
            params,
            [p.prompt_ids for p in self.prompts],
            self.max_prompt_len,
            self.batch_size,
            self.data.stop_ids,
            tok.pad_id,
            placement=self.placement,
        )
        samples = []
        for p, ids in zip(self.prompts, generated, strict=True):
            text = tok.decode(ids)
            samples.append(
                {
                    "source": self.names[p.source],
                    "prompt": p.prompt_text,
                    "reference": p.reference,
                    "output": text,
                    "exact_match": metrics.exact_match(text, p.reference),
                }
            )
        out["eval/exact_match"] = float(np.mean([s["exact_match"] for s in samples]))
        if self.per_source:
            for name in self.names:
                scores = [s["exact_match"] for s in samples if s["source"] == name]
                if scores:
                    out[f"eval/exact_match/{name}"] = float(np.mean(scores))
        return out, samples
