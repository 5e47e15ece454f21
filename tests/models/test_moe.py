"""Mixture-of-Experts layers: grouped-matmul dispatch against a per-expert reference, the capacity
factor's drops, the router losses, and MoE decoders (mixed dense/sparse stacks, KV-cache decoding)."""

import contextlib
import dataclasses
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from jsft.models import attention, moe
from jsft.models.llama import REMAT_POLICIES, LlamaConfig
from jsft.models.registry import ModelDef
from jsft.models.rope import rope_tables

jax.config.update("jax_default_matmul_precision", "float32")

T, D, F, E, K = 24, 16, 12, 4, 2


def _layer(seed=0, t=T):
    ks = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(ks[0], (t, D))
    gate = jax.random.normal(ks[1], (E, D, F)) * D**-0.5
    up = jax.random.normal(ks[2], (E, D, F)) * D**-0.5
    down = jax.random.normal(ks[3], (E, F, D)) * F**-0.5
    logits = jax.random.normal(ks[4], (t, E))
    return x, gate, up, down, logits


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_dispatch_equals_the_per_expert_reference_in_values_and_gradients(norm_topk_prob):
    x, gate, up, down, logits = _layer()

    def loss(fn, x, gate, up, down, logits):
        weights, experts, _ = moe.route(logits, K, norm_topk_prob)
        y = fn(x, experts, weights, gate, up, down, jax.nn.silu)
        return jnp.sum(y * jnp.cos(jnp.arange(D)))  # a non-uniform cotangent

    args = (x, gate, up, down, logits)
    fast, fast_grads = jax.jit(jax.value_and_grad(lambda *a: loss(moe.dispatch, *a), argnums=range(5)))(*args)
    ref, ref_grads = jax.jit(jax.value_and_grad(lambda *a: loss(moe.dense_reference, *a), argnums=range(5)))(
        *args
    )
    np.testing.assert_allclose(fast, ref, rtol=1e-5)
    for name, g, r in zip(("x", "gate", "up", "down", "logits"), fast_grads, ref_grads, strict=True):
        assert np.abs(np.asarray(r)).max() > 0, name  # every input really gets a gradient
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5, err_msg=name)


def test_route_renormalises_only_with_norm_topk_prob():
    logits = jnp.array([[2.0, 1.0, 0.0, -1.0]])
    w, e, p = moe.route(logits, 2, False)
    assert e.tolist() == [[0, 1]]
    np.testing.assert_allclose(w, p[:, :2], rtol=1e-6)
    w, _, _ = moe.route(logits, 2, True)  # = softmax over the chosen logits (Mixtral)
    np.testing.assert_allclose(w, jax.nn.softmax(logits[:, :2]), rtol=1e-6)


def test_capacity_drops_the_latest_overflow_and_padding_first():
    x, gate, up, down, _ = _layer(t=6)
    # Every token picks experts 0 then 1 with weights (0.75, 0.25); token 2 is padding.
    experts = jnp.tile(jnp.array([[0, 1]], jnp.int32), (6, 1))
    weights = jnp.tile(jnp.array([[0.75, 0.25]]), (6, 1))
    valid = jnp.array([True, True, False, True, True, True])
    cap = moe.capacity(6, 2, 4, factor=1.0)  # ceil(1.0 * 6 * 2 / 4) = 3 assignments per expert
    assert cap == 3
    y = moe.dispatch(x, experts, weights, gate, up, down, jax.nn.silu, cap, valid)
    full = moe.dense_reference(x, experts, weights, gate, up, down, jax.nn.silu)
    # Kept: real tokens 0, 1, 3 (earliest first; padding token 2 goes last); dropped: 2, 4, 5.
    np.testing.assert_allclose(y[jnp.array([0, 1, 3])], full[jnp.array([0, 1, 3])], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y[jnp.array([2, 4, 5])], 0.0)
    # A token dropped by one expert keeps its other expert's share (weights are not renormalised).
    weights2 = jnp.tile(jnp.array([[0.75, 0.25]]), (6, 1))
    experts2 = jnp.array([[0, 1], [0, 1], [0, 1], [0, 1], [2, 1], [3, 1]], jnp.int32)
    y2 = moe.dispatch(x, experts2, weights2, gate, up, down, jax.nn.silu, 4, None)  # expert 1 takes 4
    only_first = moe.dense_reference(x, experts2[:, :1], weights2[:, :1], gate, up, down, jax.nn.silu)
    np.testing.assert_allclose(y2[4:], only_first[4:], rtol=1e-5, atol=1e-6)
    # Without a cap nothing is dropped.
    y3 = moe.dispatch(x, experts, weights, gate, up, down, jax.nn.silu, None, valid)
    np.testing.assert_allclose(y3, full, rtol=1e-5, atol=1e-6)


