"""Mixture-of-Experts feed-forward layers: a top-k router, dropless grouped-matmul experts, router losses.

Each token's router logits l = x R pick its k experts by softmax probability p = softmax(l); the
chosen probabilities are its combine weights, renormalised to sum to 1 with `norm_topk_prob`
(Mixtral always; Qwen3-MoE when its config says so: then the weights are the softmax over the chosen
logits). The expert MLPs are SwiGLU with stacked weights (gate/up [E, D, F], down [E, F, D]).

Dispatch sorts the T * k (token, expert) assignments by expert and runs every expert's rows as one
grouped matmul (`jax.lax.ragged_dot` with the experts' row counts): no token is dropped and no
[E, capacity, D] buffer is padded. With a capacity factor c > 0 each expert takes at most
ceil(c * T * k / E) assignments, the earliest first (flattened batch order, then the token's k
choices in order; padding tokens last), and the overflow is dropped: its rows move past the groups,
where ragged_dot computes nothing, and the token keeps only its other experts' outputs (renormalised
weights are not renormalised again, as in Switch/GShard).

On a mesh (sharding rules active) each batch shard routes and dispatches its own tokens inside a
`shard_map` over the batch axes (`_per_batch_shard`), so the capacity counts a shard's tokens.

Expert parallelism (`dispatch_ep`): when the `expert` rule names a mesh axis that also splits the batch
(config.mesh.expert > 1), each device holds E / n of the experts and 1 / n of the tokens. It sends
every assignment to the device of its expert with one `all_to_all`, runs its local experts' grouped
matmuls on what it received, and an `all_to_all` back returns the rows to their tokens. The buffers are
static and dropless: each (source, destination) pair has room for all of a device's T * k assignments
(the worst case, every one to the same device), so a device's send and receive buffers are n * T * k
rows of D each, n times the one-device dispatch's [T * k, D], and the local grouped matmuls run over
n * T * k rows, most of them empty (ragged_dot leaves rows past the groups untouched). Exact against
one device; a capacity factor is refused with it.

Router losses (`router_losses`), over real (non-padding) tokens and every MoE layer, as transformers'
`load_balancing_loss_func` with an attention mask computes the first:

    aux = E * sum_e f_e P_e      f_e = top-k assignments to e / (tokens * layers)
                                 P_e = sum of p_e / (tokens * layers)
    z   = mean over tokens and layers of logsumexp(l)^2   (ST-MoE's router z-loss)

f_e carries no gradient (it counts discrete choices), as in transformers.

Shape letters: T tokens (batch * sequence, flattened), D model width, F expert width, E experts,
K experts per token, A assignments (T * K).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jsft.parallel import sharding


def route(logits_te: jax.Array, k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(weights [T, K] float32, experts [T, K] int32, probs [T, E] float32) from router logits."""
    probs_te = jax.nn.softmax(logits_te.astype(jnp.float32), axis=-1)
    weights_tk, experts_tk = jax.lax.top_k(probs_te, k)
    if norm_topk_prob:
        weights_tk = weights_tk / jnp.sum(weights_tk, axis=-1, keepdims=True)
    return weights_tk, experts_tk.astype(jnp.int32), probs_te


def capacity(tokens: int, k: int, n_experts: int, factor: float) -> int:
    """Assignments one expert takes at most (`factor` 0: no limit, every assignment)."""
    if factor <= 0:
        return tokens * k
    return min(tokens * k, math.ceil(factor * tokens * k / n_experts))


def _order(experts_a: jax.Array, valid_a: jax.Array, n_experts: int, cap: int) -> tuple[jax.Array, jax.Array]:
    """(order [A], group sizes [E]): assignment indices sorted by expert, the kept ones of expert e
    forming its group (at most `cap`, real tokens first, earliest first) and the dropped ones last."""
    a = experts_a.shape[0]
    if cap >= a:  # dropless: one stable sort by expert (padding is computed too; its output is unused)
        return jnp.argsort(experts_a, stable=True), jnp.bincount(experts_a, length=n_experts).astype(
            jnp.int32
        )
    # Stable sort by (expert, padding last): within an expert, real assignments keep batch order.
    by_expert = jnp.argsort(experts_a * 2 + (~valid_a).astype(jnp.int32), stable=True)
    sorted_e = experts_a[by_expert]
    counts_e = jnp.bincount(experts_a, length=n_experts)
    rank = jnp.arange(a) - (jnp.cumsum(counts_e) - counts_e)[sorted_e]  # place within its expert
    keep = (rank < cap) & valid_a[by_expert]
    group_e = jnp.where(keep, sorted_e, n_experts)  # dropped rows: a group past the last expert
    order = by_expert[jnp.argsort(group_e, stable=True)]
    return order, jnp.bincount(group_e, length=n_experts).astype(jnp.int32)


