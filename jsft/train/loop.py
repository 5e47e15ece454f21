"""The training loop: the only place with side effects (files, checkpoints, signals, printing).

It reads top to bottom as a story: set up the workdir, the input pipeline, the model and optimizer,
the mesh, the state (fresh or restored), then train with logging, evaluation and checkpoints. Whatever
ends the run (the last step, SIGTERM, early stopping, a non-finite step, an error) the pending saves
finish, the files close and the SIGTERM handler is put back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from jsft import config as config_lib
from jsft.data import fingerprint
from jsft.data.pipeline import Prefetcher, build_data, merge_states
from jsft.evals.suite import Evaluation, Interrupted
from jsft.models.registry import build_model
from jsft.parallel import multihost, sharding
from jsft.parallel.mesh import build_mesh
from jsft.train.checkpoint import BestCheckpoint, Checkpointer
from jsft.train.nonfinite import NonFiniteGuard
from jsft.train.optim import build_optimizer, build_schedule
from jsft.train.preemption import StopRequest
from jsft.train.state import TrainState, init_fn, state_shardings
from jsft.train.step import make_train_step
from jsft.train.writer import MetricWriter


def _print(is_main: bool, msg: str) -> None:
    if is_main:
        tqdm.write(msg)


def _write_config(config: ml_collections.ConfigDict, workdir: str, is_main: bool) -> None:
    path = os.path.join(workdir, "config.json")
    if is_main and os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = {}  # a damaged copy is only overwritten: it is informational
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


def _data_fingerprint(config, data) -> dict:
    """The stream's fingerprint, with per-source counts summed over every process's shards."""
    counts = [{k: src.stats[k] for k in ("records", "examples", "tokens")} for src in data.train_sources]
    totals = [
        {k: sum(per_process[i][k] for per_process in multihost.allgather_json(counts)) for k in counts[i]}
        for i in range(len(counts))
    ]
    return fingerprint.stream_fingerprint(
        config.data, config.seed, data.train.num_shards, data.tokenizer.fingerprint(), totals
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train as configured; returns the summary it prints (final metrics, checkpoint location)."""
    # The scope undoes the activation-sharding rules, closes files and puts the SIGTERM handler back.
    with contextlib.ExitStack() as scope:
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

    # ------------------------------------------------------------------ Mesh (checked before the data)
    try:
        mesh = build_mesh(config.mesh.shape, config.mesh.dcn_shape)
        rules = sharding.parse_rules(config.mesh.rules.to_dict())
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from e
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
    data_metrics = _report_data(config, data, is_main)

    # ------------------------------------------------------------------ Model and optimizer
    try:
        model = build_model(config.model, data.tokenizer.vocab_size)
    except ValueError as e:  # a vocabulary smaller than the tokenizer's, an unknown family
        raise config_lib.ConfigError(str(e)) from e
    total_steps = config.train.steps
    schedule = build_schedule(config.optim, total_steps)
    tx = build_optimizer(config.optim, schedule)
    _print(is_main, f"Model: {model.config.num_params():,} parameters; {model.config}")

    # ------------------------------------------------------------------ Shardings
    init_state = init_fn(model, tx)
    abstract_state, state_sharding, replicated_dims = state_shardings(model, tx, mesh, rules)
    _print(
        is_main,
        f"Mesh: {dict(mesh.shape)} over {jax.device_count()} devices, {jax.process_count()} "
        f"process(es)"
        + (f"; replicated (not divisible): {sorted(set(replicated_dims))}" if replicated_dims else ""),
    )

    # ------------------------------------------------------------------ Load checkpoint or init
    stream_id = _data_fingerprint(config, data)
    ckpt = Checkpointer(f"{remote}/checkpoints", config.train.keep_checkpoints)
    scope.callback(ckpt.close)
    scope.callback(ckpt.wait)  # callbacks run last-in first-out: pending saves finish, then close
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sharding
    )
    restored = ckpt.restore_latest(target)
    best_record = None
    if restored is not None:
        start_step, state, data_state, meta = restored
        best_record = meta.get("best")
        _restore_data(config, data, data_state, meta.get("data_fingerprint"), stream_id, start_step, is_main)
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
            record=best_record,
            is_main=is_main,
        )
        scope.callback(best.close)

    # Metrics files open only now: every check that can fail on user input has run.
    writer = MetricWriter(workdir, enabled=is_main)
    scope.callback(writer.close)
    # Lines after the checkpoint are rewritten by this run; a fresh start keeps none of an earlier one.
    writer.truncate_after(start_step if restored is not None else -1)
    stop = scope.enter_context(StopRequest(fallback_every=config.train.log_every_steps))
    guard = NonFiniteGuard(config.train.on_nonfinite, config.train.max_skipped_steps)
    guard.checked_step = start_step

    def meta() -> dict:
        return {"data_fingerprint": stream_id, "best": best.record if best else None}

    def evaluate(step: int, data_state: dict) -> bool:
        """Evaluate and keep the best checkpoint; True if early stopping says this run is done.
        `data_state`: the data position after `step` (saved with a new best checkpoint)."""
        metrics, samples_by_task = evaluation.run(state.params, step, should_stop=stop.requested)
        writer.write(step, metrics)
        if is_main:
            for name, task_samples in samples_by_task.items():
                if task_samples:
                    task_dir = workdir if name == "validation" else os.path.join(workdir, name)
                    _write_samples(task_dir, step, task_samples)
        summary.update(metrics)
        _print(is_main, f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if best is None:
            return False
        if best.update(step, metrics, state, merge_states(multihost.allgather_json(data_state)), meta()):
            _print(
                is_main,
                f"step {step}: new best {best.metric} {best.record['value']:.4f} "
                f"(kept in {best.checkpointer.directory})",
            )
        patience = config.train.early_stopping_patience
        if patience and best.record["evals_since_best"] >= patience:
            _print(
                is_main,
                f"Early stopping at step {step}: {best.metric} has not improved for "
                f"{patience} evaluations (best {best.record['value']:.4f} at step {best.record['step']})",
            )
            return True
        return False

    # ------------------------------------------------------------------ Train loop
    data_state = data.train.state()
    if start_step == 0:
        writer.write(0, data_metrics)
        if config.eval.at_start and config.train.eval_every_steps:
            try:
                evaluate(0, data_state)
            except Interrupted:
                _print(is_main, f"Signal {stop.signum}: stopped during the first evaluation; nothing to save")
                return summary
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
    scope.callback(pbar.close)
    batches = Prefetcher(data.train, config.data.prefetch)  # packs ahead while the step runs
    scope.callback(batches.close)
    pending, last_time = [], time.time()
    # stop_after_steps ends this invocation early (a time-limited job) without changing the schedule.
    end_step = min(total_steps, config.train.stop_after_steps or total_steps)
    step = start_step
    for step in range(start_step + 1, end_step + 1):
        batch, data_state = next(batches)
        state, metrics = train_step(state, to_global(batch))
        pending.append((step, metrics))
        pbar.update(1)

        if step % config.train.log_every_steps == 0 or step == end_step:
            # Waits for the steps: only now is their time known.
            fetched = jax.device_get([m for _, m in pending])
            elapsed, last_time = time.time() - last_time, time.time()
            skipped = guard.check([s for s, _ in pending], [bool(m["nonfinite"]) for m in fetched])
            logged = _train_metrics(fetched, elapsed, config.data, data, data_state)
            logged["train/skipped_steps"] = float(skipped)
            writer.write(step, logged)
            summary["train/loss"] = logged["train/loss"]
            pbar.set_postfix(loss=f"{logged['train/loss']:.4f}", tok_s=f"{logged['train/tokens_per_s']:.0f}")
            pending = []

        early_stop = stopping = False
        eval_every = config.train.eval_every_steps
        if eval_every and (step % eval_every == 0 or step == total_steps):
            try:
                early_stop = evaluate(step, data_state)
            except Interrupted:  # SIGTERM during a long evaluation: save the step, skip the rest
                stopping = True
            last_time = time.time()  # evaluation time is not training throughput
        stopping = stopping or stop.requested()
        if step % config.train.checkpoint_every_steps == 0 or step == end_step or stopping or early_stop:
            # Never save past a non-finite step that the policy stops on: check the unlogged flags first.
            flags = jax.device_get([m["nonfinite"] for _, m in pending])
            guard.check([s for s, _ in pending], [bool(f) for f in flags])
            ckpt.save(step, state, merge_states(multihost.allgather_json(data_state)), meta())
        if early_stop:
            break
        if stopping:
            _print(is_main, f"Signal {stop.signum or 15}: saved a checkpoint at step {step}; rerun to resume")
            break
    ckpt.wait()
    if best is not None and best.record["step"] is not None:
        summary.update(best_step=best.record["step"], best_value=best.record["value"])

    # ------------------------------------------------------------------ Summary
    summary.update(steps=step, checkpoint_dir=ckpt.directory, wall_time_s=time.time() - start_time)
    if is_main:
        lines = [f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}" for k, v in summary.items()]
        tqdm.write("Summary\n" + "\n".join(lines))
    return summary


def _report_data(config, data, is_main: bool) -> dict[str, float]:
    """Print one line per source and return the data counts logged at step 0."""
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
    return data_metrics


def _restore_data(config, data, data_state: dict, saved_id: dict | None, stream_id: dict, step: int, is_main):
    """Put the data stream back where the checkpoint left it, if it is still the same stream."""
    changed = fingerprint.changes(saved_id, stream_id) if saved_id is not None else []
    if changed and config.data.on_changed_data == "restart":
        _print(
            is_main,
            f"The data stream differs from the checkpoint's ({'; '.join(changed)}); "
            "config.data.on_changed_data='restart': keeping the weights, starting the data afresh",
        )
        return
    if changed:
        raise config_lib.ConfigError(
            f"the data stream differs from the one the checkpoint at step {step} was trained on: "
            f"{'; '.join(changed)}. Resume with the same settings and data, or set "
            "config.data.on_changed_data='restart' to keep the weights and start the data afresh"
        )
    try:
        data.train.restore(data_state)
    except (ValueError, KeyError, IndexError) as e:
        raise config_lib.ConfigError(
            f"cannot resume the data position of the checkpoint at step {step}: {e}. Set "
            "config.data.on_changed_data='restart' to keep the weights and start the data afresh"
        ) from e


def _train_metrics(fetched: list[dict], elapsed: float, data_cfg, data, data_state) -> dict[str, float]:
    """Metrics over the steps since the last log line: mean loss of the applied steps, last lr/grad
    norm, throughput."""
    applied = [m for m in fetched if not m["nonfinite"]] or fetched
    logged = {
        "train/loss": float(np.mean([m["loss"] for m in applied])),
        "train/lr": float(fetched[-1]["lr"]),
        "train/grad_norm": float(fetched[-1]["grad_norm"]),
        "train/target_tokens": float(np.sum([m["target_tokens"] for m in fetched])),
        "train/tokens_per_s": len(fetched) * data_cfg.batch_size * data_cfg.seq_len / elapsed,
    }
    if len(data.source_names) > 1:
        loss_sums = np.sum([m["loss_sum_by_source"] for m in applied], axis=0)
        tokens = np.sum([m["target_tokens_by_source"] for m in applied], axis=0)
        for k, name in enumerate(data.source_names, start=1):
            if tokens[k]:
                logged[f"train/loss/{name}"] = float(loss_sums[k] / tokens[k])
    for name, epochs in data.epochs(data_state).items():
        logged[f"data/epoch/{name}"] = epochs
    return logged