def test_router_losses_follow_the_switch_formula_over_real_tokens():
    _, _, _, _, logits = _layer()
    real = jnp.arange(T) < 20  # the last 4 tokens are padding
    layers = [logits, logits[::-1] * 2.0]
    stats = []
    for lg in layers:
        _, experts, probs = moe.route(lg, K, False)
        stats.append(moe.router_stats(lg, probs, experts, real))
    losses = moe.router_losses(jax.tree.map(lambda *s: jnp.stack(s), *stats), K)
    # The formula written out over the real tokens of both layers.
    lg = jnp.concatenate([layer[np.asarray(real)] for layer in layers])
    p = jax.nn.softmax(lg)
    chosen = jax.nn.one_hot(jax.lax.top_k(p, K)[1], E).sum(1)
    expected = E * jnp.sum(chosen.mean(0) * p.mean(0))
    np.testing.assert_allclose(losses["aux"], expected, rtol=1e-6)
    np.testing.assert_allclose(losses["z"], jnp.mean(jax.nn.logsumexp(lg, -1) ** 2), rtol=1e-6)
    np.testing.assert_allclose(losses["load"], chosen.mean(0) / K, rtol=1e-6)
    np.testing.assert_allclose(jnp.sum(losses["load"]), 1.0, rtol=1e-6)


def _moe_config(**kw):
    base = dict(n_layers=4, n_experts=4, experts_per_token=2, moe_mlp_dim=24, dense_layers=(0, 2))
    return LlamaConfig.tiny(vocab_size=64, **{**base, **kw})


def test_mixed_dense_and_sparse_layers_are_two_stacks_run_in_depth_order():
    cfg = _moe_config()
    assert cfg.layer_stacks() == (("layers", (1, 3), True), ("dense_layers", (0, 2), False))
    assert [r[:2] for r in cfg.layer_runs()] == [
        ("dense_layers", 0),
        ("layers", 0),
        ("dense_layers", 1),
        ("layers", 1),
    ]
    model = ModelDef.create(cfg)
    params = model.init(jax.random.key(0))
    assert params["layers"]["moe"]["gate_proj"].shape == (2, 4, 64, 24)
    assert params["dense_layers"]["mlp"]["gate_proj"].shape == (2, 64, 128)
    assert cfg.num_params() == sum(x.size for x in jax.tree.leaves(params))
    assert cfg.active_params() == cfg.num_params() - 2 * 2 * 3 * 64 * 24  # 2 of 4 experts idle, 2 layers
    axes = model.logical_axes()["layers"]["moe"]
    assert axes["gate_proj"] == ("layers", "expert", "embed", "mlp")
    assert axes["router"] == ("layers", "embed", "expert")

    # The forward equals running the layers one at a time in depth order, each from its own stack.
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)))
    layer_by_layer = jax.jit(lambda p, t: _layer_by_layer(model, p, t))(params, tokens)
    np.testing.assert_allclose(jax.jit(model.apply)(params, tokens), layer_by_layer, atol=1e-5)


def _layer_by_layer(model, params, tokens):
    cfg, module = model.config, model.module(params)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    start = attention.Mask.from_segments(jnp.ones((b, t), jnp.int32)).start_bt
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, start)
    x = module._embed(tokens)
    where = {i: (name, j) for name, ids, _ in cfg.layer_stacks() for j, i in enumerate(ids)}
    for i in range(cfg.n_layers):
        name, j = where[i]
        graphdef, state = nnx.split(getattr(module, name))
        block = nnx.merge(graphdef, jax.tree.map(lambda a, j=j: a[j], state))
        x, _, _ = block(x, cos, sin, attention.Mask(start, 0, False), real_bt=jnp.ones((b, t), bool))
    return module._logits(module.final_norm(x))


