"""SFT objectives: GEM against an independent NumPy transcription of the paper's formula, the fused
chunked kernel against full-logit autodiff for every term, label smoothing and z-loss by definition,
NEFTune only in training and scaled by each example's own length, and every objective unchanged by
packing and by gradient accumulation; plain CE stays bitwise today's step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jsft.data import packing
from jsft.models.llama import LlamaConfig
from jsft.models.registry import ModelDef
from jsft.train import token_terms
from jsft.train.objectives import Objective
from jsft.train.state import TrainState
from jsft.train.step import batch_terms, make_train_step
from jsft.train.token_terms import Terms, chunked_terms, reference_terms
from tests.train.test_step import VOCAB, _examples, _optim_cfg, _padded

jax.config.update("jax_default_matmul_precision", "float32")


def _gem_numpy(logits, y, beta, h):
    """Li et al. 2024, eq. for the GEM loss per token, as their reference code computes it:
    -sum_v q_v w_v (log p_y - log p_v), q = softmax(logits / beta), w = 1 or sigmoid(0.01 (l_v - l_y))."""
    logits = np.asarray(logits, np.float64)
    log_p = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    z = logits / beta
    q = np.exp(z - z.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    l_y = np.take_along_axis(logits, y[..., None], -1)
    w = np.ones_like(logits) if h == "linear" else 1 / (1 + np.exp(-0.01 * (logits - l_y)))
    log_p_y = np.take_along_axis(log_p, y[..., None], -1)
    return -np.sum(q * w * (log_p_y - log_p), -1)


def _gem_grad_numpy(logits, y, beta, h):
    """d loss / d logits with q and w constant: q_v w_v - [v = y] sum_u q_u w_u (derived by hand)."""
    logits = np.asarray(logits, np.float64)
    z = logits / beta
    q = np.exp(z - z.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    l_y = np.take_along_axis(logits, y[..., None], -1)
    w = np.ones_like(logits) if h == "linear" else 1 / (1 + np.exp(-0.01 * (logits - l_y)))
    onehot = np.eye(logits.shape[-1])[y]
    return q * w - onehot * np.sum(q * w, -1, keepdims=True)


@pytest.mark.parametrize("h", ["linear", "log_sigmoid"])
@pytest.mark.parametrize("beta", [0.7, 1.0])
def test_gem_value_and_gradient_match_the_papers_formula(h, beta):
    logits = np.array([[[2.0, -1.0, 0.5, 3.0, -2.0], [0.0, 0.1, -0.3, 1.5, 40.0]]], np.float32)
    y = np.array([[3, 1]])
    terms = Terms(gem_beta=beta, gem_h=h)
    value = reference_terms(jnp.asarray(logits), jnp.asarray(y), terms)["gem"]
    np.testing.assert_allclose(value, _gem_numpy(logits, y, beta, h), rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda lg: reference_terms(lg, jnp.asarray(y), terms)["gem"].sum())(jnp.asarray(logits))
    np.testing.assert_allclose(grad, _gem_grad_numpy(logits, y, beta, h), rtol=1e-5, atol=1e-6)
    if beta == 1.0 and h == "linear":  # GEM's gradient is CE's at beta = 1 (the paper's remark)
        p = np.asarray(jax.nn.softmax(logits))
        np.testing.assert_allclose(grad, p - np.eye(5)[y], rtol=1e-5, atol=1e-6)


def test_label_smoothing_and_z_loss_by_definition():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 11)) * 3
    y = jnp.array([[0, 5, 10], [3, 3, 7]])
    t = reference_terms(logits, y, Terms(z=True, smooth=True))
    log_p = jax.nn.log_softmax(logits)
    np.testing.assert_allclose(t["smooth"], -jnp.mean(log_p, -1), rtol=1e-5)
    np.testing.assert_allclose(t["z"], jax.nn.logsumexp(logits, -1) ** 2, rtol=1e-5)
    main, logged = Objective("ce", label_smoothing=0.1, z_loss=1e-2).combine(t)
    smoothed = -(0.9 * jnp.take_along_axis(log_p, y[..., None], -1)[..., 0] + 0.1 * jnp.mean(log_p, -1))
    np.testing.assert_allclose(main, smoothed + 1e-2 * t["z"], rtol=1e-5)
    assert set(logged) == {"ce", "smoothed_ce", "z"}


@pytest.mark.parametrize("softcap", [0.0, 5.0])
@pytest.mark.parametrize(
    "terms",
    [Terms(z=True, smooth=True), Terms(gem_beta=0.7), Terms(gem_beta=0.5, gem_h="log_sigmoid", z=True)],
)
def test_the_fused_kernel_equals_full_logit_autodiff(monkeypatch, terms, softcap):
    monkeypatch.setattr(token_terms, "VOCAB_BLOCK", 16)  # 37 columns: blocks of 16, the last overlapping
    kx, kh, kt, kg = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(kx, (2, 9, 8))
    head = jax.random.normal(kh, (8, 37)) * 0.5
    y = jax.random.randint(kt, (2, 9), 0, 37)
    cot = {k: jax.random.uniform(jax.random.fold_in(kg, i), (2, 9)) for i, k in enumerate(terms.names())}

    def reference(x, head):
        logits = jnp.einsum("btd,dv->btv", x, head)
        if softcap:
            logits = jnp.tanh(logits / softcap) * softcap
        t = reference_terms(logits, y, terms)
        return sum(jnp.sum(t[k] * cot[k]) for k in cot), t

    def fused(x, head):
        t = chunked_terms(x, head, y, softcap, 4, terms)
        return sum(jnp.sum(t[k] * cot[k]) for k in cot), t

    (_, t_ref), g_ref = jax.value_and_grad(reference, argnums=(0, 1), has_aux=True)(x, head)
    (_, t_fus), g_fus = jax.value_and_grad(fused, argnums=(0, 1), has_aux=True)(x, head)
    for k in terms.names():
        np.testing.assert_allclose(t_fus[k], t_ref[k], rtol=1e-5, atol=1e-5)
    for a, b in zip(g_fus, g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


OBJECTIVES = [
    Objective("gem", gem_beta=0.7),
    Objective("gem", gem_beta=0.6, gem_h="log_sigmoid", z_loss=1e-3),
    Objective("ce", label_smoothing=0.1, z_loss=1e-3),
]


@pytest.fixture(scope="module")
def model():
    return ModelDef.create(LlamaConfig.tiny(vocab_size=VOCAB))


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: f"{o.name}-{o.gem_h}-{o.label_smoothing}")
@pytest.mark.parametrize("implementation", ["chunked", "reference"])
def test_packing_does_not_change_any_objective(model, objective, implementation):
    params = model.init(jax.random.key(0))
    examples = _examples(6)
    packed, padded = packing.pack(examples, 32), _padded(examples, 32)

    def mean_loss(batch):
        main, _ = batch_terms(model, params, batch, objective, implementation)
        mask = jnp.asarray(batch["loss_mask"], jnp.float32)
        return jnp.sum(main * mask) / jnp.sum(mask)

    np.testing.assert_allclose(mean_loss(packed), mean_loss(padded), rtol=1e-5)


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: f"{o.name}-{o.gem_h}-{o.label_smoothing}")
def test_accumulation_equals_one_big_batch_for_every_objective(model, objective):
    batch = _padded(_examples(8, seed=5), 16)
    schedule = optax.constant_schedule(0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(schedule))
    results = []
    for accum in (1, 4):
        step = jax.jit(make_train_step(model, tx, schedule, accum, objective=objective))
        results.append(step(TrainState.create(model.init(jax.random.key(0)), tx, jax.random.key(1)), batch))
    (s1, m1), (s4, m4) = results
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    for k in m1:
        if k.startswith("loss/"):
            np.testing.assert_allclose(m1[k], m4[k], rtol=1e-6)
    assert "loss/ce" in m1 and m1["loss/ce"] != m1["loss"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s1.params, s4.params)


def test_plain_ce_is_bitwise_the_step_without_an_objective(model):
    cfg = _optim_cfg()
    schedule = optax.constant_schedule(1e-2)
    tx = optax.adamw(schedule)
    batch = packing.pack(_examples(8), 32)
    out = []
    for objective in (None, Objective()):
        step = jax.jit(make_train_step(model, tx, schedule, objective=objective))
        state = TrainState.create(model.init(jax.random.key(0)), tx, jax.random.key(1))
        for _ in range(3):
            state, metrics = step(state, batch)
        out.append((state, metrics))
    assert cfg is not None and "loss/ce" not in out[1][1]
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), out[0][0], out[1][0]
    )


def test_neftune_noise_is_training_only_and_scaled_by_each_examples_length():
    import dataclasses  # noqa: PLC0415

    base = ModelDef.create(LlamaConfig.tiny(vocab_size=VOCAB))
    noisy = ModelDef.create(dataclasses.replace(base.config, neftune_alpha=5.0))
    params = base.init(jax.random.key(0))
    batch = packing.pack(_examples(6), 32)
    args = (jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]), jnp.asarray(batch["segment_ids"]))
    # Without an rng (evaluation, generation) the model is the plain one.
    np.testing.assert_array_equal(noisy.apply(params, *args), base.apply(params, *args))
    module = noisy.module(params)
    clean = module._embed(args[0])
    noise = np.asarray(module._neftune(clean, args[2], jax.random.key(3)) - clean)
    seg = np.asarray(batch["segment_ids"])
    assert np.all(noise[seg == 0] == 0)
    for r in range(seg.shape[0]):
        for s in set(seg[r]) - {0}:
            length = int((seg[r] == s).sum())
            bound = 5.0 / np.sqrt(length * base.config.d_model)
            block = np.abs(noise[r][seg[r] == s])
            assert block.max() <= bound * (1 + 1e-5) and block.max() > 0.8 * bound
    with_rng = noisy.apply(params, *args, jax.random.key(3))
    assert not np.allclose(with_rng, base.apply(params, *args))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["--config.loss.objective=gem", "--config.loss.gem_beta=1.5"],
            "config.loss.gem_beta=1.5 must be in (0, 1]",
        ),
        (
            ["--config.loss.objective=gem", "--config.loss.gem_h=tanh"],
            "config.loss.gem_h='tanh' is not one of",
        ),
        (["--config.loss.objective=dpo"], "config.loss.objective='dpo' is not one of"),
        (["--config.loss.neftune_alpha=-1"], "config.loss.neftune_alpha=-1.0 must be >= 0"),
        (["--config.loss.label_smoothing=1.0"], "config.loss.label_smoothing=1.0 must be in [0, 1)"),
        (["--config.model.dropout_residual=1.5"], "config.model.dropout_residual=1.5 must be in [0, 1)"),
    ],
)
def test_bad_objective_settings_are_one_line(tiny_data_dir, tmp_path, overrides, message):
    from tests.train.test_peft_run import _main, _one_error  # noqa: PLC0415

    assert message in _one_error(_main(tiny_data_dir, tmp_path, *overrides))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_a_gem_run_logs_each_term_and_evaluates_plain_cross_entropy(tiny_config, tmp_path):
    from jsft.modes.train import train_and_evaluate  # noqa: PLC0415

    tiny_config.loss.objective, tiny_config.loss.z_loss, tiny_config.loss.neftune_alpha = "gem", 1e-3, 5.0
    tiny_config.train.log_every_steps = 2
    summary = train_and_evaluate(tiny_config, str(tmp_path))
    rows = [__import__("json").loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "train/loss" in r]
    assert logged and all({"train/loss/ce", "train/loss/gem", "train/loss/z"} <= set(r) for r in logged)
    assert "eval/loss" in summary and "eval/loss/gem" not in summary
    assert (tmp_path / "report.png").stat().st_size > 1000  # the run's curves, written at the end


def test_prompt_weight_and_example_weights_set_each_tokens_weight():
    from jsft.train.losses import cross_entropy_sums, token_weights  # noqa: PLC0415

    examples = _examples(4, seed=7)
    weighted = [
        packing.Example(ex.ids, ex.mask, 0, w) for ex, w in zip(examples, [1.0, 0.0, 2.0, 0.5], strict=True)
    ]
    batch = {k: jnp.asarray(v) for k, v in packing.pack(weighted, 40).items()}
    seg, mask = np.asarray(batch["segment_ids"]), np.asarray(batch["loss_mask"])
    w = np.asarray(token_weights(batch["loss_mask"], batch["segment_ids"], "token", 0.25, batch["weight"]))
    expect = (mask + 0.25 * ((seg > 0) & (mask == 0))) * np.asarray(batch["weight"])
    np.testing.assert_array_equal(w, expect)
    assert np.all(w[seg == 0] == 0)
    # The loss is the weighted mean: an example of weight 0 changes nothing, weight 2 counts twice.
    nll = jnp.asarray(np.random.default_rng(0).random(mask.shape), jnp.float32)
    sums = cross_entropy_sums(nll, batch)
    manual = np.sum(np.asarray(nll) * mask * np.asarray(batch["weight"])) / np.sum(
        mask * np.asarray(batch["weight"])
    )
    np.testing.assert_allclose(sums["loss_sum"] / sums["weight_sum"], manual, rtol=1e-6)
    assert float(sums["target_tokens"]) == mask.sum()  # counts stay unweighted


def test_weighted_examples_and_prompt_weight_are_the_same_packed_or_unpacked(model):
    examples = [
        packing.Example(ex.ids, ex.mask, 0, w)
        for ex, w in zip(_examples(6), [1, 0.5, 2, 0, 1, 3], strict=True)
    ]
    packed, padded = packing.pack(examples, 32), _padded(examples, 32)
    schedule = optax.constant_schedule(0.1)
    tx = optax.sgd(schedule)
    objective = Objective(prompt_weight=0.3)
    out = []
    for batch in (packed, padded):
        step = jax.jit(make_train_step(model, tx, schedule, objective=objective))
        out.append(step(TrainState.create(model.init(jax.random.key(0)), tx, jax.random.key(1)), batch)[1])
    np.testing.assert_allclose(out[0]["loss"], out[1]["loss"], rtol=1e-5)
    np.testing.assert_allclose(out[0]["grad_norm"], out[1]["grad_norm"], rtol=1e-5)


def test_dropout_is_training_only_deterministic_and_scaled():
    import dataclasses  # noqa: PLC0415

    from jsft.models.llama import dropout  # noqa: PLC0415

    x = jnp.ones((4, 1000))
    y = dropout(x, 0.25, jax.random.key(0))
    kept = np.asarray(y) != 0
    assert abs(kept.mean() - 0.75) < 0.02 and np.allclose(np.asarray(y)[kept], 1 / 0.75)
    assert dropout(x, 0.25, None) is x
    base = ModelDef.create(LlamaConfig.tiny(vocab_size=VOCAB))
    dropped = ModelDef.create(dataclasses.replace(base.config, dropout_embed=0.1, dropout_residual=0.1))
    params = base.init(jax.random.key(0))
    tokens = jnp.arange(24).reshape(2, 12) % VOCAB
    np.testing.assert_array_equal(dropped.apply(params, tokens), base.apply(params, tokens))  # eval: off
    a, b = (
        dropped.apply(params, tokens, rng=jax.random.key(1)),
        dropped.apply(params, tokens, rng=jax.random.key(1)),
    )
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, base.apply(params, tokens))


def test_weighted_examples_and_prompt_weight_accumulate_like_one_big_batch(model):
    weights = [1, 0.5, 2, 0, 1, 3, 0.25, 1]
    examples = [
        packing.Example(ex.ids, ex.mask, 0, w) for ex, w in zip(_examples(8, seed=5), weights, strict=True)
    ]
    batch = _padded(examples, 16)
    schedule = optax.constant_schedule(0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(schedule))
    results = []
    for accum in (1, 4):
        step = jax.jit(make_train_step(model, tx, schedule, accum, objective=Objective(prompt_weight=0.3)))
        results.append(step(TrainState.create(model.init(jax.random.key(0)), tx, jax.random.key(1)), batch))
    (s1, m1), (s4, m4) = results
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s1.params, s4.params)
