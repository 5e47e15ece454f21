"""The fused, chunked loss equals log-softmax-then-gather on full logits, value and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsft.data import packing
from jsft.models.llama import LlamaConfig
from jsft.models.registry import ModelDef
from jsft.train import chunked_ce, losses, optim
from jsft.train.chunked_ce import chunked_nll
from jsft.train.state import TrainState
from jsft.train.step import make_train_step
from tests.train.test_step import _optim_cfg

jax.config.update("jax_default_matmul_precision", "float32")


@pytest.mark.parametrize(
    "softcap,chunk,vocab_block",
    [(0.0, 8, 64), (0.0, 64, 64), (5.0, 8, 64), (0.0, 5, 64), (0.0, 8, 16), (5.0, 5, 7)],
)
def test_value_and_gradients_equal_the_reference(softcap, chunk, vocab_block, monkeypatch):
    # Vocabulary blocks of 16 or 7 over 50 columns: the last block overlaps the one before it.
    monkeypatch.setattr(chunked_ce, "VOCAB_BLOCK", vocab_block)
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (3, 37, 16))
    head = jax.random.normal(k[1], (16, 50)) * 0.3
    targets = jax.random.randint(k[2], (3, 37), 0, 50)
    weights = jax.random.uniform(k[3], (3, 37))

    def reference(x, head):
        logits = jnp.einsum("BTD,DV->BTV", x, head)
        if softcap:
            logits = jnp.tanh(logits / softcap) * softcap
        return jnp.sum(losses.token_nll(logits, targets) * weights)

    def fused(x, head):
        return jnp.sum(chunked_nll(x, head, targets, softcap, chunk) * weights)

    (a, ga), (b, gb) = (
        jax.value_and_grad(reference, (0, 1))(x, head),
        jax.value_and_grad(fused, (0, 1))(x, head),
    )
    np.testing.assert_allclose(a, b, rtol=1e-6)
    for p, q in zip(ga, gb, strict=True):
        np.testing.assert_allclose(p, q, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_a_train_step_with_the_fused_loss_equals_the_reference_step(tie):
    model = ModelDef.create(
        # The reference attention on both sides: only the loss differs between the two steps.
        LlamaConfig.tiny(
            vocab_size=64, tie_embeddings=tie, final_softcap=3.0 if tie else 0.0, attention="reference"
        )
    )
    cfg = _optim_cfg(weight_decay=0.1, clip_norm=1.0, grad_accum_steps=2)
    schedule = optim.build_schedule(cfg, 5)
    tx = optim.build_optimizer(cfg, schedule)
    rng = np.random.default_rng(0)
    examples = [
        packing.Example(rng.integers(1, 64, n).astype(np.int32), np.arange(n) >= n // 2)
        for n in (9, 14, 20, 7, 22, 12, 16, 5, 18, 11)
    ]
    batch = packing.pack(examples, 24)
    rows = len(batch["inputs"]) // 2 * 2  # two micro-batches
    batch = {k: v[:rows] for k, v in batch.items()}
    states = {}
    for impl in ("reference", "chunked"):
        step = jax.jit(make_train_step(model, tx, schedule, 2, "sequence", 0, impl, 7))
        state = TrainState.create(model.init(jax.random.key(0)), tx, jax.random.key(1))
        for _ in range(3):
            state, metrics = step(state, batch)
        states[impl] = (state, float(metrics["loss"]))
    assert states["chunked"][1] == pytest.approx(states["reference"][1], rel=1e-5)
    for p, q in zip(
        jax.tree.leaves(states["chunked"][0].params),
        jax.tree.leaves(states["reference"][0].params),
        strict=True,
    ):
        # Adam at lr 1e-2 turns float noise in a near-zero gradient into an update of up to ~lr;
        # a wrong loss gradient moves parameters by ~lr, far above 1e-4.
        np.testing.assert_allclose(p, q, atol=1e-4, rtol=1e-4)
