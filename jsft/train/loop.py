"""The training loop: the only place with side effects (files, checkpoints, signals, printing).

It reads top to bottom as a story: set up the workdir, the input pipeline, the model and optimizer,
the mesh, the state (fresh or restored), then train with logging, evaluation and checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from jsft import config as config_lib
from jsft.data.pipeline import Prefetcher, build_data, merge_states
from jsft.evals.suite import Evaluation
from jsft.models.registry import build_model
from jsft.parallel import multihost, sharding
from jsft.parallel.mesh import build_mesh
from jsft.train.checkpoint import BestCheckpoint, Checkpointer
from jsft.train.optim import build_optimizer, build_schedule
from jsft.train.state import TrainState, init_fn, state_shardings
from jsft.train.step import make_train_step
from jsft.train.writer import MetricWriter


def _print(is_main: bool, msg: str) -> None:
    if is_main:
        tqdm.write(msg)


class _StopRequest:
    """Turns SIGTERM (preemption, scancel, Ctrl-\\) into a clean 'save and exit' at the next step."""

    def __init__(self):
        self.signum = None
        try:
            signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. some test runners): no handler, no harm
            pass

    def _handle(self, signum, _frame):
        self.signum = signum


def _write_config(config: ml_collections.ConfigDict, workdir: str, is_main: bool) -> None:
    path = os.path.join(workdir, "config.json")
    if is_main and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        new = json.loads(json.dumps(config.to_dict()))
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            logging.warning("The config differs from the one saved in %s (sections: %s)", path, changed)
    if is_main:
        config_lib.save_json(config, path)


def _write_samples(workdir: str, step: int, samples: list[dict]) -> None:
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    with open(os.path.join(workdir, "samples", f"step_{step:06d}.jsonl"), "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)


def _initial_state(config, model, tx, init_state, state_sharding):
    """Fresh weights, or a Hugging Face checkpoint's, created or streamed straight into their shardings."""
    key = jax.random.key(config.seed)
    if not config.model.hf_path:
        # Created in place, already sharded: no full copy of the model on any one device.
        return jax.jit(init_state, out_shardings=state_sharding)(key)
    from jsft.interop import hf  # noqa: PLC0415

    params = hf.load_params(config.model.hf_path, model.config, state_sharding.params)
    _, train_rng = jax.random.split(key)
    create = jax.jit(
        lambda p, rng: TrainState.create(p, tx, rng), out_shardings=state_sharding, donate_argnums=0
    )
    return create(params, train_rng)


