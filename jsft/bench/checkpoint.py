"""`python -m jsft.bench best`: how long a new best evaluation stalls the train loop.

Measured on the configured model's full train state (weights and AdamW moments, float32): the former
second, synchronous save of the best against keeping the regular checkpoint of that step.
"""

from __future__ import annotations

import tempfile

import jax
import ml_collections

from jsft.bench.timing import timed
from jsft.models.registry import build_model
from jsft.train.checkpoint import BestCheckpoint, Checkpointer, checksums


def bench_best(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Train-loop stall of one new best, on the configured model's weights and AdamW moments (fp32):
    before, the best was a second, synchronous save of the full state; now the best is the regular
    checkpoint of that step kept out of the rotation, so the stall is at most the blocking part of one
    asynchronous save (none when the evaluation falls on a checkpoint step)."""
    model = build_model(config.model, config.model.vocab_size or config.data.vocab_size or 32000)
    shapes = model.abstract_params()
    keys = iter(jax.random.split(jax.random.key(0), 3 * len(jax.tree.leaves(shapes))))
    fill = jax.jit(lambda k, like: jax.random.normal(k, like.shape, jax.numpy.float32), static_argnums=1)

    def tree():
        return jax.tree.map(lambda a: fill(next(keys), jax.ShapeDtypeStruct(a.shape, a.dtype)), shapes)

    state = {"params": tree(), "mu": tree(), "nu": tree()}
    checksums(state)  # compiled once, outside the timings (every save computes them)
    gb = sum(x.size * 4 for x in jax.tree.leaves(state)) / 1e9
    root = workdir or tempfile.mkdtemp(prefix="jsft-bench-best-")
    rows = []
    # Before: BestCheckpoint owned a keep=1 checkpointer and saved synchronously on every new best.
    old = Checkpointer(f"{root}/checkpoints_best", keep=1, async_save=False)
    _, before = timed(lambda: (old.save(1, state, {}), old.wait()))
    old.close()
    ckpt = Checkpointer(f"{root}/checkpoints", keep=1)
    best = BestCheckpoint(ckpt, "eval/loss", "min")
    # Now, the evaluation on a checkpoint step: the regular save happens anyway; the best is a mark.
    ckpt.save(2, state, {})
    _, mark = timed(lambda: (best.update(2, {"eval/loss": 1.0}), best.write_record()))
    ckpt.wait()
    # Now, off the checkpoint cadence: one asynchronous save of that step; the loop waits only for the
    # part of the save that copies the arrays off the device.
    best.update(3, {"eval/loss": 0.5})
    _, blocking = timed(lambda: ckpt.save(3, state, {}))
    _, background = timed(ckpt.wait)
    ckpt.close()
    rows = [
        ("train state (weights + AdamW moments)", f"{gb:.2f} GB"),
        ("before: second synchronous save", f"{before:.2f} s"),
        ("now, eval on a checkpoint step", f"{mark * 1e3:.1f} ms"),
        ("now, eval off the cadence: blocking", f"{blocking:.2f} s"),
        ("  (its write, in the background)", f"{background:.2f} s"),
        ("stall ratio before / now (off cadence)", f"{before / max(blocking, 1e-9):.1f}x"),
    ]
    width = max(len(n) for n, _ in rows)
    title = f"best-checkpoint stall: {model.config.num_params():,} parameters, {jax.default_backend()}"
    return "\n".join([title] + [f"  {name:<{width}}  {value:>12}" for name, value in rows])
