"""The training loop: the only place with side effects (files, checkpoints, signals, printing).

`train_and_evaluate` reads as a story of named stages:

    set up          the run (workdir, mesh), data, model, optimizer, jitted step, evaluation, files
    restore/init    the newest intact checkpoint (weights, data position, best record), or fresh weights
    train           step after step; each step may log, evaluate (and keep the best), save, stop
    finish          pending saves complete, the summary is printed

Whatever ends the run (the last step, SIGTERM, early stopping, a non-finite step, an error) the
pending saves finish, the files close and the SIGTERM handler is put back (the ExitStack `scope`).
The file is a little over 400 lines because the loop is one story; each stage stays one function.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from jsft import config as config_lib
from jsft.data import fingerprint
from jsft.data.batches import Prefetcher, merge_states
from jsft.data.pipeline import Data
from jsft.errors import ConfigError
from jsft.evals.suite import Evaluation, Interrupted
from jsft.models.registry import ModelDef
from jsft.parallel import multihost, sharding
from jsft.run import Run
from jsft.train import report, trainable
from jsft.train.checkpoint import BestCheckpoint, Checkpointer
from jsft.train.nonfinite import NonFiniteGuard
from jsft.train.preemption import StopRequest
from jsft.train.state import TrainState
from jsft.train.writer import MetricWriter


def _print(is_main: bool, msg: str) -> None:
    if is_main:
        tqdm.write(msg)


@dataclasses.dataclass
class Trainer:
    """What the stages share, built once by `set_up`; the changing values (state, step, data
    position) travel as arguments and return values, never as attributes."""

    run: Run
    data: Data
    model: ModelDef
    tx: optax.GradientTransformation
    state_target: TrainState  # abstract, with shardings: what a restore reads
    state_sharding: TrainState
    train_step: object  # jitted (state, batch) -> (state, metrics)
    evaluation: Evaluation
    ckpt: Checkpointer
    stop: StopRequest
    guard: NonFiniteGuard
    stream_id: dict  # the data stream's fingerprint, stored in every checkpoint
    data_metrics: dict  # data counts, logged at step 0
    summary: dict  # the final numbers printed and returned
    # Opened by restore_or_initialise, once the checkpoint (and its best record) is known:
    best: BestCheckpoint | None = None
    writer: MetricWriter | None = None
    live_report: report.LiveReport | None = None  # process 0's report.png
    base_id: dict | None = None  # LoRA/QLoRA: the base's source and content hash, kept in checkpoints
    saved_config: dict | None = None  # the workdir's config.json as an earlier run left it

    @property
    def config(self) -> ml_collections.ConfigDict:
        return self.run.config

    def meta(self) -> dict:
        """What a checkpoint carries besides the state and the data position."""
        meta = {
            "data_fingerprint": self.stream_id,
            "best": self.best.record if self.best else None,
            "config": json.loads(json.dumps(self.config.to_dict(), default=str)),
        }
        if self.base_id is not None:
            meta["base"] = self.base_id
        return meta

    def saved(self, state: TrainState) -> TrainState:
        """What a checkpoint of `state` holds (LoRA: adapters and their optimizer state only)."""
        return self.run.saved_view(state, self.model)

    def close_files(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def to_global(self, batch: dict) -> dict:
        sharding_ = self.run.batch_sharding
        return {k: jax.make_array_from_process_local_data(sharding_, v) for k, v in batch.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train as configured; returns the summary it prints (final metrics, checkpoint location)."""
    start_time = time.time()
    with contextlib.ExitStack() as scope:
        trainer = set_up(config, workdir, scope)
        scope.callback(trainer.close_files)
        start_step, state, resumed = restore_or_initialise(trainer)
        step = train(trainer, start_step, state, scope, resumed)
        return finish(trainer, step, start_time)


# ---------------------------------------------------------------------- set up


