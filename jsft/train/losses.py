"""Masked next-token cross-entropy, with the normalisation named rather than implied.

Losses return *sums* and the weight they are normalised by, never a mean: the step divides once,
by the total over the whole global batch (all micro-batches, all hosts), so gradient accumulation and
packing never change the objective.

  token     every target token weighs 1: sum of token losses / number of target tokens
            (the convention of MaxText, Levanter and TRL's default)
  sequence  every example weighs 1: mean of each example's mean token loss
            (what per-example averaging frameworks compute; long answers no longer dominate)

A record's `weight` w_i makes either a weighted mean, with the unit it names weighing w_i:
  token     sum_i w_i sum_t l_it / sum_i w_i n_i        (each of example i's n_i targets weighs w_i)
  sequence  sum_i w_i mean_t l_it / sum_i w_i           (example i weighs w_i)
so scaling every weight alike changes nothing, and a weight-0 example is left out of both sums.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

NORMALIZATIONS = ("token", "sequence")
# How the per-token NLL is computed: `chunked` fuses the output projection and never forms the
# batch's [B, T, V] logits (jsft/train/chunked_ce.py); `reference` is log-softmax-then-gather on the
# full logits, kept as the oracle.
IMPLEMENTATIONS = ("chunked", "reference")


def token_nll(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
    """Negative log-likelihood of each target, in float32."""
    logprobs = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logprobs, targets_bt[..., None], axis=-1)[..., 0]


def token_weights(
    loss_mask_bt: jax.Array,
    segment_ids_bt: jax.Array,
    normalization: str,
    prompt_weight: float = 0.0,
    example_weight_bt: jax.Array | None = None,
) -> jax.Array:
    """Per-token weights; their sum over the global batch is the loss denominator.

    `prompt_weight` in [0, 1] also trains the example's untrained tokens (prompt, template) with that
    weight (0: only the response, today's behaviour); `example_weight_bt` (each example's `weight`
    field on its tokens) weighs its example, so the loss is the weighted mean (module docstring)."""
    mask = loss_mask_bt.astype(jnp.float32)
    if prompt_weight:
        prompt = (segment_ids_bt > 0) & (loss_mask_bt == 0)
        mask = mask + prompt_weight * prompt.astype(jnp.float32)
    example = 1.0 if example_weight_bt is None else example_weight_bt.astype(jnp.float32)
    if normalization == "token":
        return mask * example
    if normalization == "sequence":
        # Count the target tokens of every (row, segment) pair and give each token 1/count, so each
        # example's tokens sum to 1; the example's weight multiplies after the count (counting
        # weighted tokens would divide the weight out again).
        b, t = segment_ids_bt.shape
        flat_ids = (jnp.arange(b)[:, None] * t + segment_ids_bt).reshape(-1)
        counts = jax.ops.segment_sum(mask.reshape(-1), flat_ids, num_segments=b * t)
        per_token = counts[flat_ids].reshape(b, t)
        return jnp.where(mask > 0, example * mask / jnp.maximum(per_token, 1e-30), 0.0)
    raise ValueError(f"loss normalization {normalization!r} is not one of {NORMALIZATIONS}")


def cross_entropy_sums(
    nll_bt: jax.Array,
    batch: Mapping[str, jax.Array],
    normalization: str = "token",
    num_sources: int = 0,
    prompt_weight: float = 0.0,
) -> dict[str, jax.Array]:
    """{'loss_sum', 'weight_sum', 'target_tokens'} for one (micro-)batch, from each token's NLL.

    With `num_sources`, also per-source token-loss sums and target counts (index 0 is padding, source
    k is index k + 1), so `train/loss/<source>` is exact even when sources share packed rows.
    """
    nll = nll_bt
    weights = token_weights(
        batch["loss_mask"], batch["segment_ids"], normalization, prompt_weight, batch.get("weight")
    )
    mask = batch["loss_mask"].astype(jnp.float32)
    sums = {
        "loss_sum": jnp.sum(nll * weights),
        "weight_sum": jnp.sum(weights),
        "target_tokens": jnp.sum(mask),
    }
    if num_sources:
        ids = batch["source_ids"].reshape(-1)
        n = num_sources + 1
        sums["loss_sum_by_source"] = jax.ops.segment_sum((nll * mask).reshape(-1), ids, num_segments=n)
        sums["target_tokens_by_source"] = jax.ops.segment_sum(mask.reshape(-1), ids, num_segments=n)
    return sums
