"""Greedy decoding by repeated full forward passes (simple and exact; a KV cache comes later).

Prompts of different lengths share one right-padded buffer: causal attention means the padding after
a row's current length never affects that row's next token, so each row decodes as if alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jsft.models.registry import ModelDef


def make_greedy_decoder(
    model: ModelDef, max_new_tokens: int, stop_ids: list[int], pad_id: int, out_sharding=None
):
    """decode(params, tokens [B, L], lengths [B]) -> tokens [B, L] with continuations written in."""

    stop = jnp.asarray(stop_ids, jnp.int32)

    def decode(params, tokens_bl, lengths_b):
        rows = jnp.arange(tokens_bl.shape[0])

        def not_finished(carry):
            i, _, _, done = carry
            return (i < max_new_tokens) & ~jnp.all(done)

        def one_token(carry):
            i, tokens_bl, lengths_b, done = carry
            logits_blv = model.apply(params, tokens_bl)
            next_b = jnp.argmax(logits_blv[rows, lengths_b - 1], axis=-1).astype(tokens_bl.dtype)
            next_b = jnp.where(done, pad_id, next_b)
            tokens_bl = tokens_bl.at[rows, lengths_b].set(next_b)
            return i + 1, tokens_bl, lengths_b + 1, done | jnp.isin(next_b, stop)

        done = jnp.zeros(tokens_bl.shape[0], jnp.bool_)
        _, tokens_bl, _, _ = jax.lax.while_loop(not_finished, one_token, (0, tokens_bl, lengths_b, done))
        return tokens_bl

    return jax.jit(decode, out_shardings=out_sharding)


def greedy_generate(
    decoder,
    params,
    prompts: list[list[int]],
    buffer_len: int,
    max_new_tokens: int,
    batch_size: int,
    stop_ids: list[int],
    pad_id: int,
    put=lambda x: x,
) -> list[list[int]]:
    """Continuations (cut before the first stop id) for every prompt, in batches of a fixed shape."""
    keep = buffer_len - max_new_tokens  # longer prompts keep their last `keep` tokens
    outputs = []
    for start in range(0, len(prompts), batch_size):
        chunk = [p[-keep:] for p in prompts[start : start + batch_size]]
        tokens = np.full((batch_size, buffer_len), pad_id, np.int32)
        lengths = np.ones(batch_size, np.int32)  # dummy rows decode from a one-token prompt
        for r, p in enumerate(chunk):
            tokens[r, : len(p)], lengths[r] = p, len(p)
        out = np.asarray(decoder(params, put(tokens), put(lengths)))
        for r, p in enumerate(chunk):
            new = out[r, len(p) : len(p) + max_new_tokens].tolist()
            ends = [k for k, t in enumerate(new) if t in stop_ids]
            outputs.append(new[: ends[0]] if ends else new)
    return outputs
