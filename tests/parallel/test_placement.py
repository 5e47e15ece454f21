"""A host batch every process holds whole lands on the mesh row by row, and comes back unchanged."""

import os
import sys

import numpy as np
import pytest

from jsft.parallel.placement import BatchPlacement
from tests import zygote

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_batch_sizes_round_up_to_the_divisor():
    placement = BatchPlacement(divisor=4)
    assert [placement.round_up(n) for n in (1, 4, 5, 8, 50)] == [4, 4, 8, 8, 52]
    assert BatchPlacement().round_up(7) == 7
    with pytest.raises(ValueError, match="divisor=0"):
        BatchPlacement(divisor=0)


def test_without_a_sharding_arrays_pass_through_and_the_hook_runs_once_per_batch():
    calls = []
    placement = BatchPlacement(before_batch=lambda: calls.append(1))
    batch = {"inputs": np.arange(6).reshape(2, 3), "mask": np.ones((2, 3), bool)}
    placed = placement.put_batch(batch)
    assert placed.keys() == batch.keys() and all(placed[k] is batch[k] for k in batch)
    assert placement.put(batch["inputs"]) is batch["inputs"] and calls == [1]


def test_rows_are_split_over_the_batch_axis_and_read_back_whole():
    script = """
import jax, numpy as np
jax.config.update("jax_num_cpu_devices", 4)
from jax.sharding import NamedSharding, PartitionSpec
from jsft.parallel.placement import BatchPlacement
mesh = jax.make_mesh((2, 2), ("data", "fsdp"))
placement = BatchPlacement(NamedSharding(mesh, PartitionSpec(("data", "fsdp"))),
                           NamedSharding(mesh, PartitionSpec()), divisor=4)
tokens = np.arange(4 * 3, dtype=np.int32).reshape(4, 3)
placed = placement.put_batch({"tokens": tokens, "lengths": np.array([1, 2, 3, 4])})
shards = sorted((s.index[0].start, np.asarray(s.data).tolist()) for s in placed["tokens"].addressable_shards)
assert [rows for _, rows in shards] == [[r] for r in tokens.tolist()], shards
np.testing.assert_array_equal(np.asarray(placed["tokens"]), tokens)
total = jax.jit(lambda x: x.sum(), out_shardings=placement.replicated)(placed["lengths"])
assert int(total) == 10 and total.sharding.is_fully_replicated
print("ok")
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = zygote.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
