import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jsft.data import packing
from jsft.models.llama import LlamaConfig
from jsft.models.registry import ModelDef
from jsft.train import losses, optim
from jsft.train.state import TrainState
from jsft.train.step import make_eval_step, make_train_step

jax.config.update("jax_default_matmul_precision", "float32")
VOCAB = 64


def _examples(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p, r = rng.integers(4, 9), rng.integers(2, 7)
        ids = rng.integers(1, VOCAB, p + r).astype(np.int32)
        out.append(packing.Example(ids, np.array([False] * p + [True] * r)))
    return out


def _padded(examples, seq_len):
    """One example per row: the unpacked reference."""
    rows = [packing.pack([ex], seq_len) for ex in examples]
    return {k: np.concatenate([r[k] for r in rows]) for k in packing.ROW_KEYS}


def _optim_cfg(**kw):
    cfg = ml_collections.ConfigDict(
        dict(
            lr=1e-2,
            warmup_steps=0,
            decay="constant",
            final_lr_ratio=1.0,
            weight_decay=0.0,
            b1=0.9,
            b2=0.99,
            eps=1e-8,
            clip_norm=0.0,
            grad_accum_steps=1,
        )
    )
    cfg.update(kw)
    return cfg


@pytest.fixture(scope="module")
def model():
    return ModelDef.create(LlamaConfig.tiny(vocab_size=VOCAB))


# The equivalences below hold for every attention kernel (splash: Pallas interpret mode on CPU).
KERNELS = ["flash", "chunked", "reference", "xla_sdpa", "splash"]


@pytest.fixture(scope="module", params=KERNELS)
def kernel_model(request):
    return ModelDef.create(LlamaConfig.tiny(vocab_size=VOCAB, attention=request.param))


def _state(model, tx, seed=0):
    return TrainState.create(model.init(jax.random.key(seed)), tx, jax.random.key(1))


def test_prompt_tokens_get_zero_gradient(model):
    params = model.init(jax.random.key(0))
    batch = _padded(_examples(4), 24)

    def loss_from_logits(logits):
        return losses.cross_entropy_sums(losses.token_nll(logits, batch["targets"]), batch)["loss_sum"]

    logits = model.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"])
    g = jax.grad(loss_from_logits)(logits)
    untrained = batch["loss_mask"] == 0
    assert untrained.any() and (~untrained).any()
    assert np.all(np.asarray(g)[untrained] == 0.0)
    assert np.all(np.abs(np.asarray(g)[~untrained]).sum(-1) > 0)


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_packed_batch_gives_the_same_loss_as_unpacked(kernel_model, normalization):
    model = kernel_model
    params = model.init(jax.random.key(0))
    examples = _examples(6)
    packed, padded = packing.pack(examples, 32), _padded(examples, 32)
    assert len(packed["inputs"]) < len(padded["inputs"])
    eval_step = jax.jit(make_eval_step(model))

    def loss(batch):
        logits = model.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"])
        s = losses.cross_entropy_sums(losses.token_nll(logits, batch["targets"]), batch, normalization)
        return s["loss_sum"] / s["weight_sum"]

    np.testing.assert_allclose(loss(packed), loss(padded), rtol=1e-5)
    a, b = eval_step(params, packed), eval_step(params, padded)
    np.testing.assert_allclose(a["loss_sum"], b["loss_sum"], rtol=1e-5)
    assert a["target_tokens"] == b["target_tokens"] == sum(ex.mask[1:].sum() for ex in examples)


def test_sequence_normalization_is_the_mean_of_per_example_means(model):
    params = model.init(jax.random.key(0))
    examples = _examples(5, seed=3)
    batch = packing.pack(examples, 40)
    logits = model.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"])
    s = losses.cross_entropy_sums(losses.token_nll(logits, batch["targets"]), batch, "sequence")
    nll = np.asarray(losses.token_nll(logits, batch["targets"]))
    per_example = []
    for r in range(len(batch["inputs"])):
        for seg in set(batch["segment_ids"][r]) - {0}:
            m = (batch["segment_ids"][r] == seg) & (batch["loss_mask"][r] == 1)
            per_example.append(nll[r][m].mean())
    assert float(s["weight_sum"]) == pytest.approx(len(examples))
    np.testing.assert_allclose(s["loss_sum"] / s["weight_sum"], np.mean(per_example), rtol=1e-5)


def _even_rows(batch):
    """The rows padded with an empty row to an even count, so two micro-batches split them."""
    if len(batch["inputs"]) % 2 == 0:
        return batch
    return {k: np.concatenate([v, np.zeros_like(v[:1])]) for k, v in batch.items()}


@pytest.mark.parametrize("weights", [(5, 1, 0.5, 2, 0, 1), (0.25, 0.1, 0.05, 0.3, 0.1, 0.05)])
@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_record_weights_weigh_the_loss_as_documented(model, normalization, weights):
    """The train step's loss equals the weighted mean computed by definition, example by example:
    token: sum_i w_i sum_t l_it / sum_i w_i n_i; sequence: sum_i w_i mean_t l_it / sum_i w_i,
    packed or one example per row, in one batch or two accumulated micro-batches."""
    params = model.init(jax.random.key(0))
    examples = [packing.Example(ex.ids, ex.mask, 0, w) for ex, w in zip(_examples(6), weights, strict=True)]
    sums, counts = [], []
    for ex in examples:  # each example alone through the model: its own token losses, nothing shared
        ids = jnp.asarray(ex.ids[None])
        nll = np.asarray(losses.token_nll(model.apply(params, ids[:, :-1]), ids[:, 1:]), np.float64)[0]
        sums.append(nll[ex.mask[1:]].sum())
        counts.append(ex.mask[1:].sum())
    w, sums, counts = np.array(weights, np.float64), np.array(sums), np.array(counts)
    if normalization == "token":
        expected = np.sum(w * sums) / np.sum(w * counts)
    else:
        expected = np.sum(w * sums / counts) / np.sum(w)
    unweighted = np.sum(sums) / np.sum(counts) if normalization == "token" else np.mean(sums / counts)
    assert abs(expected - unweighted) > 1e-2  # the weights matter here
    tx = optax.sgd(0.1)
    for batch in (packing.pack(examples, 32), _padded(examples, 32)):
        for accum in (1, 2):
            step = jax.jit(make_train_step(model, tx, optax.constant_schedule(0.1), accum, normalization))
            _, m = step(_state(model, tx), _even_rows(batch))
            np.testing.assert_allclose(float(m["loss"]), expected, rtol=1e-6)


def test_a_few_steps_on_a_fixed_batch_reduce_the_loss(model):
    cfg = _optim_cfg()
    schedule = optim.build_schedule(cfg, 10)
    tx = optim.build_optimizer(cfg, schedule)
    step = jax.jit(make_train_step(model, tx, schedule), donate_argnums=0)
    state, batch = _state(model, tx), packing.pack(_examples(8), 32)
    first = None
    for _ in range(10):
        state, m = step(state, batch)
        first = first if first is not None else float(m["loss"])
    assert float(m["loss"]) < 0.5 * first
    assert int(state.step) == 10


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_accumulating_k_micro_batches_equals_one_big_batch(kernel_model, normalization):
    model = kernel_model
    batch = _padded(_examples(8, seed=5), 16)
    results = []
    # Plain SGD, so the updates are the gradients themselves (Adam's first step is sign(g) * lr,
    # which amplifies float rounding on near-zero gradients into lr-sized differences).
    schedule = optax.constant_schedule(0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(schedule))
    for accum in (1, 4):
        step = jax.jit(make_train_step(model, tx, schedule, accum, normalization))
        results.append(step(_state(model, tx), batch))
    (s1, m1), (s4, m4) = results
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s1.params, s4.params)