@pytest.mark.slow
def test_kv_cache_decoding_of_a_mixed_moe_model_matches_the_full_forward():
    cfg = _moe_config(capacity_factor=1.0)  # generation is dropless whatever the training capacity
    model = ModelDef.create(cfg)
    params = model.init(jax.random.key(3))
    prompt = np.random.default_rng(1).integers(1, 64, (1, 7)).astype(np.int32)
    decode = jax.jit(lambda p, *a: model.module(p).cached_forward(*a))
    cache = model.module(params).init_cache(1, 16)
    logits, cache = decode(
        params, jnp.asarray(prompt), jnp.zeros(1, jnp.int32), jnp.ones((1, 7), bool), cache
    )
    dropless = jax.jit(ModelDef.create(dataclasses.replace(cfg, capacity_factor=0.0)).apply)
    full = dropless(params, prompt)
    np.testing.assert_allclose(logits, full, atol=1e-5)
    nxt = jnp.argmax(logits[:, -1:], -1).astype(jnp.int32)
    step, _ = decode(params, nxt, jnp.full(1, 7, jnp.int32), jnp.ones((1, 1), bool), cache)
    full8 = dropless(params, np.concatenate([prompt, np.asarray(nxt)], 1))
    np.testing.assert_allclose(step[:, 0], full8[:, -1], atol=1e-5)


def test_moe_configs_that_cannot_work_are_refused_by_name():
    with pytest.raises(ValueError, match="experts_per_token=5 must be in 1..n_experts=4"):
        _moe_config(experts_per_token=5)
    with pytest.raises(ValueError, match="every layer is in dense_layers"):
        _moe_config(dense_layers=(0, 1, 2, 3))
    with pytest.raises(ValueError, match=r"dense_layers=\(7,\) must be distinct layers"):
        _moe_config(dense_layers=(7,))
    with pytest.raises(ValueError, match="LoRA/QLoRA on Mixture-of-Experts"):
        _moe_config(lora_rank=4, lora_targets=("attn.q_proj",))
    with pytest.raises(ValueError, match="need n_experts > 0"):
        LlamaConfig.tiny(dense_layers=(0,))


# What the named policies keep of a MoE layer's expert matmuls ([layers, T * k, moe_mlp_dim]: expert_gate
# and expert_up; save_dots_except_mlp recomputes them, as it does a dense MLP's).
EXPERT_ACTIVATIONS_KEPT = {"save_dots": 2, "offload": 2, "save_dots_except_mlp": 0, "full": 0}


@pytest.mark.parametrize(
    "remat",
    [
        r if r in ("save_dots", "save_dots_except_mlp") else pytest.param(r, marks=pytest.mark.slow)
        for r in REMAT_POLICIES
        if r != "none"
    ],
)
def test_every_remat_policy_gives_a_moe_model_the_gradients_of_none(remat):
    cfg = _moe_config(n_layers=2, dense_layers=())
    model, other = ModelDef.create(cfg), ModelDef.create(dataclasses.replace(cfg, remat=remat))
    params = model.init(jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 8)))

    def loss(m, p):
        x, head, router = m.features_and_router(p, tokens)
        return jnp.mean((x @ head) ** 2) + router["aux"] + router["z"]

    g1 = jax.jit(jax.grad(lambda p: loss(model, p)))(params)
    g2 = jax.jit(jax.grad(lambda p: loss(other, p)))(params)
    assert np.abs(np.asarray(g1["layers"]["moe"]["router"])).max() > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g2)
    if remat in EXPERT_ACTIVATIONS_KEPT:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_saved_residuals(lambda p: loss(other, p), params)
        kept = re.findall(r"f32(?:<host>)?\[2,32,24\] output of scan", out.getvalue())
        assert len(kept) == EXPERT_ACTIVATIONS_KEPT[remat], out.getvalue()


