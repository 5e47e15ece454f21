"""Gradient accumulation on a device mesh: every micro-batch spans every device, and accumulating
equals one big batch (weighted records, both loss normalisations)."""

import os
import sys

import numpy as np

from jsft.train.step import split_micro_batches
from tests import zygote
from tests.conftest import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_micro_batches_interleave_rows_so_each_spans_every_device_block():
    x = np.arange(16)[:, None] * np.ones((1, 3), np.int32)  # row r holds r
    micro = np.asarray(split_micro_batches(x, 4))
    assert micro.shape == (4, 4, 3)
    for i in range(4):
        rows = micro[i, :, 0]
        assert list(rows) == list(range(i, 16, 4))
        assert len({r // 4 for r in rows}) == 4  # a row from each of 4 devices' blocks of 4 rows


SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np, ml_collections
from jsft.data import packing
from jsft.models.llama import LlamaConfig
from jsft.models.registry import ModelDef
from jsft.parallel import sharding
from jsft.parallel.mesh import build_mesh
from jsft.train import optim
from jsft.train.state import TrainState, state_shardings
from jsft.train.step import make_train_step, split_micro_batches

jax.config.update("jax_default_matmul_precision", "float32")
model = ModelDef.create(LlamaConfig.tiny(vocab_size=64))
cfg = ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=0, decay="constant", final_lr_ratio=1.0,
    weight_decay=0.0, b1=0.9, b2=0.99, eps=1e-8, clip_norm=0.0, grad_accum_steps=1))
schedule = optim.build_schedule(cfg, 4); tx = optim.build_optimizer(cfg, schedule)
rng = np.random.default_rng(0)
lengths = rng.integers(4, 14, 40)
weights = rng.choice([0.0, 0.5, 1.0, 5.0], len(lengths))
ex = [packing.Example(rng.integers(1, 64, n).astype(np.int32), np.arange(n) >= 2, 0, w)
      for n, w in zip(lengths, weights)]
batch = {k: v[:16] for k, v in packing.pack(ex, 16).items()}
assert len(batch["inputs"]) == 16
rules = sharding.parse_rules(dict(batch="data,fsdp", embed="fsdp", mlp="tensor", heads="tensor",
    kv_heads="tensor", vocab="tensor", head_dim="", layers="", seq=""))
results = {}
for shape in [(8, 1, 1), (2, 4, 1)]:
    mesh = build_mesh(shape)
    with sharding.use_rules(mesh, rules):
        abstract, shard, _ = state_shardings(model, tx, mesh, rules)
        bs = sharding.batch_sharding(mesh, rules)
        micro = jax.jit(lambda x: split_micro_batches(x, 2), in_shardings=bs)(batch["inputs"])
        # The accumulation axis is whole on every device; each micro-batch's rows are split over all 8.
        assert micro.sharding.spec[0] is None and micro.sharding.spec[1] is not None, micro.sharding.spec
        assert len({s.device for s in micro.addressable_shards if s.data.shape[0] == 2}) == 8
        init = jax.jit(lambda k: TrainState.create(model.init(k), tx, k), out_shardings=shard)
        for accum, norm in [(a, n) for a in (1, 2) for n in ("token", "sequence")]:
            step_fn = make_train_step(model, tx, schedule, accum, norm)
            step = jax.jit(step_fn, in_shardings=(shard, bs), out_shardings=(shard, None))
            state = init(jax.random.key(0))
            for _ in range(3):
                state, m = step(state, batch)
            results[(shape, accum, norm)] = (float(m["loss"]), jax.device_get(state.params))
# Record weights count under both normalisations, and differently.
assert abs(results[((8, 1, 1), 1, "token")][0] - results[((8, 1, 1), 1, "sequence")][0]) > 1e-3
for key, (loss, params) in results.items():
    base_loss, base_params = results[((8, 1, 1), 1, key[2])]
    assert abs(loss - base_loss) < 1e-5 * abs(base_loss), (key, loss, base_loss)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(base_params)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
print("OK", sorted((str(k), v[0]) for k, v in results.items()))
"""


def test_accumulation_on_8_devices_equals_one_big_batch():
    env = cpu_env(8)
    r = zygote.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "OK" in r.stdout