def dispatch(
    x_td: jax.Array,
    experts_tk: jax.Array,
    weights_tk: jax.Array,
    gate_edf: jax.Array,
    up_edf: jax.Array,
    down_efd: jax.Array,
    activation: Callable[[jax.Array], jax.Array],
    cap: int | None = None,
    valid_t: jax.Array | None = None,
) -> jax.Array:
    """sum_k weight_tk * expert_{e_tk}(x_t) for every token, by grouped matmuls over expert-sorted
    rows; `cap` limits each expert's assignments (None: dropless), `valid_t` marks real tokens (padding
    goes last under a cap). Returns [T, D] in x's dtype."""
    t, k = experts_tk.shape
    n_experts = gate_edf.shape[0]
    experts_a = experts_tk.reshape(-1)
    valid_a = jnp.ones((t * k,), jnp.bool_) if valid_t is None else jnp.repeat(valid_t, k)
    order_a, group_sizes_e = _order(experts_a, valid_a, n_experts, t * k if cap is None else cap)
    token_a = order_a // k
    # [A, D]: each token's row once per chosen expert, grouped by expert (dropped rows at the end)
    x_ad = x_td[token_a]
    # Named for the remat policies (llama.MOE_SAVES): save_dots keeps them, save_dots_except_mlp not.
    gate_af = checkpoint_name(
        jax.lax.ragged_dot(x_ad, gate_edf.astype(x_td.dtype), group_sizes_e), "expert_gate"
    )
    up_af = checkpoint_name(jax.lax.ragged_dot(x_ad, up_edf.astype(x_td.dtype), group_sizes_e), "expert_up")
    y_ad = jax.lax.ragged_dot(activation(gate_af) * up_af, down_efd.astype(x_td.dtype), group_sizes_e)
    y_ad = checkpoint_name(y_ad, "expert_down")
    kept_a = jnp.arange(t * k) < jnp.sum(group_sizes_e)  # dropped rows are zero already; weigh them 0 too
    w_a = jnp.where(kept_a, weights_tk.reshape(-1)[order_a], 0.0)
    y_td = jnp.zeros((t, x_td.shape[1]), jnp.float32).at[token_a].add(y_ad.astype(jnp.float32) * w_a[:, None])
    return y_td.astype(x_td.dtype)


