"""Frozen subsets: only the trainable parameters change (bitwise), only they have optimizer state, and
their updates equal those of full fine-tuning when nothing couples them (no clipping)."""

import os
import sys

import jax
import numpy as np
import pytest

from jsft.models.llama import LlamaConfig
from jsft.models.registry import ModelDef
from jsft.modes.train import train_and_evaluate
from jsft.run import Run
from jsft.train import optim, trainable
from jsft.train.state import TrainState, init_fn
from jsft.train.step import make_train_step
from tests import zygote
from tests.train.test_loop import _losses
from tests.train.test_step import _examples, _optim_cfg, _padded

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 64


@pytest.fixture(scope="module")
def model():
    return ModelDef.create(LlamaConfig.tiny(vocab_size=VOCAB))


def _paths(tree):
    return sorted(trainable.param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree))


def test_patterns_select_by_dotted_path_and_split_merges_back(model):
    params = model.abstract_params()
    mask = trainable.trainable_mask(params, trainable=r"layers\.attn\.", frozen="k_proj")
    train, frozen = trainable.split(params, mask)
    assert _paths(train) == ["layers.attn.o_proj", "layers.attn.q_proj", "layers.attn.v_proj"]
    assert "layers.attn.k_proj" in _paths(frozen) and "embed" in _paths(frozen)
    assert _paths(trainable.merge(train, frozen)) == _paths(params)
    assert trainable.trainable_mask(params) is None  # no patterns: everything trains
    n_train, n_total = trainable.count(params, mask)
    assert 0 < n_train < n_total


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(trainable="qproj"), "config.train.trainable='qproj' matches no parameter"),
        (dict(frozen="nothing"), "config.train.frozen='nothing' matches no parameter"),
        (dict(trainable="embed", frozen="embed"), "leaves no parameter to train"),
        (dict(frozen="(embed"), "config.train.frozen='(embed' is not a regular expression"),
    ],
)
def test_patterns_that_select_nothing_are_refused_naming_the_key(model, kw, message):
    with pytest.raises(ValueError, match=message.replace("(", "\\(")):
        trainable.trainable_mask(model.abstract_params(), **kw)


def _run_steps(model, mask, clip_norm, steps=3):
    cfg = _optim_cfg(weight_decay=0.1, clip_norm=clip_norm)
    schedule = optim.build_schedule(cfg, 10)
    tx = optim.build_optimizer(cfg, schedule)
    state = TrainState.create(model.init(jax.random.key(0)), tx, jax.random.key(1), mask)
    step = jax.jit(make_train_step(model, tx, schedule, mask=mask))
    batch = _padded(_examples(6, seed=2), 24)
    for _ in range(steps):
        state, metrics = step(state, batch)
    return state, metrics


def test_only_trainable_parameters_change_and_only_they_have_optimizer_state(model):
    mask = trainable.trainable_mask(model.abstract_params(), frozen="embed|lm_head|norm")
    before = model.init(jax.random.key(0))
    state, _ = _run_steps(model, mask, clip_norm=1.0)
    flat_mask = jax.tree.leaves(mask)
    for m, a, b in zip(flat_mask, jax.tree.leaves(before), jax.tree.leaves(state.params), strict=True):
        if m:
            assert not np.array_equal(np.asarray(a), np.asarray(b))
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bitwise
    # Adam's two moments, one per trainable leaf; none for the frozen ones.
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert len(moments) == 2 * sum(flat_mask)
    train_shapes = sorted(x.shape for x in jax.tree.leaves(trainable.split(state.params, mask)[0]))
    assert sorted(x.shape for x in moments) == sorted(train_shapes * 2)


def test_trainable_updates_equal_full_fine_tuning_without_clipping(model):
    # Without global-norm clipping nothing couples the parameters: AdamW moves each one by its own
    # gradient, which freezing the others does not change.
    mask = trainable.trainable_mask(model.abstract_params(), trainable="mlp")
    frozen_run, m1 = _run_steps(model, mask, clip_norm=0.0, steps=1)
    full_run, m2 = _run_steps(model, None, clip_norm=0.0, steps=1)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    a = trainable.split(frozen_run.params, mask)[0]
    b = trainable.split(full_run.params, mask)[0]
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


def test_a_pattern_matching_nothing_is_one_error_line(tiny_data_dir, tmp_path):
    r = zygote.run(
        [
            sys.executable,
            "-m",
            "jsft.main",
            f"--config={os.path.join(REPO, 'tests', 'tiny_config.py')}:{tiny_data_dir}",
            f"--workdir={tmp_path}",
            "--config.train.frozen=embeddings",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("jsft: error:")]
    assert len(errors) == 1 and "config.train.frozen='embeddings' matches no parameter" in errors[0], errors


@pytest.mark.slow
def test_a_frozen_subset_run_resumes_exactly_and_never_moves_the_frozen_weights(tiny_config, tmp_path):
    tiny_config.train.frozen = r"embed|lm_head|layers\.mlp\."
    tiny_config.train.steps = 12
    tiny_config.train.checkpoint_every_steps = 6
    tiny_config.train.eval_every_steps = 0
    train_and_evaluate(tiny_config, str(tmp_path / "full"))
    resumed = str(tmp_path / "resumed")
    tiny_config.train.stop_after_steps = 6
    assert train_and_evaluate(tiny_config, resumed)["steps"] == 6
    tiny_config.train.stop_after_steps = 0
    assert train_and_evaluate(tiny_config, resumed)["steps"] == 12
    assert _losses(resumed) == _losses(tmp_path / "full")  # bitwise-equal floats on CPU

    run = Run.create(tiny_config, resumed)
    model = run.model(run.tokenizer().vocab_size)
    mask = run.trainable_mask(model)
    initial = jax.jit(init_fn(model, run.optimizer()[0], mask))(jax.random.key(tiny_config.seed)).params
    final, _, step = run.restore_params(model)
    assert step == 12
    for m, a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(initial), jax.tree.leaves(final), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b)) == (not m)  # frozen: bitwise the initial weights


def test_frozen_layers_keep_their_slices_bitwise_and_the_others_train(model):
    assert trainable.frozen_layers("", 4) is None
    assert trainable.frozen_layers("0-1,3", 4) == (False, False, True, False)
    for spec, message in (
        ("2-9", "outside the model's layers 0-3"),
        ("x", "not a layer number"),
        ("0-3", "every"),
    ):
        with pytest.raises(ValueError, match=f"config.train.frozen_layers='{spec}'.*{message}"):
            trainable.frozen_layers(spec, 4)
    layers_train = trainable.frozen_layers("0", model.config.n_layers)
    cfg = _optim_cfg(weight_decay=0.1, clip_norm=1.0)
    schedule = optim.build_schedule(cfg, 10)
    tx = optim.build_optimizer(cfg, schedule)
    before = model.init(jax.random.key(0))
    state = TrainState.create(before, tx, jax.random.key(1))
    step = jax.jit(make_train_step(model, tx, schedule, layers_train=layers_train))
    batch = _padded(_examples(6, seed=2), 24)
    for _ in range(3):
        state, _ = step(state, batch)
    for a, b in zip(jax.tree.leaves(before["layers"]), jax.tree.leaves(state.params["layers"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))  # layer 0: bitwise
        assert not np.array_equal(np.asarray(a[1]), np.asarray(b[1]))  # layer 1 trains
    assert not np.array_equal(np.asarray(before["embed"]), np.asarray(state.params["embed"]))
