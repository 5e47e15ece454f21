"""Q-SFT (Hong, Dragan, Levine, "Q-SFT: Q-Learning for Language Models via Supervised Fine-Tuning",
arXiv 2411.05193): token probabilities trained as conservative Q-value estimates by a weighted
cross-entropy whose weights are Bellman backups.

For the token a = y_t taken at state s_t (the prefix up to position t), with the reward r_t the data
gives for it (a turn's reward sits on its last token, jsft/data/tokenizing.py):

    B_t = clip(r_t + gamma_t * max_a' [ p_target(a' | s_next) / pi_beta(a' | s_next) ], 0, 1)
    loss_t = -[ B_t log p(y_t | s_t) + (1 - B_t) / (V - 1) * sum_{a != y_t} log p(a | s_t) ]

s_next is the next trained position of the same example (the next token of the turn, or the first
token of the next assistant turn); gamma_t is 1 inside a turn and `gamma` across turns; at the last
trained token B_t = r_t. Tokens with pi_beta < 1e-4 are left out of the max. p_target is a Polyak
average of the parameters (`polyak` per step), pi_beta the behaviour policy: the weights the run
starts from, frozen (start Q-SFT from a model fine-tuned on the same data with plain SFT). Both live
in the train state (`aux`), so checkpoints and resume cover them. The equations follow the first
author's research code (jxihong/llm_rl_research, q_sft/base_interface.py `loss_fn_mask`, at 5656689)
and third-party notes citing the paper's Eq. 3: the paper's full text was not reachable here. Two
choices differ from that code: pi_beta is frozen instead of trained beside (one model less to hold),
and B is clipped to [0, 1] (the weighted cross-entropy needs weights in [0, 1]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsft.train.chunked_ce import _chunks, _logits, _unchunk

PI_BETA_FLOOR = 1e-4


def next_trained(loss_mask_bt: jax.Array, segment_ids_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(index of the next trained position of the same example, whether there is one) per position."""
    b, t = loss_mask_bt.shape
    big = jnp.int32(t)
    idx = jnp.where(loss_mask_bt > 0, jnp.arange(t, dtype=jnp.int32), big)
    after = jnp.concatenate([idx[:, 1:], jnp.full((b, 1), big)], axis=1)  # candidates u > t
    nxt = jnp.flip(jax.lax.cummin(jnp.flip(after, 1), axis=1), 1)
    clipped = jnp.minimum(nxt, t - 1)
    same = jnp.take_along_axis(segment_ids_bt, clipped, axis=1) == segment_ids_bt
    return clipped, (nxt < big) & same


def bellman_targets(
    ratio_bt: jax.Array,
    reward_bt: jax.Array,
    loss_mask_bt: jax.Array,
    segment_ids_bt: jax.Array,
    gamma: float,
) -> jax.Array:
    """B_t for every position (meaningful where loss_mask is set); `ratio_bt` is max_a' p_target /
    pi_beta at each position's own state."""
    nxt, has_next = next_trained(loss_mask_bt, segment_ids_bt)
    t = jnp.arange(loss_mask_bt.shape[1])
    discount = jnp.where(nxt == t + 1, 1.0, gamma)  # inside a turn: no discount
    bootstrap = jnp.where(has_next, discount * jnp.take_along_axis(ratio_bt, nxt, axis=1), 0.0)
    return jnp.clip(reward_bt + bootstrap, 0.0, 1.0)


def max_ratio(
    x_target_btd: jax.Array,
    head_target_dv: jax.Array,
    x_beta_btd: jax.Array,
    head_beta_dv: jax.Array,
    softcap: float,
    chunk: int,
) -> jax.Array:
    """[B, T] max_a p_target(a | s_t) / pi_beta(a | s_t) over tokens with pi_beta >= 1e-4, computed
    a chunk of positions at a time (no [B, T, V] array)."""

    def body(_, xs):
        xt, xb = xs
        lt, _ = _logits(xt, head_target_dv, softcap)
        lb, _ = _logits(xb, head_beta_dv, softcap)
        log_pt, log_pb = jax.nn.log_softmax(lt, -1), jax.nn.log_softmax(lb, -1)
        ratio = jnp.where(log_pb >= jnp.log(PI_BETA_FLOOR), jnp.exp(log_pt - log_pb), 0.0)
        return None, jnp.max(ratio, axis=-1)

    t = x_target_btd.shape[1]
    _, out = jax.lax.scan(body, None, (_chunks(x_target_btd, chunk), _chunks(x_beta_btd, chunk)))
    return jax.lax.stop_gradient(_unchunk(out, t))


def weighted_ce(nll_bt: jax.Array, smooth_bt: jax.Array, target_bt: jax.Array, vocab: int) -> jax.Array:
    """-[B log p_y + (1 - B)/(V - 1) sum_{a != y} log p_a] from nll = -log p_y and smooth =
    -mean_a log p_a (so sum_{a != y} log p_a = nll - V smooth)."""
    return target_bt * nll_bt + (1.0 - target_bt) / (vocab - 1) * (vocab * smooth_bt - nll_bt)


def polyak(target: dict, params: dict, rate: float) -> dict:
    """target <- (1 - rate) target + rate params, leaf by leaf in the target's dtype."""
    return jax.tree.map(
        lambda t, p: ((1.0 - rate) * t + rate * p.astype(t.dtype)).astype(t.dtype), target, params
    )