def set_up(config: ml_collections.ConfigDict, workdir: str, scope: contextlib.ExitStack) -> Trainer:
    """Everything the loop needs, checked in order of cost (mesh before data before compilation)."""
    run = Run.create(config, workdir)
    if run.remote != run.workdir:
        _print(
            run.is_main,
            f"Workdir {run.remote} is remote: checkpoints go there, logs and caches to {run.workdir}",
        )
    saved_config = _read_config(run.workdir)  # config.json is rewritten only once the restore succeeded
    run.check_train_batch()
    scope.enter_context(sharding.use_rules(run.mesh, run.rules))  # activations follow the same rules

    data = run.data()
    data_metrics = _report_data(config, data, run.is_main)
    model = run.model(data.tokenizer.vocab_size)
    tx, schedule = run.optimizer()
    _print(run.is_main, f"Model: {model.config.num_params():,} parameters; {model.config}")
    state_target, state_sharding, replicated_dims = run.state_layout(model, tx)
    _print(
        run.is_main,
        f"Mesh: {dict(run.mesh.shape)} over {jax.device_count()} devices, {jax.process_count()} process(es)"
        + (f"; replicated (not divisible): {sorted(set(replicated_dims))}" if replicated_dims else ""),
    )
    step_fn = run.train_step(model, tx, schedule, len(data.source_names))
    train_step = jax.jit(
        step_fn,
        in_shardings=(state_sharding, run.batch_sharding),
        out_shardings=(state_sharding, run.replicated),
        donate_argnums=0,
    )
    evaluation = Evaluation.from_config(config, model, data, run.placement)
    ckpt = run.checkpointer()
    scope.callback(ckpt.close)
    scope.callback(ckpt.wait)  # callbacks run last-in first-out: pending saves finish, then close
    trainer = Trainer(
        run=run,
        data=data,
        model=model,
        tx=tx,
        state_target=state_target,
        state_sharding=state_sharding,
        train_step=train_step,
        evaluation=evaluation,
        ckpt=ckpt,
        stop=scope.enter_context(StopRequest(fallback_every=config.train.log_every_steps)),
        guard=NonFiniteGuard(config.train.on_nonfinite, config.train.max_skipped_steps),
        stream_id=_data_fingerprint(config, data),
        data_metrics=data_metrics,
        summary={k: v for k, v in data_metrics.items() if v},
        saved_config=saved_config,
    )
    return trainer


def _read_config(workdir: str) -> dict | None:
    """The config.json an earlier run left in the workdir (None: none, or a damaged copy)."""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_config(config: ml_collections.ConfigDict, old: dict | None, workdir: str, is_main: bool) -> None:
    """WORKDIR/config.json: this run's config (a changed one is logged by section)."""
    if not is_main:
        return
    new = json.loads(json.dumps(config.to_dict(), default=str))
    changed = sorted(k for k in set(old or {}) | set(new) if (old or {}).get(k) != new.get(k)) if old else []
    if changed:
        logging.warning("The config differs from the one saved in %s (sections: %s)", workdir, changed)
    config_lib.save_json(config, os.path.join(workdir, "config.json"))


def _report_data(config: ml_collections.ConfigDict, data: Data, is_main: bool) -> dict[str, float]:
    """Print one line per source and return the data counts logged at step 0."""
    data_metrics = {}
    for src in data.train_sources:
        st = src.stats
        if "examples" not in st:  # streamed: records are parsed only when drawn
            _print(
                is_main,
                f"Data {src.name!r} (streamed{', this process' if jax.process_count() > 1 else ''}): "
                f"{st['records']:,} records in {st['shards']} shard(s); mixture weight "
                f"{data.mixture[src.name]:.3f}; bad records are found and counted as they are drawn",
            )
            continue
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


def _data_fingerprint(config: ml_collections.ConfigDict, data: Data) -> dict:
    """The stream's fingerprint, with per-source counts summed over every process's shards."""
    keys = ("records", "examples", "tokens")
    counts = [{k: src.stats[k] for k in keys if k in src.stats} for src in data.train_sources]
    gathered = multihost.allgather_json(counts)
    totals = [{k: sum(p[i][k] for p in gathered) for k in counts[i]} for i in range(len(counts))]
    return fingerprint.stream_fingerprint(
        config.data, config.seed, data.train.num_shards, data.tokenizer.fingerprint(), totals
    )