def dispatch_ep(
    x_td: jax.Array,
    experts_tk: jax.Array,
    weights_tk: jax.Array,
    gate_ldf: jax.Array,
    up_ldf: jax.Array,
    down_lfd: jax.Array,
    activation: Callable[[jax.Array], jax.Array],
    axis: str,
) -> jax.Array:
    """`dispatch` (dropless) inside a `shard_map` manual over `axis`, with this device's share of
    the experts (L = E / n local ones, device i holding experts i * L ... i * L + L - 1): assignments
    travel to their expert's device and back by all-to-all. Returns [T, D] in x's dtype."""
    t, k = experts_tk.shape
    n, n_local, a = jax.lax.axis_size(axis), gate_ldf.shape[0], t * k
    experts_a = experts_tk.reshape(-1)
    dest_a, rows_a = experts_a // n_local, jnp.arange(a)
    # [n, A, D] / [n, A]: row a of block j holds assignment a if it goes to device j (else zeros and
    # the local expert id L: no expert)
    send_nad = jnp.zeros((n, a, x_td.shape[1]), x_td.dtype).at[dest_a, rows_a].set(x_td[rows_a // k])
    send_na = jnp.full((n, a), n_local, jnp.int32).at[dest_a, rows_a].set(experts_a % n_local)
    recv_nad = jax.lax.all_to_all(send_nad, axis, 0, 0)  # block i: what device i sent here
    local_r = jax.lax.all_to_all(send_na, axis, 0, 0).reshape(-1)
    order_r = jnp.argsort(local_r, stable=True)  # by local expert, empty rows last
    group_sizes_l = jnp.bincount(local_r, length=n_local + 1)[:n_local].astype(jnp.int32)
    x_rd = recv_nad.reshape(n * a, -1)[order_r]
    gate_rf = checkpoint_name(
        jax.lax.ragged_dot(x_rd, gate_ldf.astype(x_td.dtype), group_sizes_l), "expert_gate"
    )
    up_rf = checkpoint_name(jax.lax.ragged_dot(x_rd, up_ldf.astype(x_td.dtype), group_sizes_l), "expert_up")
    y_rd = jax.lax.ragged_dot(activation(gate_rf) * up_rf, down_lfd.astype(x_td.dtype), group_sizes_l)
    y_rd = checkpoint_name(y_rd, "expert_down")
    y_nad = jnp.zeros_like(y_rd).at[order_r].set(y_rd).reshape(n, a, -1)
    back_nad = jax.lax.all_to_all(y_nad, axis, 0, 0)  # block j: my rows that device j computed
    y_ad = back_nad[dest_a, rows_a]
    w_a = weights_tk.reshape(-1)
    y_td = (
        jnp.zeros((t, x_td.shape[1]), jnp.float32)
        .at[rows_a // k]
        .add(y_ad.astype(jnp.float32) * w_a[:, None])
    )
    return y_td.astype(x_td.dtype)


def dense_reference(
    x_td: jax.Array,
    experts_tk: jax.Array,
    weights_tk: jax.Array,
    gate_edf: jax.Array,
    up_edf: jax.Array,
    down_efd: jax.Array,
    activation: Callable[[jax.Array], jax.Array],
) -> jax.Array:
    """`dispatch` without a cap, computed the slow way: every expert on every token, masked (tests)."""
    out = jnp.zeros(x_td.shape, jnp.float32)
    for e in range(gate_edf.shape[0]):
        h = activation(x_td @ gate_edf[e]) * (x_td @ up_edf[e])
        w_t = jnp.sum(jnp.where(experts_tk == e, weights_tk, 0.0), axis=-1)
        out = out + (h @ down_efd[e]).astype(jnp.float32) * w_t[:, None]
    return out.astype(x_td.dtype)


def router_stats(
    logits_te: jax.Array, probs_te: jax.Array, experts_tk: jax.Array, real_t: jax.Array
) -> dict[str, jax.Array]:
    """One layer's sums over real tokens: assignments per expert [E] (no gradient), probabilities
    per expert [E], logsumexp^2 (the z-loss) and the token count; `router_losses` combines layers."""
    n_experts = probs_te.shape[-1]
    k = experts_tk.shape[-1]
    real_t = real_t.astype(jnp.float32)
    counts_e = jax.ops.segment_sum(
        jnp.repeat(real_t, k), experts_tk.reshape(-1), num_segments=n_experts, indices_are_sorted=False
    )
    lse_t = jax.nn.logsumexp(logits_te.astype(jnp.float32), axis=-1)
    return {
        "counts": jax.lax.stop_gradient(counts_e),
        "prob_sums": real_t @ probs_te,
        "z_sum": jnp.sum(real_t * lse_t * lse_t),
        "tokens": jnp.sum(real_t),
    }


def router_losses(stats: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
    """From `router_stats` stacked over MoE layers ([L, E], [L]): the load-balancing loss `aux` (as
    transformers), the router z-loss `z` and each expert's share of the assignments `load` [E]."""
    n_experts = stats["counts"].shape[-1]
    rows = jnp.maximum(jnp.sum(stats["tokens"]), 1.0)  # tokens x layers, transformers' total_rows
    f_e = jnp.sum(stats["counts"], axis=0) / rows
    p_e = jnp.sum(stats["prob_sums"], axis=0) / rows
    return {
        "aux": n_experts * jnp.sum(f_e * p_e),
        "z": jnp.sum(stats["z_sum"]) / rows,
        "load": jax.lax.stop_gradient(f_e / k),
    }


class MoE(nnx.Module):
    """The sparse feed-forward of one layer: router [D, E] and the experts' stacked SwiGLU weights.
    `cfg` is the model's LlamaConfig (n_experts, experts_per_token, moe_mlp_dim, norm_topk_prob);
    `make_param(init, shape, axes)` creates one parameter."""

    def __init__(self, cfg, make_param: Callable, activation: Callable):
        d, f, e = cfg.d_model, cfg.moe_mlp_dim, cfg.n_experts
        self.k, self.norm_topk_prob, self.activation = cfg.experts_per_token, cfg.norm_topk_prob, activation
        self.capacity_factor = cfg.capacity_factor
        fan_in = jax.nn.initializers.normal
        self.router = make_param(fan_in(d**-0.5), (d, e), ("embed", "expert"))
        self.gate_proj = make_param(fan_in(d**-0.5), (e, d, f), ("expert", "embed", "mlp"))
        self.up_proj = make_param(fan_in(d**-0.5), (e, d, f), ("expert", "embed", "mlp"))
        down_std = f**-0.5 / (2 * cfg.n_layers) ** 0.5
        self.down_proj = make_param(fan_in(down_std), (e, f, d), ("expert", "mlp", "embed"))

    def __call__(
        self, x_btd: jax.Array, real_bt: jax.Array, dropless: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(output [B, T, D], this layer's `router_stats`); `real_bt` marks real tokens (what the
        router losses count; padding goes last under a capacity). `dropless` ignores the capacity
        factor (generation: a prefill's capacity would depend on its length)."""
        factor = 0.0 if dropless else self.capacity_factor
        weights = (self.router[...], self.gate_proj[...], self.up_proj[...], self.down_proj[...])
        layer = functools.partial(
            _layer, k=self.k, norm=self.norm_topk_prob, act=self.activation, factor=factor
        )
        return _per_batch_shard(layer, x_btd, real_bt, weights)


def _layer(x_btd, real_bt, weights, *, k, norm, act, factor, expert_axis=None):
    """Route and dispatch the tokens of [B, T, D] (all of them, or one batch shard's; with
    `expert_axis`, the experts are this device's share and assignments travel by all-to-all)."""
    router, gate, up, down = weights
    b, t, d = x_btd.shape
    x_td = x_btd.reshape(b * t, d)
    real_t = real_bt.reshape(b * t)
    logits_te = checkpoint_name(jnp.einsum("TD,DE->TE", x_td, router.astype(x_td.dtype)), "router_logits")
    weights_tk, experts_tk, probs_te = route(logits_te, k, norm)
    if expert_axis is not None:
        if factor > 0:
            raise ValueError(
                f"capacity_factor={factor}: expert parallelism (config.mesh.expert > 1) is dropless only"
            )
        y_td = dispatch_ep(x_td, experts_tk, weights_tk, gate, up, down, act, expert_axis)
        return y_td.reshape(b, t, d), router_stats(logits_te, probs_te, experts_tk, real_t)
    cap = capacity(b * t, k, probs_te.shape[-1], factor) if factor > 0 else None
    y_td = dispatch(x_td, experts_tk, weights_tk, gate, up, down, act, cap, real_t > 0)
    return y_td.reshape(b, t, d), router_stats(logits_te, probs_te, experts_tk, real_t)


def _per_batch_shard(layer: Callable, x_btd, real_bt, weights):
    """`layer` on each batch shard's own tokens when sharding rules are active (jsft.parallel.sharding):
    a `shard_map` manual over the mesh axes that split the batch, automatic over the others (tensor
    parallelism inside stays GSPMD's), the expert weights gathered over the batch axes as an FSDP
    matmul would, and the router statistics summed over the shards. Without it GSPMD would gather
    every shard's assignments to sort them globally, so every device would route and run the experts
    for the whole batch. A capacity then holds per shard (GShard's groups)."""
    active = sharding.active()
    if active is None:
        return layer(x_btd, real_bt, weights)
    mesh, rules = active
    axes = tuple(a for a in rules.get("batch", ()) if a in mesh.shape and mesh.shape[a] > 1)
    if not axes or x_btd.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return layer(x_btd, real_bt, weights)
    rows, whole = jax.sharding.PartitionSpec(axes), jax.sharding.PartitionSpec()
    # Expert parallelism: the `expert` rule's mesh axis, when it splits the batch too and the experts.
    ep = [a for a in rules.get("expert", ()) if a in axes and weights[1].shape[0] % mesh.shape[a] == 0]
    experts = jax.sharding.PartitionSpec(ep[0]) if ep else whole
    if ep:
        layer = functools.partial(layer, expert_axis=ep[0])

    def shard(x, real, weights):
        y, stats = layer(x, real, weights)
        return y, jax.tree.map(lambda v: jax.lax.psum(v, axes), stats)

    return jax.shard_map(
        shard,
        mesh=mesh,
        in_specs=(rows, rows, (whole, experts, experts, experts)),
        out_specs=(rows, whole),
        axis_names=frozenset(axes),
    )(x_btd, real_bt, weights)
