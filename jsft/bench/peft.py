"""Full fine-tuning, a frozen subset, LoRA at two ranks and QLoRA NF4, side by side on one config.

    python -m jsft.bench peft --config configs/llama3_8b_sft.py:gpu1 --peft_what plan
    python -m jsft.bench peft --config configs/demo.py --peft_what steps --steps 20

`plan` runs the memory planner (jsft/modes/plan.py: exact bytes of parameters, optimizer state and
gradients; XLA's compiled temp for the rest) for each method on the config's mesh. `steps` times the
train step of each method on this machine, on random packed rows of the config's batch shape, taking
the steps round-robin (one of each method in turn) so that a noisy shared machine slows all alike;
the figure is the median step time.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jsft.modes import plan as plan_lib
from jsft.run import Run
from jsft.train.trainable import count

# name -> config overrides (key path -> value)
METHODS = {
    "full": {},
    "frozen (embed, head, mlp)": {"train.frozen": r"embed|lm_head|layers\.mlp\."},
    "lora r16": {"peft.method": "lora", "peft.rank": 16, "peft.alpha": 32.0},
    "lora r64": {"peft.method": "lora", "peft.rank": 64, "peft.alpha": 128.0},
    "qlora nf4 r16": {"peft.method": "qlora", "peft.quant": "nf4", "peft.rank": 16, "peft.alpha": 32.0},
    # The frozen base needs no float32 master copy: bfloat16 parameters (LoRA: the whole base;
    # QLoRA: embeddings, head and norms) halve what is left.
    "lora r16, bf16 base": {
        "peft.method": "lora",
        "peft.rank": 16,
        "peft.alpha": 32.0,
        "model.param_dtype": "bfloat16",
    },
    "qlora nf4 r16, bf16 rest": {
        "peft.method": "qlora",
        "peft.quant": "nf4",
        "peft.rank": 16,
        "peft.alpha": 32.0,
        "model.param_dtype": "bfloat16",
    },
}


def _variant(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(config.to_dict())
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def plan_table(config: ml_collections.ConfigDict) -> str:
    """Per-device bytes of each method from the planner, one row per method."""
    lines = [
        "| method | trainable params | parameters | optimizer state | gradients | peak per device |",
        "|---|---|---|---|---|---|",
    ]
    for name, overrides in METHODS.items():
        variant = _variant(config, overrides)
        rows: dict = {}
        plan_lib.run_plan(variant, plan_rows=rows)
        run = Run.create(variant)
        model = run.model(variant.model.vocab_size)
        n_train, _ = count(model.abstract_params(), run.trainable_mask(model))
        gb = {k: v / plan_lib.GB for k, v in rows.items()}
        lines.append(
            f"| {name} | {n_train / 1e6:,.1f}M | {gb['parameters']:.2f} GB | "
            f"{gb['optimizer state']:.2f} GB | {gb['gradients (float32)']:.2f} GB | "
            f"{gb['peak per device']:.2f} GB |"
        )
    return "\n".join(lines)


def _random_batch(config: ml_collections.ConfigDict, vocab: int, rng: np.random.Generator) -> dict:
    """Packed rows of the config's shape: examples of 16-48 tokens, half of each one trained."""
    b, t = config.data.batch_size, config.data.seq_len
    batch = {k: np.zeros((b, t), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    batch["loss_mask"] = np.zeros((b, t), np.float32)
    batch["source_ids"] = np.ones((b, t), np.int32)
    for row in range(b):
        start, seg = 0, 1
        while start < t:
            n = min(int(rng.integers(16, 48)), t - start)
            batch["inputs"][row, start : start + n] = rng.integers(3, vocab, n)
            batch["targets"][row, start : start + n] = rng.integers(3, vocab, n)
            batch["segment_ids"][row, start : start + n] = seg
            batch["positions"][row, start : start + n] = np.arange(n)
            batch["loss_mask"][row, start + n // 2 : start + n] = 1.0
            start, seg = start + n, seg + 1
    return batch


def step_table(config: ml_collections.ConfigDict, steps: int) -> str:
    """Median train-step time of each method on this machine (fresh weights; the time does not
    depend on them), taken round-robin, with the ratio to full fine-tuning."""
    vocab = config.model.vocab_size or config.data.vocab_size
    batch = {k: jnp.asarray(v) for k, v in _random_batch(config, vocab, np.random.default_rng(0)).items()}
    runners = {}
    for name, overrides in METHODS.items():
        variant = _variant(config, overrides)
        variant.model.hf_path = ""
        run = Run.create(variant)
        model = run.model(vocab)
        tx, schedule = run.optimizer()
        _, state_sharding, _ = run.state_layout(model, tx)
        state = run.initial_state(model, tx, state_sharding)
        step = jax.jit(run.train_step(model, tx, schedule), donate_argnums=0)
        state, metrics = step(state, batch)  # compile
        jax.block_until_ready(metrics)
        n_train, n_total = count(model.abstract_params(), run.trainable_mask(model))
        runners[name] = [step, state, [], n_train]
    for _ in range(steps):
        for r in runners.values():
            start = time.perf_counter()
            r[1], metrics = r[0](r[1], batch)
            jax.block_until_ready(metrics)
            r[2].append(time.perf_counter() - start)
    full = statistics.median(runners["full"][2])
    lines = ["| method | trainable params | median step | vs full |", "|---|---|---|---|"]
    for name, (_, _, times, n_train) in runners.items():
        med = statistics.median(times)
        lines.append(f"| {name} | {n_train:,} | {med * 1e3:.1f} ms | {med / full:.2f}x |")
    return "\n".join(lines)