def test_weight_decay_skips_norms_and_biases():
    mask = optim.decay_mask({"embed": 0, "final_norm": {"scale": 0}, "attn": {"q_bias": 0, "q_proj": 0}})
    assert mask == {"embed": True, "final_norm": {"scale": False}, "attn": {"q_bias": False, "q_proj": True}}


@pytest.mark.parametrize("decay,end", [("cosine", 0.1), ("linear", 0.1), ("constant", 1.0)])
def test_schedule_warms_up_linearly_then_decays(decay, end):
    cfg = _optim_cfg(lr=1.0, warmup_steps=10, decay=decay, final_lr_ratio=0.1)
    s = optim.build_schedule(cfg, 110)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5) and float(s(10)) == pytest.approx(1.0)
    assert float(s(110)) == pytest.approx(end, abs=1e-6)
    if decay != "constant":
        assert float(s(60)) < 1.0


def test_metrics_report_lr_grad_norm_and_target_tokens(model):
    cfg = _optim_cfg(warmup_steps=4, decay="linear", final_lr_ratio=0.0)
    schedule = optim.build_schedule(cfg, 8)
    tx = optim.build_optimizer(cfg, schedule)
    batch = packing.pack(_examples(4), 32)
    state, m = jax.jit(make_train_step(model, tx, schedule))(_state(model, tx), batch)
    state, m2 = jax.jit(make_train_step(model, tx, schedule))(state, batch)
    assert float(m["lr"]) == 0.0 and float(m2["lr"]) == pytest.approx(cfg.lr / 4)
    assert float(m["target_tokens"]) == batch["loss_mask"].sum()
    assert float(m["grad_norm"]) > 0 and jnp.isfinite(m["grad_norm"])


