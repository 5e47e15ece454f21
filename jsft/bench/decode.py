"""`python -m jsft.bench generate`: how fast the configured model decodes (KV cache, batch 1 and 16)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from jsft.evals import generate
from jsft.run import Run


def bench_generate(
    config: ml_collections.ConfigDict,
    batch_sizes: Sequence[int] = (1, 16),
    prompt_len: int = 16,
    new_tokens: int = 64,
    repeats: int = 3,
) -> str:
    """KV-cache generation tokens/s of the configured model (random weights: speed does not depend on
    them; no stop token, so every row decodes the full budget)."""
    vocab = config.model.vocab_size or config.data.vocab_size
    model = Run.create(config).model(vocab)
    params = jax.jit(model.init)(jax.random.key(0))
    rows = []
    for b in batch_sizes:
        gen = generate.make_generator(model, new_tokens, stop_ids=[-1], pad_id=0)
        prompts = np.random.default_rng(0).integers(0, vocab, (b, prompt_len)).astype(np.int32)
        lengths = np.full(b, prompt_len, np.int32)
        jax.block_until_ready(gen(params, prompts, lengths))  # compile
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(gen(params, prompts, lengths))
            times.append(time.perf_counter() - start)
        best = min(times)
        rows.append((f"batch {b:>3}: new tokens/s", f"{b * new_tokens / best:,.0f}"))
        rows.append((f"batch {b:>3}: ms per step", f"{1000 * best / new_tokens:,.2f}"))
    title = (
        f"jsft bench generate: {model.config.num_params():,} parameters, prompt {prompt_len} tokens, "
        f"{new_tokens} new tokens (greedy, KV cache), best of {repeats}, {jax.devices()[0].platform}"
    )
    width = max(len(name) for name, _ in rows)
    return "\n".join([title] + [f"  {name:<{width}}  {value:>12}" for name, value in rows])
