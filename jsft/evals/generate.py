"""Batched decoding with a KV cache: one jitted prefill, then a jitted `lax.while_loop` of steps.

Prompts of different lengths share one batch: each row is right-padded, its padding never attended
to, and row b's new tokens go to cache slots len_b, len_b + 1, ... (RoPE positions equal slots), so
every row decodes exactly as it would alone. Sampling is greedy (temperature 0) or temperature with
optional top-k and top-p, from a key made of the seed, the eval step and the batch index: different
batches and evaluations draw different samples, and a given seed and step always draw the same ones.
Generation stops at any stop id or after `max_new_tokens`; stop strings are cut on the host after
decoding (`cut_at_stop_strings`). The prefill computes logits at each row's last prompt token only,
and the loop carries the cache, each step writing only its new slot in place. `stream` decodes one
prompt step by step from the host, with a jitted prefill and step compiled once per model and length
bucket (`stream_bucket`), not once per prompt.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jsft.models.registry import ModelDef, Params
from jsft.parallel.placement import BatchPlacement


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0


def sample(logits_bv: jax.Array, rng: jax.Array, s: Sampling) -> jax.Array:
    """One token per row from float32 logits."""
    if s.temperature <= 0:
        return jnp.argmax(logits_bv, axis=-1)
    logits_bv = logits_bv / s.temperature
    if s.top_k:
        kth = jax.lax.top_k(logits_bv, s.top_k)[0][:, -1:]
        logits_bv = jnp.where(logits_bv < kth, -jnp.inf, logits_bv)
    if s.top_p < 1.0:
        order = jnp.argsort(-logits_bv, axis=-1)
        sorted_bv = jnp.take_along_axis(logits_bv, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_bv, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop_sorted = (cum - jax.nn.softmax(sorted_bv, axis=-1)) >= s.top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits_bv.shape[0])[:, None], order].set(drop_sorted)
        logits_bv = jnp.where(drop, -jnp.inf, logits_bv)
    return jax.random.categorical(rng, logits_bv, axis=-1)


def make_generator(
    model: ModelDef,
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    sampling: Sampling = Sampling(),
    out_sharding: jax.sharding.Sharding | None = None,
) -> Callable[..., jax.Array]:
    """generate(params, prompts [B, P] right-padded, lengths [B], step=0, batch=0) -> new tokens
    [B, max_new_tokens] (pad_id after a row stops; a stop token itself is kept). `step` (the eval
    step) and `batch` (the batch index), int32 scalars, are folded into the sampling key."""
    stop = jnp.asarray(stop_ids, jnp.int32)

    def generate(params, prompts_bp, lengths_b, step=0, batch=0):
        module = model.module(params)
        b, p = prompts_bp.shape
        cache = module.init_cache(b, p + max_new_tokens)
        is_token = jnp.arange(p)[None, :] < lengths_b[:, None]
        start = jnp.zeros(b, jnp.int32)
        # [B, 1, V]: the logits at each row's last prompt token only
        logits, cache = module.cached_forward(prompts_bp, start, is_token, cache, lengths_b - 1)
        rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(sampling.seed), step), batch)
        first = sample(logits[:, 0], jax.random.fold_in(rng, 0), sampling).astype(jnp.int32)
        out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)

        def not_finished(carry):
            i, _, _, done, _ = carry
            return (i < max_new_tokens) & ~jnp.all(done)

        def step(carry):  # the cache is carried: each step writes its one new slot in place
            i, out, cache, done, last = carry
            logits, cache = module.cached_forward(last[:, None], lengths_b + i - 1, ~done[:, None], cache)
            token = sample(logits[:, 0], jax.random.fold_in(rng, i), sampling).astype(jnp.int32)
            token = jnp.where(done, pad_id, token)
            return i + 1, out.at[:, i].set(token), cache, done | jnp.isin(token, stop), token

        done = jnp.isin(first, stop)
        _, out, _, _, _ = jax.lax.while_loop(not_finished, step, (1, out, cache, done, first))
        return out

    return jax.jit(generate, out_shardings=out_sharding)


def cut_at_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    ends = [k for k, t in enumerate(ids) if t in stop_ids]
    return ids[: ends[0]] if ends else ids


def cut_at_stop_strings(text: str, stop_strings: list[str]) -> str:
    """The text before the earliest occurrence of any stop string."""
    cuts = [text.find(s) for s in stop_strings if s and s in text]
    return text[: min(cuts)] if cuts else text


def generate_ids(
    generator: Callable[..., jax.Array],
    params: Params,
    prompts: list[list[int]],
    max_prompt_len: int,
    batch_size: int,
    stop_ids: list[int],
    pad_id: int,
    placement: BatchPlacement | None = None,
    step: int = 0,
) -> list[list[int]]:
    """Continuations (cut before the first stop id) for every prompt, in batches of one fixed shape;
    prompts longer than `max_prompt_len` keep their last tokens. Sampling keys derive from `step`
    (the eval step) and the batch index. `placement` puts each batch on the mesh (default: as is)."""
    placement = placement or BatchPlacement()
    outputs = []
    for batch, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = [p[-max_prompt_len:] for p in prompts[start : start + batch_size]]
        tokens = np.full((batch_size, max_prompt_len), pad_id, np.int32)
        lengths = np.ones(batch_size, np.int32)  # filler rows decode from a one-token prompt
        for r, p in enumerate(chunk):
            tokens[r, : len(p)], lengths[r] = p, len(p)
        placed = placement.put_batch({"prompts": tokens, "lengths": lengths})
        out = np.asarray(
            generator(params, placed["prompts"], placed["lengths"], np.int32(step), np.int32(batch))
        )
        outputs += [cut_at_stop(out[r].tolist(), stop_ids) for r in range(len(chunk))]
    return outputs


STREAM_MIN_BUCKET = 128


def stream_bucket(n: int) -> int:
    """The cache length (and padded prompt length) for `n` tokens: a power of two, at least
    STREAM_MIN_BUCKET, so that a session's prompts share a few compiled shapes."""
    return max(STREAM_MIN_BUCKET, 1 << (n - 1).bit_length())


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _stream_prefill(model, sampling, cache_len, params, rng, prompt_1p, length_1):
    """(first token [1], cache of `cache_len` slots) for one right-padded prompt."""
    module = model.module(params)
    is_token_1p = jnp.arange(prompt_1p.shape[1])[None, :] < length_1[:, None]
    cache = module.init_cache(1, cache_len)
    logits, cache = module.cached_forward(
        prompt_1p, jnp.zeros(1, jnp.int32), is_token_1p, cache, length_1 - 1
    )
    return sample(logits[:, 0], jax.random.fold_in(rng, 0), sampling).astype(jnp.int32), cache


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(7,))
def _stream_step(model, sampling, params, rng, i, token_1, start_1, cache):
    """(token i [1], cache): token i - 1 written at slot `start_1` (the cache is donated: in place)."""
    tok_11 = token_1[:, None]
    logits, cache = model.module(params).cached_forward(
        tok_11, start_1, jnp.ones_like(tok_11, jnp.bool_), cache
    )
    return sample(logits[:, 0], jax.random.fold_in(rng, i), sampling).astype(jnp.int32), cache


