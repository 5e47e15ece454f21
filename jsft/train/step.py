"""The pure train and eval steps: `train_step(state, batch) -> (state, metrics)`.

Mixture-of-Experts models add `router_aux_loss_coef * aux + router_z_loss_coef * z` (jsft/models/moe.py)
to each micro-batch's loss, weighted by its share of the loss weight (with one micro-batch: exactly
the batch's loss plus the coefficient times the aux loss, as transformers), and log both terms
(`train/loss/router_aux`, `train/loss/router_z`, unscaled) and each expert's share of the assignments
(`train/moe/load/<e>`). Evaluation reports the cross-entropy alone.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jsft.models.registry import ModelDef
from jsft.parallel.sharding import constrain
from jsft.train import qsft, trainable
from jsft.train.chunked_ce import _logits, chunked_nll
from jsft.train.losses import cross_entropy_sums, token_nll, token_weights
from jsft.train.nonfinite import apply_if_finite
from jsft.train.objectives import Objective
from jsft.train.state import TrainState
from jsft.train.token_terms import chunked_terms, reference_terms
from jsft.train.trainable import Mask


def _tree_add(a, b):
    return jax.tree.map(lambda x, y: x + y.astype(x.dtype), a, b)


def split_micro_batches(x_bt: jax.Array, accum: int) -> jax.Array:
    """[B, T] -> [accum, B / accum, T] with micro-batch i = rows i, i + accum, i + 2 * accum, ...

    The batch is split over devices in contiguous blocks of rows, so interleaving puts rows of every
    block (every device) in every micro-batch: no device idles while another works through its rows.
    Micro-batches run one after another under scan; the sum over them is the big batch's.
    """
    micro = jnp.swapaxes(x_bt.reshape(-1, accum, *x_bt.shape[1:]), 0, 1)
    return constrain(micro, (None, "batch", "seq"))


def batch_nll(
    model: ModelDef,
    params: dict,
    batch: dict,
    implementation: str = "chunked",
    chunk: int = 128,
    rng: jax.Array | None = None,
) -> jax.Array:
    """[B, T] float32 NLL of every target of `batch` (masking and weighting are the caller's);
    `rng` turns dropout on (training)."""
    return _nll_and_router(model, params, batch, implementation, chunk, rng)[0]


def _nll_and_router(model, params, batch, implementation, chunk, rng) -> tuple[jax.Array, dict]:
    """(`batch_nll`, the router losses of a MoE model; {} for a dense one)."""
    args = (params, batch["inputs"], batch["positions"], batch["segment_ids"], rng)
    softcap = model.config.final_softcap
    if model.config.n_experts:
        x_btd, head_dv, router = model.features_and_router(*args)
        if implementation == "reference":
            return token_nll(_logits(x_btd, head_dv, softcap)[0], batch["targets"]), router
        return chunked_nll(x_btd, head_dv, batch["targets"], softcap, chunk), router
    if implementation == "reference":
        return token_nll(model.apply(*args), batch["targets"]), {}
    x_btd, head_dv = model.features(*args)
    return chunked_nll(x_btd, head_dv, batch["targets"], softcap, chunk), {}


def _router_sums(sums: dict, router: dict, cfg) -> dict:
    """A MoE micro-batch's sums with the router losses: added to `loss_sum` weighted by the
    micro-batch's `weight_sum` (so the step's division leaves their weighted mean over micro-batches),
    and logged the same way (unscaled), with the experts' load fractions."""
    if not router:
        return sums
    w = jax.lax.stop_gradient(sums["weight_sum"])
    penalty = cfg.router_aux_loss_coef * router["aux"] + cfg.router_z_loss_coef * router["z"]
    return dict(
        sums,
        loss_sum=sums["loss_sum"] + w * penalty,
        term_router_aux=w * jax.lax.stop_gradient(router["aux"]),
        term_router_z=w * jax.lax.stop_gradient(router["z"]),
        moe_load=w * router["load"],
    )


def _per_layer(layers_train: tuple[bool, ...], like: jax.Array) -> jax.Array:
    """[L, 1, 1, ...]: 1 for a layer that trains, 0 for a frozen one, broadcastable to `like`."""
    return jnp.asarray(layers_train, jnp.float32).reshape(-1, *([1] * (like.ndim - 1)))


def _stack_trains(cfg, layers_train: tuple[bool, ...] | None) -> dict[str, tuple[bool, ...]] | None:
    """Per stack of layers (`layers`; MoE models may add `dense_layers`), whether each entry trains."""
    if layers_train is None:
        return None
    return {name: tuple(layers_train[i] for i in ids) for name, ids, _ in cfg.layer_stacks()}


