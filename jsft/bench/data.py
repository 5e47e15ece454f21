"""`python -m jsft.bench data`: is the input pipeline fast enough to keep the train step busy?

Builds the configured data twice in a temporary workdir (the first build tokenizes, the second hits the
cache), pulls batches from the train stream for `--seconds`, then times the train step on the same
batch shape and prints one table with the ratio of the two rates.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator

import jax
import ml_collections

from jsft.bench.timing import timed
from jsft.data.pipeline import Data
from jsft.run import Run
from jsft.train.state import TrainState


def pipeline_rate(batches: Iterator[dict], seconds: float) -> dict[str, float]:
    """Pull batches for `seconds`; returns batches/s, tokens/s (all positions) and non-pad tokens/s."""
    n = tokens = non_pad = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        batch = next(batches)
        n += 1
        tokens += batch["inputs"].size
        non_pad += int((batch["segment_ids"] > 0).sum())
    return {
        "batches_per_s": n / elapsed,
        "tokens_per_s": tokens / elapsed,
        "non_pad_per_s": non_pad / elapsed,
    }


def trainer_rate(config: ml_collections.ConfigDict, data: Data, steps: int) -> dict[str, float]:
    """Train steps per second and tokens per second, timed after one warm-up (compiling) step."""
    run = Run.create(config)
    model = run.model(data.tokenizer.vocab_size)
    tx, schedule = run.optimizer()
    key = jax.random.key(config.seed)
    state = TrainState.create(model.init(key), tx, key)
    step = jax.jit(run.train_step(model, tx, schedule, len(data.source_names)), donate_argnums=0)
    # Batches are pulled beforehand, so only the step is timed.
    batches = [jax.device_put(next(data.train)) for _ in range(steps + 1)]
    state, metrics = step(state, batches[0])
    jax.block_until_ready((state, metrics))
    start = time.perf_counter()
    for batch in batches[1:]:
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    elapsed = time.perf_counter() - start
    return {"steps_per_s": steps / elapsed, "tokens_per_s": steps * batches[0]["inputs"].size / elapsed}


def bench_data(config: ml_collections.ConfigDict, seconds: float, steps: int) -> str:
    """Run the `data` benchmark and return its table."""
    with tempfile.TemporaryDirectory(prefix="jsft_bench_") as workdir:
        run = Run.create(config, workdir)
        data_cfg = config.data.copy_and_resolve_references()
        data_cfg.cache_dir = ""  # a fresh cache in the temporary workdir: the first build tokenizes
        _, first_s = timed(run.data, 0, data_cfg)
        data, second_s = timed(run.data, 0, data_cfg)
        pipe = pipeline_rate(data.train, seconds)
        train = trainer_rate(config, data, steps)
    d = config.data
    rows = [
        ("build_data, first (tokenize)", f"{first_s:.2f} s"),
        ("build_data, second (cache hit)", f"{second_s:.2f} s"),
        ("pipeline batches/s", f"{pipe['batches_per_s']:,.1f}"),
        ("pipeline tokens/s", f"{pipe['tokens_per_s']:,.0f}"),
        ("pipeline non-pad tokens/s", f"{pipe['non_pad_per_s']:,.0f}"),
        ("trainer steps/s", f"{train['steps_per_s']:,.2f}"),
        ("trainer tokens/s", f"{train['tokens_per_s']:,.0f}"),
        ("pipeline / trainer", f"{pipe['tokens_per_s'] / train['tokens_per_s']:,.1f}x"),
    ]
    title = (
        f"jsft bench data: batch_size {d.batch_size} x seq_len {d.seq_len}, packing {d.packing!r}, "
        f"{seconds:g} s of batches, {steps} train steps on one device"
    )
    width = max(len(name) for name, _ in rows)
    return "\n".join([title] + [f"  {name:<{width}}  {value:>12}" for name, value in rows])
