"""Mixed precision: bfloat16 compute over float32 master weights tracks float32 training, and
bfloat16 parameters keep float32 optimizer moments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsft.data import packing
from jsft.models.llama import LlamaConfig
from jsft.models.registry import ModelDef
from jsft.train import optim
from jsft.train.state import TrainState
from jsft.train.step import make_train_step
from tests.train.test_step import _optim_cfg

# The loss curves, compared window by window (20 steps each): no window's mean differs from float32's by
# more than 1% of the initial loss, and the mean over all 200 steps by no more than 3% of float32's.
# (The final loss is ~0.004 on this memorisable task, so a tolerance relative to it would measure noise.)
WINDOW_TOLERANCE, MEAN_TOLERANCE = 0.01, 0.03


def _batches(n=8, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):  # a learnable task: the response repeats the prompt
        examples = []
        for _ in range(12):
            p = rng.integers(3, 60, int(rng.integers(3, 8))).astype(np.int32)
            examples.append(packing.Example(np.concatenate([p, p]), np.arange(2 * len(p)) >= len(p)))
        out.append({k: v[:8] for k, v in packing.pack(examples, 32).items()})
    return out


def _train(param_dtype, compute_dtype, steps=200):
    cfg = LlamaConfig.tiny(vocab_size=64, param_dtype=param_dtype, compute_dtype=compute_dtype)
    model = ModelDef.create(cfg)
    ocfg = _optim_cfg(
        lr=3e-3,
        warmup_steps=10,
        decay="cosine",
        final_lr_ratio=0.1,
        weight_decay=0.01,
        b2=0.98,
        clip_norm=1.0,
    )
    schedule = optim.build_schedule(ocfg, steps)
    tx = optim.build_optimizer(ocfg, schedule)
    state = jax.jit(lambda k: TrainState.create(model.init(k), tx, k))(jax.random.key(0))
    step = jax.jit(make_train_step(model, tx, schedule), donate_argnums=0)
    batches, losses = _batches(), []
    for i in range(steps):
        state, metrics = step(state, batches[i % len(batches)])
        losses.append(float(metrics["loss"]))
    return state, np.asarray(losses)


@pytest.mark.slow
def test_bfloat16_compute_tracks_float32_training_over_200_steps():
    _, fp32 = _train("float32", "float32")
    _, bf16 = _train("float32", "bfloat16")
    assert fp32[-20:].mean() < 0.6 * fp32[:10].mean()  # it learns
    windows = np.abs(fp32.reshape(-1, 20).mean(axis=1) - bf16.reshape(-1, 20).mean(axis=1))
    assert windows.max() < WINDOW_TOLERANCE * fp32[:10].mean(), windows
    assert abs(bf16.mean() - fp32.mean()) < MEAN_TOLERANCE * fp32.mean()


def test_bfloat16_parameters_keep_float32_moments():
    state, losses = _train("bfloat16", "bfloat16", steps=5)
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.bfloat16)}
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert moments and {x.dtype for x in moments} == {jnp.dtype(jnp.float32)}
    assert np.isfinite(losses).all()