def stream(
    model: ModelDef,
    params: Params,
    prompt: list[int],
    max_new_tokens: int,
    stop_ids: list[int],
    sampling: Sampling = Sampling(),
    index: int = 0,
) -> Iterator[int]:
    """Yield one token id at a time for one prompt (for interactive use); the same cache and math as
    `make_generator`, stepped from the host so each token can be shown as soon as it exists. `index`
    (the prompt's number in a session) is folded into the sampling key. The prompt is right-padded and
    the cache sized to `stream_bucket` lengths, and the jitted functions are keyed by the model, so a
    session compiles once per bucket rather than once per prompt."""
    n = len(prompt)
    padded = np.zeros((1, stream_bucket(n)), np.int32)
    padded[0, :n] = prompt
    rng = jax.random.fold_in(jax.random.key(sampling.seed), index)
    token, cache = _stream_prefill(
        model, sampling, stream_bucket(n + max_new_tokens), params, rng, padded, np.array([n], np.int32)
    )
    for i in range(max_new_tokens):
        token_id = int(token[0])
        if token_id in stop_ids:
            return
        yield token_id
        if i + 1 < max_new_tokens:
            start = np.array([n + i], np.int32)
            token, cache = _stream_step(model, sampling, params, rng, np.int32(i + 1), token, start, cache)