def _local_mirror(remote: str) -> str:
    name = remote.split("://", 1)[1].strip("/").replace("/", "_")
    return os.path.join(os.environ.get("JSFT_LOCAL_DIR", "/tmp/jsft"), name)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train as configured; returns the summary it prints (final metrics, checkpoint location)."""
    with contextlib.ExitStack() as scope:  # undoes the activation-sharding rules however we leave
        return _train_and_evaluate(config, workdir, scope)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, scope: contextlib.ExitStack):
    start_time = time.time()
    is_main = jax.process_index() == 0
    # ------------------------------------------------------------------ Workdir
    # Checkpoints go to the workdir, local or a bucket (gs://...: orbax writes there through
    # tensorstore). Everything else (config copy, metrics, TensorBoard, samples, tokenizer, data cache)
    # needs a local file system: with a remote workdir it goes to a local mirror that is printed.
    if "://" in workdir:
        remote, workdir = workdir.rstrip("/"), _local_mirror(workdir)
        _print(is_main, f"Workdir {remote} is remote: checkpoints go there, logs and caches to {workdir}")
    else:
        workdir = remote = os.path.abspath(workdir)  # orbax (tensorstore) needs absolute paths
    os.makedirs(workdir, exist_ok=True)
    _write_config(config, workdir, is_main)
    writer = MetricWriter(workdir, enabled=is_main)
    stop = _StopRequest()

    # ------------------------------------------------------------------ Input pipeline
    data = build_data(
        config.data,
        config.seed,
        workdir,
        jax.process_index(),
        jax.process_count(),
        eval_prompt_limit=config.eval.exact_match_examples,
        hf_path=config.model.hf_path,
    )
    data_metrics = {}
    for src in data.train_sources:
        st = src.stats
        data_metrics.update(
            {
                f"data/{src.name}/skipped_records": st["bad"],
                f"data/{src.name}/truncated": st["truncated"],
                f"data/{src.name}/dropped_overlong": st["dropped_overlong"],
            }
        )
        _print(
            is_main,
            f"Data {src.name!r}{' (process 0 shards)' if jax.process_count() > 1 else ''}: "
            f"{st['examples']:,} examples of {st['records']:,} records "
            f"({st['tokens']:,} tokens; mixture weight {data.mixture[src.name]:.3f}; skipped bad "
            f"{st['bad']}{' ' + str(st['bad_by_reason']) if st['bad'] else ''}; truncated "
            f"{st['truncated']}; dropped over-long {st['dropped_overlong']})",
        )
    _print(is_main, f"Tokenizer: {data.tokenizer.vocab_size} pieces; template {config.data.template!r}")

    # ------------------------------------------------------------------ Model and optimizer
    model = build_model(config.model, data.tokenizer.vocab_size)
    total_steps = config.train.steps
    schedule = build_schedule(config.optim, total_steps)
    tx = build_optimizer(config.optim, schedule)
    _print(is_main, f"Model: {model.config.num_params():,} parameters; {model.config}")

    # ------------------------------------------------------------------ Mesh and shardings
    mesh = build_mesh(config.mesh.shape, config.mesh.dcn_shape)
    rules = sharding.parse_rules(config.mesh.rules.to_dict())
    scope.enter_context(sharding.use_rules(mesh, rules))  # activations constrained by the same rules
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch_sharding = sharding.batch_sharding(mesh, rules)
    divisor = sharding.batch_divisor(mesh, rules)
    if (config.data.batch_size // config.optim.grad_accum_steps) % divisor:
        raise config_lib.ConfigError(
            f"config.data.batch_size={config.data.batch_size} / config.optim.grad_accum_steps="
            f"{config.optim.grad_accum_steps} must be a multiple of {divisor}, the mesh axes the batch "
            f"is split over ({dict(mesh.shape)}, config.mesh.rules.batch)"
        )

    init_state = init_fn(model, tx)
    abstract_state, state_sharding, replicated_dims = state_shardings(model, tx, mesh, rules)
    _print(
        is_main,
        f"Mesh: {dict(mesh.shape)} over {jax.device_count()} devices, {jax.process_count()} "
        f"process(es)"
        + (f"; replicated (not divisible): {sorted(set(replicated_dims))}" if replicated_dims else ""),
    )

    # ------------------------------------------------------------------ Load checkpoint or init
    ckpt = Checkpointer(f"{remote}/checkpoints", config.train.keep_checkpoints)
    start_step = ckpt.latest_step()
    if start_step is not None:
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sharding
        )
        state, data_state = ckpt.restore(start_step, target)
        data.train.restore(data_state)
        writer.truncate_after(start_step)
        _print(is_main, f"Resuming from the checkpoint at step {start_step} in {ckpt.directory}")
    else:
        start_step = 0
        state = _initial_state(config, model, tx, init_state, state_sharding)

    # ------------------------------------------------------------------ Update step
    train_step = jax.jit(
        make_train_step(
            model,
            tx,
            schedule,
            config.optim.grad_accum_steps,
            config.loss.normalization,
            num_sources=len(data.source_names),
        ),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0,
    )
    evaluation = Evaluation(config, model, data, batch_sharding, replicated, divisor)

    def to_global(batch):
        return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}

    summary: dict = {k: v for k, v in data_metrics.items() if v}

    best = None
    if config.train.best_metric:
        best = BestCheckpoint(
            f"{remote}/checkpoints_best",
            config.train.best_metric,
            config.train.best_mode,
            is_main,
            record_path="" if remote == workdir else os.path.join(workdir, "best.json"),
        )

    def evaluate(step: int) -> None:
        metrics, samples_by_task = evaluation.run(state.params)
        writer.write(step, metrics)
        if is_main:
            for name, task_samples in samples_by_task.items():
                if task_samples:
                    task_dir = workdir if name == "validation" else os.path.join(workdir, name)
                    _write_samples(task_dir, step, task_samples)
        summary.update(metrics)
        _print(is_main, f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if best is not None and best.update(step, metrics, state, data_state):
            _print(
                is_main,
                f"step {step}: new best {best.metric} {best.record['value']:.4f} "
                f"(kept in {best.checkpointer.directory})",
            )

    # ------------------------------------------------------------------ Train loop
    data_state = data.train.state()
    if start_step == 0:
        writer.write(0, data_metrics)
        if config.eval.at_start and config.train.eval_every_steps:
            evaluate(0)
    if start_step >= total_steps:
        _print(
            is_main,
            f"The checkpoint at step {start_step} already completes config.train.steps="
            f"{total_steps}; nothing to train",
        )
    pbar = tqdm(
        total=total_steps,
        initial=start_step,
        desc="train",
        disable=not is_main,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    batches = Prefetcher(data.train, config.data.prefetch)  # packs ahead while the step runs
    pending, last_time = [], time.time()
    # stop_after_steps ends this invocation early (a time-limited job) without changing the schedule.
    end_step = min(total_steps, config.train.stop_after_steps or total_steps)
    step = start_step
    for step in range(start_step + 1, end_step + 1):
        batch, data_state = next(batches)
        state, metrics = train_step(state, to_global(batch))
        pending.append(metrics)
        pbar.update(1)

        if step % config.train.log_every_steps == 0 or step == end_step:
            fetched = jax.device_get(pending)  # waits for the steps: only now is their time known
            elapsed, last_time = time.time() - last_time, time.time()
            logged = _train_metrics(fetched, elapsed, config.data, data, data_state)
            if not np.isfinite(logged["train/loss"]):
                raise FloatingPointError(f"train loss is {logged['train/loss']} at step {step}")
            writer.write(step, logged)
            summary["train/loss"] = logged["train/loss"]
            pbar.set_postfix(loss=f"{logged['train/loss']:.4f}", tok_s=f"{logged['train/tokens_per_s']:.0f}")
            pending = []

        eval_every = config.train.eval_every_steps
        early_stop = False
        if eval_every and (step % eval_every == 0 or step == total_steps):
            evaluate(step)
            last_time = time.time()  # evaluation time is not training throughput
            patience = config.train.early_stopping_patience
            early_stop = bool(best and patience and best.record["evals_since_best"] >= patience)
            if early_stop:
                _print(
                    is_main,
                    f"Early stopping at step {step}: {best.metric} has not improved for "
                    f"{patience} evaluations (best {best.record['value']:.4f} at step {best.record['step']})",
                )
        stopping = stop.signum is not None
        if jax.process_count() > 1:  # act on a signal only at points every process agrees on
            stopping = step % config.train.log_every_steps == 0 and multihost.any_process(stopping)
        if step % config.train.checkpoint_every_steps == 0 or step == end_step or stopping or early_stop:
            ckpt.save(step, state, merge_states(multihost.allgather_json(data_state)))
        if early_stop:
            break
        if stopping:
            _print(is_main, f"Signal {stop.signum or 15}: saved a checkpoint at step {step}; rerun to resume")
            break
    batches.close()
    pbar.close()
    ckpt.wait()
    ckpt.close()
    if best is not None:
        best.close()
        if best.record["step"] is not None:
            summary.update(best_step=best.record["step"], best_value=best.record["value"])
    writer.close()

    # ------------------------------------------------------------------ Summary
    summary.update(steps=step, checkpoint_dir=ckpt.directory, wall_time_s=time.time() - start_time)
    if is_main:
        lines = [f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}" for k, v in summary.items()]
        tqdm.write("Summary\n" + "\n".join(lines))
    return summary


def _train_metrics(fetched: list[dict], elapsed: float, data_cfg, data, data_state) -> dict[str, float]:
    """Metrics over the steps since the last log line: mean loss, last lr/grad norm, throughput."""
    logged = {
        "train/loss": float(np.mean([m["loss"] for m in fetched])),
        "train/lr": float(fetched[-1]["lr"]),
        "train/grad_norm": float(fetched[-1]["grad_norm"]),
        "train/target_tokens": float(np.sum([m["target_tokens"] for m in fetched])),
        "train/tokens_per_s": len(fetched) * data_cfg.batch_size * data_cfg.seq_len / elapsed,
    }
    if len(data.source_names) > 1:
        loss_sums = np.sum([m["loss_sum_by_source"] for m in fetched], axis=0)
        tokens = np.sum([m["target_tokens_by_source"] for m in fetched], axis=0)
        for k, name in enumerate(data.source_names, start=1):
            if tokens[k]:
                logged[f"train/loss/{name}"] = float(loss_sums[k] / tokens[k])
    for name, epochs in data.epochs(data_state).items():
        logged[f"data/epoch/{name}"] = epochs
    return logged