class _PoisonedModel:
    """The real model, whose hidden states (so logits) turn NaN for a batch whose first token is 0."""

    def __init__(self, model):
        self.model, self.config = model, model.config

    def features(self, params, tokens, positions=None, segment_ids=None, rng=None):
        x, head = self.model.features(params, tokens, positions, segment_ids, rng)
        return x * jnp.where(tokens[0, 0] == 0, jnp.nan, 1.0), head


def test_a_nonfinite_step_is_never_applied(model):
    cfg = _optim_cfg()
    schedule = optim.build_schedule(cfg, 10)
    tx = optim.build_optimizer(cfg, schedule)
    step = jax.jit(make_train_step(_PoisonedModel(model), tx, schedule))
    good = packing.pack(_examples(8), 32)
    poisoned = dict(good, inputs=good["inputs"].copy())
    poisoned["inputs"][0, 0] = 0
    state, m = step(_state(model, tx), good)
    assert not bool(m["nonfinite"])
    after, m = step(state, poisoned)
    assert bool(m["nonfinite"]) and not np.isfinite(float(m["loss"]))
    assert int(after.step) == int(state.step) + 1  # the step counts ...
    for a, b in zip(
        jax.tree.leaves((after.params, after.opt_state)),
        jax.tree.leaves((state.params, state.opt_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # ... but changes nothing
    again, m = step(after, good)
    assert not bool(m["nonfinite"])
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(again.params))


def _moe_model(**kw):
    base = dict(n_layers=3, n_experts=4, experts_per_token=2, moe_mlp_dim=32, dense_layers=(1,))
    return ModelDef.create(LlamaConfig.tiny(vocab_size=VOCAB, **{**base, **kw}))


@pytest.mark.slow
def test_a_moe_step_adds_the_router_losses_to_the_loss_and_its_gradient_and_logs_them():
    model = _moe_model(n_layers=2, dense_layers=(), router_aux_loss_coef=0.5, router_z_loss_coef=0.01)
    params = model.init(jax.random.key(0))
    batch = packing.pack(_examples(6), 32)  # packed rows with padding at their ends
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])

    def parts(params):  # (CE over the targets, the coefficients times moe.router_losses), separately
        x, head, router = model.features_and_router(params, *args)
        nll = losses.token_nll(jnp.einsum("BTD,DV->BTV", x, head), batch["targets"])
        s = losses.cross_entropy_sums(nll, batch)
        return s["loss_sum"] / s["weight_sum"], 0.5 * router["aux"] + 0.01 * router["z"], router

    @jax.jit
    def reference(params):
        ce_grads = jax.grad(lambda p: parts(p)[0])(params)
        penalty_grads = jax.grad(lambda p: parts(p)[1])(params)
        return parts(params), ce_grads, penalty_grads

    (ce, penalty, router), ce_grads, penalty_grads = reference(params)
    tx = optax.sgd(1.0)  # new params = params - gradient
    state, m = jax.jit(make_train_step(model, tx, optax.constant_schedule(1.0)))(_state(model, tx), batch)
    np.testing.assert_allclose(m["loss"], ce + penalty, rtol=1e-5)
    np.testing.assert_allclose(m["loss/router_aux"], router["aux"], rtol=1e-5)
    np.testing.assert_allclose(m["loss/router_z"], router["z"], rtol=1e-5)
    np.testing.assert_allclose(m["moe/load"], router["load"], rtol=1e-5)
    assert float(router["aux"]) > 0.5 and float(router["z"]) > 0
    step_grads = jax.tree.map(lambda p, n: p - n, params, state.params)
    expected = jax.tree.map(lambda a, b: a + b, ce_grads, penalty_grads)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=2e-4, atol=1e-6), step_grads, expected)
    assert np.abs(penalty_grads["layers"]["moe"]["router"]).max() > 1e-3  # the router losses' share is real
    # Evaluation reports the cross-entropy alone.
    ev = jax.jit(make_eval_step(model))(params, batch)
    np.testing.assert_allclose(ev["loss_sum"] / ev["weight_sum"], ce, rtol=1e-5)


@pytest.mark.slow
def test_frozen_layers_of_a_mixed_moe_model_stay_frozen_in_both_stacks():
    model = _moe_model()  # layers 0 and 2 in `layers`, layer 1 in `dense_layers`
    tx = optax.adam(1e-2)
    batch = packing.pack(_examples(4), 32)
    step = jax.jit(
        make_train_step(model, tx, optax.constant_schedule(1e-2), layers_train=(False, False, True))
    )
    state = _state(model, tx)
    after, _ = step(state, batch)
    for stack, frozen in (("layers", [True, False]), ("dense_layers", [True])):
        for before, now in zip(
            jax.tree.leaves(state.params[stack]), jax.tree.leaves(after.params[stack]), strict=True
        ):
            for j, is_frozen in enumerate(frozen):
                assert np.array_equal(before[j], now[j]) == is_frozen, (stack, j)