# ---------------------------------------------------------------------- restore or initialise


def restore_or_initialise(t: Trainer) -> tuple[int, TrainState, bool]:
    """(start step, state, resumed): the newest intact checkpoint with its data position and best
    record, or fresh (or Hugging Face) weights at step 0. Opens the metrics files and the best record."""
    config, is_main, run = t.config, t.run.is_main, t.run
    params = None
    if t.model.config.is_peft:  # the base comes from its source, quantized, with fresh adapters
        base, t.base_id = run.base_params(t.model)
        params = run.peft_params(t.model, base, t.state_sharding.params)
    config_now = json.loads(json.dumps(config.to_dict(), default=str))
    restored = t.ckpt.restore_latest(t.saved(t.state_target), config_now, t.saved_config)
    best_record = None
    if restored is not None:
        start_step, state, data_state, meta = restored
        if params is not None:
            run.check_base(meta.get("base"), t.base_id, f"the checkpoint at step {start_step}")
            mask = run.trainable_mask(t.model)
            state = state.replace(params=trainable.merge(state.params, trainable.split(params, mask)[1]))
        best_record = meta.get("best")
        _restore_data(
            config, t.data, data_state, meta.get("data_fingerprint"), t.stream_id, start_step, is_main
        )
        _print(is_main, f"Resuming from the checkpoint at step {start_step} in {t.ckpt.directory}")
    else:
        start_step, state = 0, run.initial_state(t.model, t.tx, t.state_sharding, params)
    if config.train.best_metric:
        t.best = BestCheckpoint(
            t.ckpt, config.train.best_metric, config.train.best_mode, best_record, is_main
        )
    # Metrics files open only now: every check that can fail on user input has run. Lines after the
    # checkpoint are rewritten by this run; a fresh start (no checkpoint, none set aside) keeps none.
    _write_config(config, t.saved_config, run.workdir, is_main)
    failed = None
    try:
        t.writer = MetricWriter(t.run.workdir, is_main, _wandb_settings(config), resumed=restored is not None)
        t.live_report = report.LiveReport(t.run.workdir) if is_main else None
    except ConfigError as e:  # W&B could not start (process 0): every process leaves, not only it
        failed = e
    if multihost.any_process(failed is not None):
        raise failed or ConfigError("config.logging.wandb: W&B could not start on process 0 (see its error)")
    t.writer.truncate_after(start_step if restored is not None else -1)
    t.guard.checked_step = start_step
    return start_step, state, restored is not None


def _wandb_settings(config: ml_collections.ConfigDict) -> dict | None:
    """config.logging.wandb with the resolved config to log; None where the config has no such section."""
    if "logging" not in config or "wandb" not in config.logging:
        return None
    resolved = json.loads(json.dumps(config.to_dict(), default=str))
    return {**config.logging.wandb.to_dict(), "config": resolved}


def _restore_data(
    config, data: Data, data_state: dict, saved_id: dict | None, stream_id: dict, step: int, is_main
):
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
        raise ConfigError(
            f"the data stream differs from the one the checkpoint at step {step} was trained on: "
            f"{'; '.join(changed)}. Resume with the same settings and data, or set "
            "config.data.on_changed_data='restart' to keep the weights and start the data afresh"
        )
    try:
        data.train.restore(data_state)
    except (ValueError, KeyError, IndexError) as e:
        raise ConfigError(
            f"cannot resume the data position of the checkpoint at step {step}: {e}. Set "
            "config.data.on_changed_data='restart' to keep the weights and start the data afresh"
        ) from e


# ---------------------------------------------------------------------- train


