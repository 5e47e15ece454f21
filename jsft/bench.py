"""Benchmarks: is the input pipeline fast enough to keep the train step busy? How fast do we decode?

    python -m jsft.bench data --config configs/demo.py [--config.data.seq_len=256] [--seconds 10]
    python -m jsft.bench generate --config configs/demo.py
    python -m jsft.bench train --config configs/bench_workload.py [--compare torch] [--json OUT]
    python -m jsft.bench peft --config configs/llama3_8b_sft.py:gpu1 --peft_what plan
    python -m jsft.bench peft --config configs/demo.py --peft_what steps --steps 20
    python -m jsft.bench best --config configs/bench_workload.py:llama1b [--workdir DIR]

`data` builds the configured data twice in a temporary workdir (the first build tokenizes, the
second hits the cache), pulls batches from the train stream for `--seconds`, then times the train
step on the same batch shape and prints one table with the ratio of the two rates. `generate` times
KV-cache decoding of the configured model at batch 1 and 16. `train` times the train step on the
shared peer workload (jsft/bench_train.py). `peft` compares full fine-tuning, a frozen subset, LoRA
and QLoRA: planner bytes, or step times on this machine (jsft/bench_peft.py). `best` measures how
long a new best evaluation stalls the train loop, on the configured model's full train state (weights
and AdamW moments): the former second, synchronous save against keeping the regular checkpoint.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from jsft.errors import help_exits_zero

if TYPE_CHECKING:
    from jsft.data.pipeline import Data

BENCHMARKS = ("data", "generate", "train", "peft", "best")

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Path to a config file, e.g. configs/demo.py (optionally configs/demo.py:ARG).",
    lock_config=True,
)
_SECONDS = flags.DEFINE_float("seconds", 10.0, "How long to pull batches from the train stream.")
_STEPS = flags.DEFINE_integer("steps", 10, "Train steps timed (after one warm-up step).")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 60, "train: steps on the workload rows (10 are warm-up).")
_ROWS = flags.DEFINE_enum(
    "rows", "packed", ["packed", "padded", "synthetic"], "train: the workload's rows, or random packed rows"
)
_COMPARE = flags.DEFINE_enum("compare", "", ["", "torch"], "train: also run the plain torch reference now.")
_JSON = flags.DEFINE_string("json", "", "train: write the result record (with the config) here.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "train: the device's peak TFLOP/s for MFU (0: known devices).")
_WORKDIR = flags.DEFINE_string("workdir", "", "best: where to write the checkpoints (default: a temp dir).")
_PEFT_WHAT = flags.DEFINE_enum("peft_what", "plan", ["plan", "steps"], "peft: planner bytes or step times.")
flags.mark_flags_as_required(["config"])


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


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
    import jax  # noqa: PLC0415  (imported once flags are parsed, as jsft.main does)

    from jsft.run import Run  # noqa: PLC0415
    from jsft.train.state import TrainState  # noqa: PLC0415

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
    from jsft.run import Run  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="jsft_bench_") as workdir:
        run = Run.create(config, workdir)
        data_cfg = config.data.copy_and_resolve_references()
        data_cfg.cache_dir = ""  # a fresh cache in the temporary workdir: the first build tokenizes
        _, first_s = _timed(run.data, 0, data_cfg)
        data, second_s = _timed(run.data, 0, data_cfg)
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


def bench_generate(
    config: ml_collections.ConfigDict,
    batch_sizes: Sequence[int] = (1, 16),
    prompt_len: int = 16,
    new_tokens: int = 64,
    repeats: int = 3,
) -> str:
    """KV-cache generation tokens/s of the configured model (random weights: speed does not depend on
    them; no stop token, so every row decodes the full budget)."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from jsft.evals import generate  # noqa: PLC0415
    from jsft.run import Run  # noqa: PLC0415

    vocab = config.model.vocab_size or config.data.vocab_size
    model = Run.create(config).model(vocab)
    params = jax.jit(model.init)(jax.random.key(0))
    rows = []
    for b in batch_sizes:
        gen = generate.make_generator(model, new_tokens, stop_ids=[-1], pad_id=0)
        prompts = np.random.default_rng(0).integers(0, vocab, (b, prompt_len)).astype(np.int32)
        lengths = np.full(b, prompt_len, np.int32)
        jax.block_until_ready(gen(params, prompts, lengths))  # compile
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(gen(params, prompts, lengths))
            times.append(time.perf_counter() - start)
        best = min(times)
        rows.append((f"batch {b:>3}: new tokens/s", f"{b * new_tokens / best:,.0f}"))
        rows.append((f"batch {b:>3}: ms per step", f"{1000 * best / new_tokens:,.2f}"))
    title = (
        f"jsft bench generate: {model.config.num_params():,} parameters, prompt {prompt_len} tokens, "
        f"{new_tokens} new tokens (greedy, KV cache), best of {repeats}, {jax.devices()[0].platform}"
    )
    width = max(len(name) for name, _ in rows)
    return "\n".join([title] + [f"  {name:<{width}}  {value:>12}" for name, value in rows])