def _in_layers(tree: dict, stacks_train: dict | None, fn: Callable) -> dict:
    """`fn(leaf, per-layer keep)` on the stacked layers' leaves of `tree`; other leaves as they are."""
    if stacks_train is None:
        return tree
    out = dict(tree)
    for name, train in stacks_train.items():
        if name in tree:
            out[name] = jax.tree.map(lambda x, t=train: fn(x, _per_layer(t, x)), tree[name])
    return out


def batch_terms(
    model: ModelDef,
    params: dict,
    batch: dict,
    objective: Objective,
    implementation: str = "chunked",
    chunk: int = 128,
    rng: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """([B, T] per-token loss of `objective`, {term: [B, T]} to log), masking and weighting the
    caller's, as `batch_nll`."""
    return _terms_and_router(model, params, batch, objective, implementation, chunk, rng)[:2]


def _terms_and_router(model, params, batch, objective, implementation, chunk, rng) -> tuple:
    """(*`batch_terms`, the router losses of a MoE model; {} for a dense one)."""
    args = (params, batch["inputs"], batch["positions"], batch["segment_ids"], rng)
    softcap = model.config.final_softcap
    router = {}
    if model.config.n_experts:
        x_btd, head_dv, router = model.features_and_router(*args)
        if implementation == "reference":
            terms = reference_terms(_logits(x_btd, head_dv, softcap)[0], batch["targets"], objective.terms)
        else:
            terms = chunked_terms(x_btd, head_dv, batch["targets"], softcap, chunk, objective.terms)
    elif implementation == "reference":
        terms = reference_terms(model.apply(*args), batch["targets"], objective.terms)
    else:
        x_btd, head_dv = model.features(*args)
        terms = chunked_terms(x_btd, head_dv, batch["targets"], softcap, chunk, objective.terms)
    main, logged = objective.combine(terms, batch.get("qsft_target"), model.config.vocab_size)
    return main, logged, router


def objective_sums(
    model: ModelDef,
    params: dict,
    micro: dict,
    objective: Objective | None,
    normalization: str,
    num_sources: int,
    implementation: str,
    chunk: int,
    rng: jax.Array | None,
) -> dict[str, jax.Array]:
    """The sums of `cross_entropy_sums` for the objective's per-token loss, plus `term_<name>` sums
    (each term weighted like the loss) for logging. Plain CE keeps the CE-only kernel."""
    prompt_weight = objective.prompt_weight if objective is not None else 0.0
    if objective is None or objective.is_plain:
        nll, router = _nll_and_router(model, params, micro, implementation, chunk, rng)
        sums = cross_entropy_sums(nll, micro, normalization, num_sources, prompt_weight)
        return _router_sums(sums, router, model.config)
    main, logged, router = _terms_and_router(model, params, micro, objective, implementation, chunk, rng)
    sums = cross_entropy_sums(main, micro, normalization, num_sources, prompt_weight)
    weights = token_weights(
        micro["loss_mask"], micro["segment_ids"], normalization, prompt_weight, micro.get("weight")
    )
    sums.update({f"term_{k}": jax.numpy.sum(jax.lax.stop_gradient(v) * weights) for k, v in logged.items()})
    return _router_sums(sums, router, model.config)


def qsft_targets(model: ModelDef, aux: dict, mb: dict, gamma: float, chunk: int) -> jax.Array:
    """Q-SFT's Bellman targets for one micro-batch, from the target and behaviour copies."""
    args = (mb["inputs"], mb["positions"], mb["segment_ids"])
    x_t, head_t = model.features(aux["target"], *args)
    x_b, head_b = model.features(aux["behavior"], *args)
    ratio = qsft.max_ratio(x_t, head_t, x_b, head_b, model.config.final_softcap, chunk)
    targets = qsft.bellman_targets(ratio, mb["reward"], mb["loss_mask"], mb["segment_ids"], gamma)
    return jax.lax.stop_gradient(targets)


def _updater(tx: optax.GradientTransformation, grads: dict, stacks_train: dict | None) -> Callable:
    """(params, opt_state) -> the optimizer's update of them; frozen layers' slices keep their values."""

    def update(params, opt_state):
        updates, opt_state = tx.update(grads, opt_state, params)
        new = optax.apply_updates(params, updates)
        for name, train in (stacks_train or {}).items():
            if name in new:
                new[name] = jax.tree.map(
                    lambda n, o, t=train: jnp.where(_per_layer(t, n) > 0, n, o), new[name], params[name]
                )
        return new, opt_state

    return update


def _step_metrics(
    sums: dict, denom: jax.Array, lr: jax.Array, grad_norm: jax.Array, finite: jax.Array
) -> dict:
    """The step's metrics: loss, lr, gradient norm, counts, per-source sums and the objective's terms."""
    metrics = {
        "loss": sums["loss_sum"] / denom,
        "lr": lr,
        "grad_norm": grad_norm,
        "target_tokens": sums["target_tokens"],
        "nonfinite": ~finite,
    }
    metrics.update({k: v for k, v in sums.items() if k.endswith("_by_source")})
    metrics.update({f"loss/{k[len('term_') :]}": v / denom for k, v in sums.items() if k.startswith("term_")})
    if "moe_load" in sums:  # [E]: each expert's share of the routed assignments
        metrics["moe/load"] = sums["moe_load"] / denom
    return metrics


def make_train_step(
    model: ModelDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum_steps: int = 1,
    normalization: str = "token",
    num_sources: int = 0,
    loss_implementation: str = "chunked",
    loss_chunk: int = 128,
    mask: Mask | None = None,
    layers_train: tuple[bool, ...] | None = None,
    objective: Objective | None = None,
) -> Callable:
    """Build the un-jitted step; the loop jits it with donation and explicit shardings. With a
    trainable `mask` (jsft.train.trainable) only those parameters are differentiated and updated.
    With `layers_train` (per layer, from config.train.frozen_layers) the stacked parameters' slices of
    frozen layers get zero gradients and keep their values (no update, no weight decay); their
    optimizer state still exists (the layers are one stacked array) and stays zero."""
    cfg = model.config
    uses_rng = any(
        x > 0 for x in (cfg.lora_dropout, cfg.neftune_alpha, cfg.dropout_embed, cfg.dropout_residual)
    )
    is_qsft = objective is not None and objective.name == "qsft"  # targets per micro-batch, Polyak

    def loss_sums(train_params, frozen_params, micro, rng=None):
        params = trainable.merge(train_params, frozen_params)
        sums = objective_sums(
            model, params, micro, objective, normalization, num_sources, loss_implementation, loss_chunk, rng
        )
        return sums["loss_sum"], sums

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        micro = jax.tree.map(lambda x: split_micro_batches(x, grad_accum_steps), batch)
        train_params, frozen_params = trainable.split(state.params, mask)

        # Dropout keys: one per step and micro-batch, from the state's key (resume replays them).
        step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step) if uses_rng else None

        def accumulate(carry, xs):
            mb, index = xs
            mb = jax.tree.map(lambda x: constrain(x, ("batch", "seq")), mb)
            if is_qsft:
                mb = dict(
                    mb, qsft_target=qsft_targets(model, state.aux, mb, objective.qsft_gamma, loss_chunk)
                )
            rng = None if step_rng is None else jax.random.fold_in(step_rng, index)
            (_, sums), grads = jax.value_and_grad(loss_sums, has_aux=True)(
                train_params, frozen_params, mb, rng
            )
            return _tree_add(carry, (grads, sums)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), train_params)
        first = jax.tree.map(lambda x: x[0], micro)
        if is_qsft:
            first = dict(first, qsft_target=jnp.zeros(first["loss_mask"].shape, jnp.float32))
        sums_shape = jax.eval_shape(loss_sums, train_params, frozen_params, first)[1]
        zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), sums_shape)
        (grads, sums), _ = jax.lax.scan(accumulate, (zeros, zero_sums), (micro, jnp.arange(grad_accum_steps)))

        # Global-batch sums divided once (accumulation keeps the objective); weights may total under 1.
        denom = jnp.where(sums["weight_sum"] > 0, sums["weight_sum"], 1.0)
        # Gradients stay float32 into the optimizer (float32 moments, also for bfloat16 parameters);
        # optax.apply_updates casts each update to its parameter's dtype.
        grads = jax.tree.map(lambda g: g / denom, grads)
        grads = _in_layers(grads, _stack_trains(cfg, layers_train), lambda g, keep: g * keep.astype(g.dtype))
        grad_norm = optax.tree.norm(grads)
        # A NaN/inf loss or gradient is never applied: the step counts, the state stays as it was.
        finite = jnp.isfinite(sums["loss_sum"]) & jnp.isfinite(grad_norm)

        update = _updater(tx, grads, _stack_trains(cfg, layers_train))
        train_params, opt_state = apply_if_finite(finite, update, train_params, state.opt_state)
        params = trainable.merge(train_params, frozen_params)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        if is_qsft:  # the target follows the parameters
            aux = dict(state.aux, target=qsft.polyak(state.aux["target"], params, objective.qsft_polyak))
            new_state = new_state.replace(aux=aux)
        metrics = _step_metrics(sums, denom, schedule(state.step), grad_norm, finite)
        return new_state, metrics

    return train_step


def make_eval_step(
    model: ModelDef, num_sources: int = 0, loss_implementation: str = "chunked", loss_chunk: int = 128
) -> Callable:
    """Sums (not means) of the per-token loss, so the caller can total over any number of batches."""

    def eval_step(params, batch: dict) -> dict:
        batch = {k: v for k, v in batch.items() if k != "weight"}  # evaluation weighs every example alike
        nll = batch_nll(model, params, batch, loss_implementation, loss_chunk)
        return cross_entropy_sums(nll, batch, "token", num_sources)

    return eval_step