def train(t: Trainer, start_step: int, state: TrainState, scope: contextlib.ExitStack, resumed: bool) -> int:
    """Step from `start_step` to the end (or a stop); returns the last step taken."""
    config, is_main = t.config, t.run.is_main
    data_state = t.data.train.state()
    if not resumed:  # (a checkpoint at step 0, the first best, already holds what follows)
        t.writer.write(0, t.data_metrics)
        if config.eval.at_start and config.train.eval_every_steps:
            try:
                improved = evaluate(t, 0, state)[1]
            except Interrupted:
                _print(
                    is_main, f"Signal {t.stop.signum}: stopped during the first evaluation; nothing to save"
                )
                return 0
            if improved:  # the weights before training are the best so far: kept like any best step
                save(t, 0, state, data_state, [])
    total_steps = config.train.steps
    if start_step >= total_steps:
        _print(
            is_main, f"The checkpoint at step {start_step} already completes config.train.steps={total_steps}"
        )
    pbar = tqdm(total=total_steps, initial=start_step, desc="train", disable=not is_main, mininterval=1.0)
    scope.callback(pbar.close)
    batches = Prefetcher(t.data.train, config.data.prefetch)  # packs ahead while the step runs
    scope.callback(t.data.train.close)  # runs after the prefetcher's close (callbacks unwind in reverse)
    scope.callback(batches.close)
    pending, last_time = [], time.time()
    # stop_after_steps ends this invocation early (a time-limited job) without changing the schedule.
    end_step = min(total_steps, config.train.stop_after_steps or total_steps)
    step = start_step
    for step in range(start_step + 1, end_step + 1):
        batch, data_state = next(batches)
        state, metrics = t.train_step(state, t.to_global(batch))
        pending.append((step, metrics))
        pbar.update(1)
        if step % config.train.log_every_steps == 0 or step == end_step:
            log(t, step, pending, last_time, data_state, pbar)
            pending, last_time = [], time.time()
        early_stop = stopping = improved = False
        if config.train.eval_every_steps and (
            step % config.train.eval_every_steps == 0 or step == total_steps
        ):
            try:
                early_stop, improved = evaluate(t, step, state)
            except Interrupted:  # SIGTERM during a long evaluation: save the step, skip the rest
                stopping = True
            last_time = time.time()  # evaluation time is not training throughput
        stopping = stopping or t.stop.requested()
        regular = step % config.train.checkpoint_every_steps == 0 or step == end_step
        if regular or stopping or early_stop or improved:  # a new best is an ordinary (async) save
            save(t, step, state, data_state, pending)
        if stopping:
            _print(
                is_main, f"Signal {t.stop.signum or 15}: saved a checkpoint at step {step}; rerun to resume"
            )
        if stopping or early_stop:
            break
    return step


def log(t: Trainer, step: int, pending: list, since: float, data_state: dict, pbar: tqdm) -> None:
    """One metrics line for the steps since the last one (`since`: when that was). It waits for the
    steps (only then is their time known); the non-finite guard sees their flags first."""
    fetched = jax.device_get([m for _, m in pending])
    elapsed = time.time() - since
    skipped = t.guard.check([s for s, _ in pending], [bool(m["nonfinite"]) for m in fetched])
    logged = _train_metrics(fetched, elapsed, t.config.data, t.data, data_state)
    if t.config.data.get("engine") == "stream":  # bad records met so far, over every process's streams
        shards = _global_data_state(data_state)["shards"].values()
        for k, name in enumerate(t.data.source_names):
            logged[f"data/{name}/bad_records"] = float(sum(sh["bad"][k] for sh in shards))
    logged["train/skipped_steps"] = float(skipped)
    t.writer.write(step, logged)
    t.summary["train/loss"] = logged["train/loss"]
    pbar.set_postfix(loss=f"{logged['train/loss']:.4f}", tok_s=f"{logged['train/tokens_per_s']:.0f}")