def _bench_train(config: ml_collections.ConfigDict) -> str:
    import json  # noqa: PLC0415

    from jsft import bench_train  # noqa: PLC0415

    result = bench_train.bench_train(config, _TRAIN_STEPS.value, _ROWS.value, _PEAK.value)
    torch = bench_train.compare_torch(_TRAIN_STEPS.value, _ROWS.value) if _COMPARE.value else None
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump({"jsft": result, "torch": torch}, f, indent=1)
    return bench_train.report(result, torch)


def bench_best(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Train-loop stall of one new best, on the configured model's weights and AdamW moments (fp32):
    before, the best was a second, synchronous save of the full state; now the best is the regular
    checkpoint of that step kept out of the rotation, so the stall is at most the blocking part of one
    asynchronous save (none when the evaluation falls on a checkpoint step)."""
    import jax  # noqa: PLC0415

    from jsft.models.registry import build_model  # noqa: PLC0415
    from jsft.train.checkpoint import BestCheckpoint, Checkpointer, checksums  # noqa: PLC0415

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
    _, before = _timed(lambda: (old.save(1, state, {}), old.wait()))
    old.close()
    ckpt = Checkpointer(f"{root}/checkpoints", keep=1)
    best = BestCheckpoint(ckpt, "eval/loss", "min")
    # Now, the evaluation on a checkpoint step: the regular save happens anyway; the best is a mark.
    ckpt.save(2, state, {})
    _, mark = _timed(lambda: (best.update(2, {"eval/loss": 1.0}), best.write_record()))
    ckpt.wait()
    # Now, off the checkpoint cadence: one asynchronous save of that step; the loop waits only for the
    # part of the save that copies the arrays off the device.
    best.update(3, {"eval/loss": 0.5})
    _, blocking = _timed(lambda: ckpt.save(3, state, {}))
    _, background = _timed(ckpt.wait)
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


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in BENCHMARKS:
        given = f"got {argv[1:]}" if len(argv) > 1 else "got none"
        raise app.UsageError(
            f"name one benchmark of {list(BENCHMARKS)} ({given}), e.g. "
            "`python -m jsft.bench data --config configs/demo.py --seconds 10`"
        )
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
        import datasets  # noqa: PLC0415

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    from jsft import config as config_lib  # noqa: PLC0415
    from jsft.errors import DataError  # noqa: PLC0415

    config = _CONFIG.value
    try:
        # train, peft: no data or checkpoint needed
        config_lib.validate(config, "plan" if argv[1] in ("train", "peft", "best") else "train")
        if argv[1] == "data":
            print(bench_data(config, _SECONDS.value, _STEPS.value))
        elif argv[1] == "generate":
            print(bench_generate(config))
        elif argv[1] == "peft":
            from jsft import bench_peft  # noqa: PLC0415

            if _PEFT_WHAT.value == "plan":
                from jsft import plan  # noqa: PLC0415

                plan.simulate_devices(config)
                print(bench_peft.plan_table(config))
            else:
                print(bench_peft.step_table(config, _STEPS.value))
        elif argv[1] == "best":
            print(bench_best(config, _WORKDIR.value))
        else:
            print(_bench_train(config))
    except (config_lib.ConfigError, DataError) as e:
        sys.exit(f"jsft: error: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=help_exits_zero(app.parse_flags_with_usage))