EXPERT_PARALLEL = r"""
import jax, numpy as np, optax
from jsft.models.llama import LlamaConfig
from jsft.models.registry import ModelDef
from jsft.parallel import sharding
from jsft.parallel.mesh import build_mesh
from jsft.train.state import TrainState
from jsft.train.step import make_train_step
jax.config.update("jax_default_matmul_precision", "float32")
cfg = LlamaConfig.tiny(vocab_size=64, n_layers=2, n_experts=8, experts_per_token=2, moe_mlp_dim=24,
                       router_aux_loss_coef=0.01, router_z_loss_coef=0.001)
model = ModelDef.create(cfg)
params = model.init(jax.random.key(0))
ids = np.random.default_rng(0).integers(0, 64, (8, 3, 8))  # 3 steps of [8, 8]
batches = [dict(inputs=i, targets=np.roll(i, -1, 1), positions=np.broadcast_to(np.arange(8), (8, 8)),
                segment_ids=np.ones((8, 8), np.int32), loss_mask=np.ones((8, 8), np.int32))
           for i in ids.transpose(1, 0, 2)]
# SGD for the training run: Adam divides by sqrt(v), which turns 1e-7 noise on near-zero gradients into
# lr-sized steps (measured: 1e-4 apart after 3 Adam steps with equal losses and gradients to 1e-6).
tx = optax.sgd(0.5)
step = jax.jit(make_train_step(model, tx, optax.constant_schedule(0.5)))
sgd = jax.jit(make_train_step(model, optax.sgd(1.0), optax.constant_schedule(1.0)))  # params - grads

def run(mesh=None, rules=None):
    ctx = sharding.use_rules(mesh, rules) if mesh else __import__("contextlib").nullcontext()
    with ctx:
        p = params
        if mesh:
            shardings = sharding.param_shardings(model.abstract_params(), model.logical_axes(), mesh, rules)
            p = jax.device_put(params, shardings)
        place = (lambda b: jax.device_put(b, sharding.batch_sharding(mesh, rules))) if mesh else (lambda b: b)
        g_state, g_metrics = sgd(TrainState.create(p, optax.sgd(1.0), jax.random.key(1)), place(batches[0]))
        hlo = sgd.lower(TrainState.create(p, optax.sgd(1.0), jax.random.key(1)), place(batches[0])).as_text()
        assert ("all_to_all" in hlo) == bool(mesh)  # tokens travel to their experts' devices
        grads = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), p, g_state.params)
        state, losses = TrainState.create(p, tx, jax.random.key(1)), []
        for b in batches:
            state, m = step(state, place(b))
            losses.append(float(m["loss"]))
        return float(g_metrics["loss"]), grads, losses, state.params, p

loss1, grads1, losses1, final1, _ = run()
for shape, expert in (((1, 2, 1), 4), ((1, 1, 1), 8)):
    mesh = build_mesh(shape, expert=expert)
    rules = sharding.parse_rules(dict(batch="data,fsdp,expert", embed="fsdp", mlp="tensor", heads="tensor",
                                      kv_heads="tensor", vocab="tensor", head_dim="", layers="", seq="",
                                      expert="expert"))
    loss, grads, losses, final, placed = run(mesh, rules)
    assert placed["layers"]["moe"]["gate_proj"].sharding.spec[1] == "expert"
    grad_err = max(float(np.abs(a - b).max())
                   for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads1)))
    param_err = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(final1)))
    loss_err = max(abs(a - b) for a, b in zip([loss, *losses], [loss1, *losses1]))
    print(f"expert {expert} x fsdp {shape[1]}: loss {loss_err:.1e} grads {grad_err:.1e} "
          f"params {param_err:.1e}", flush=True)
    assert loss_err < 1e-5 and grad_err < 1e-5 and param_err < 1e-5
print("ok")
"""


@pytest.mark.slow
def test_expert_parallel_meshes_give_the_one_device_losses_gradients_and_training():
    import sys  # noqa: PLC0415

    from tests import zygote  # noqa: PLC0415
    from tests.conftest import cpu_env  # noqa: PLC0415

    r = zygote.run(
        [sys.executable, "-c", EXPERT_PARALLEL], env=cpu_env(8), capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[-1] == "ok", r.stdout