def evaluate(t: Trainer, step: int, state: TrainState) -> tuple[bool, bool]:
    """Evaluate `state` after `step`, write the metrics and samples, update the best record; returns
    (early stopping says the run is done, a new best: the caller saves this step). Raises Interrupted
    on SIGTERM (nothing written)."""
    is_main = t.run.is_main
    metrics, samples_by_task = t.evaluation.run(state.params, step, should_stop=t.stop.requested)
    t.writer.write(step, metrics)
    if is_main:
        for name, task_samples in samples_by_task.items():
            if task_samples:
                task_dir = t.run.workdir if name == "validation" else os.path.join(t.run.workdir, name)
                _write_samples(task_dir, step, task_samples)
    t.summary.update(metrics)
    _print(is_main, f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    _write_report(t)
    best = t.best
    if best is None:
        return False, False
    improved = best.update(step, metrics)
    if improved:
        _print(
            is_main,
            f"step {step}: new best {best.metric} {best.record['value']:.4f} "
            f"(its checkpoint is kept in {best.checkpointer.directory})",
        )
    else:
        best.write_record()  # evaluations since the best (early stopping); a new best's is written on save
    patience = t.config.train.early_stopping_patience
    if patience and best.record["evals_since_best"] >= patience:
        _print(
            is_main,
            f"Early stopping at step {step}: {best.metric} has not improved for {patience} evaluations "
            f"(best {best.record['value']:.4f} at step {best.record['step']})",
        )
        return True, improved
    return False, improved


def save(t: Trainer, step: int, state: TrainState, data_state: dict, pending: list) -> None:
    """Checkpoint `state` after `step`, never past a non-finite step the policy stops on (the flags
    of steps not yet logged are checked first; a save synchronises anyway)."""
    flags = jax.device_get([m["nonfinite"] for _, m in pending])
    t.guard.check([s for s, _ in pending], [bool(f) for f in flags])
    t.ckpt.save(step, t.saved(state), _global_data_state(data_state), t.meta())
    if t.best is not None and t.best.record["step"] == step:
        t.best.write_record()


def _write_report(t: Trainer, final: bool = False) -> None:
    """WORKDIR/report.png from metrics.jsonl; a plotting failure is a warning, never a lost run."""
    if t.live_report is None or t.writer is None:
        return
    try:
        t.live_report.update(final)
    except Exception as e:  # noqa: BLE001 - the report is a convenience
        logging.warning("Could not write report.png: %s", e)


def _global_data_state(data_state: dict) -> dict:
    """Every process's shards of the data position, as one state (what a checkpoint stores)."""
    return merge_states(multihost.allgather_json(data_state))


def _write_samples(workdir: str, step: int, samples: list[dict]) -> None:
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    with open(os.path.join(workdir, "samples", f"step_{step:06d}.jsonl"), "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)


def _train_metrics(
    fetched: list[dict], elapsed: float, data_cfg, data: Data, data_state: dict
) -> dict[str, float]:
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
    for key in fetched[0]:
        if key.startswith("loss/"):  # the objective's terms (train/loss/ce, train/loss/z, ...)
            logged[f"train/{key}"] = float(np.mean([m[key] for m in applied]))
    if "moe/load" in fetched[0]:  # Mixture of Experts: each expert's share of the routed tokens
        load = np.mean([m["moe/load"] for m in applied], axis=0)
        logged.update({f"train/moe/load/{e}": float(v) for e, v in enumerate(load)})
    if len(data.source_names) > 1:
        loss_sums = np.sum([m["loss_sum_by_source"] for m in applied], axis=0)
        tokens = np.sum([m["target_tokens_by_source"] for m in applied], axis=0)
        for k, name in enumerate(data.source_names, start=1):
            if tokens[k]:
                logged[f"train/loss/{name}"] = float(loss_sums[k] / tokens[k])
    for name, epochs in data.epochs(data_state).items():
        logged[f"data/epoch/{name}"] = epochs
    return logged


# ---------------------------------------------------------------------- finish


def finish(t: Trainer, step: int, start_time: float) -> dict:
    """Wait for the last save and print the summary (final metrics, best checkpoint, where)."""
    t.ckpt.wait()
    _write_report(t, final=True)
    summary = t.summary
    if t.best is not None and t.best.record["step"] is not None:
        summary.update(best_step=t.best.record["step"], best_value=t.best.record["value"])
    summary.update(steps=step, checkpoint_dir=t.ckpt.directory, wall_time_s=time.time() - start_time)
    if t.run.is_main:
        lines = [f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}" for k, v in summary.items()]
        tqdm.write("Summary\n" + "\n".join(lines))
    return summary
