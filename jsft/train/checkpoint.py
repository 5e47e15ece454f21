"""Orbax checkpoints of the train state, the data iterator's position and the loop's own record.
(~420 lines: save, restore and the three items' formats belong together; restore's error triage is
already its own module.)

Each checkpoint is a step directory holding three items:
  state   the TrainState pytree (orbax, sharded; restores onto any mesh)
  data    the data iterator's position (JSON)
  meta    JSON: a checksum of every array (verified on restore), the best-checkpoint record, the
          data-stream fingerprint and the config that wrote it, so every process of a resumed run
          reads the same values

Orbax writes into a temporary directory and renames it when complete, so a crash or SIGTERM during a
save leaves the previous checkpoint as the latest one. Restore tells apart why a checkpoint does not
restore (jsft/train/restore_errors.py): another config wrote it (one error naming the fields, nothing
moved), the storage failed for a moment (retried, then an error, nothing moved), or its bytes are
damaged: only then is it set aside (moved to `<directory>_corrupt/`, never deleted) and the newest
intact one restored. A directory holding only set-aside checkpoints is refused, never restarted.

The best checkpoint is one of the regular ones, kept out of the keep-N rotation (`keep_step`): an
improvement costs no second save.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.metadata import array_metadata_store

from jsft.errors import ConfigError
from jsft.parallel import multihost
from jsft.train import restore_errors
from jsft.train.checksums import checksums, verify
from jsft.train.restore_errors import CheckpointError, CheckpointMismatch, CorruptCheckpoint

__all__ = ["BestCheckpoint", "Checkpointer", "CheckpointError", "CheckpointMismatch", "CorruptCheckpoint"]

# Orbax's replica-parallel save splits each replicated array into one slice per replica, so that every
# replica writes a part. Each slice is an eager device op (one compiled program per shape): below this
# many bytes per slice the slicing costs more than the parallel write saves, and one replica writes the
# whole array. (A tiny run: 72 slice programs compiled at its first save; an 8B model's arrays are all
# far above it.)
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _use_replica_parallel_for_large_arrays_only() -> None:
    handler = ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
        array_metadata_store=array_metadata_store.Store(),  # as orbax's default handler has
    )
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:300]}"


@dataclasses.dataclass
class _KeptSteps:
    """An orbax preservation policy: the steps in `steps` (the best one) survive the keep-N rotation."""

    steps: set[int] = dataclasses.field(default_factory=set)

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
        return [c.step in self.steps for c in checkpoints]


class Checkpointer:
    def __init__(
        self, directory: str, keep: int, async_save: bool = True, retries: int = 3, retry_wait_s: float = 2.0
    ):
        _use_replica_parallel_for_large_arrays_only()
        policies = ocp.checkpoint_managers.preservation_policy
        self._kept = _KeptSteps()
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy([policies.LatestN(keep), self._kept]),
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # leftovers of a save killed with -9
        )
        self.directory = directory
        self.retries, self.retry_wait_s = retries, retry_wait_s
        self._manager = ocp.CheckpointManager(directory, options=options)
        # Orbax removes the leftovers in a background thread that it awaits only before a save. A run
        # that fails at once (every checkpoint damaged) exited while that thread still ran, and the
        # thread's traceback ("cannot schedule new futures after shutdown") reached the console; it
        # also listed the directory while we did. Wait for it here: one listing of the directory.
        await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()

    def keep_step(self, step: int | None) -> None:
        """Keep `step` (the best checkpoint) out of the keep-N rotation; the step kept before may go."""
        self._kept.steps = set() if step is None else {step}

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, meta: dict | None = None) -> None:
        """Save asynchronously; `meta` (JSON) is stored beside the state with the arrays' checksums."""
        if step in self._manager.all_steps():  # a replayed step after a fallback: the new one wins
            self._manager.delete(step)
        meta = dict(meta or {}, checksums=checksums(state))
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        )
        self._manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state, data state) of one step, verified against its checksums."""
        state, data_state, _ = self.restore_with_meta(step, abstract_state)
        return state, data_state

    def restore_with_meta(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """(state, data state, meta) of one step, verified against its checksums.

        `abstract_state`: a pytree of jax.ShapeDtypeStruct with shardings (the restore target).
        """
        step_dir = epath.Path(self.directory) / str(step)
        has_meta = (step_dir / "meta").exists()  # checkpoints written before the meta item have none
        items = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        if has_meta:
            items["meta"] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        meta = dict(restored["meta"]) if has_meta else {}
        if has_meta:
            if "checksums" not in meta:
                raise CorruptCheckpoint("its meta item has no checksums")
            verify(restored["state"], meta["checksums"])
        if not isinstance(restored["data"], dict):
            raise CorruptCheckpoint("its data item is not a JSON object")
        return restored["state"], restored["data"], meta

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """The parameters of one step only (the optimizer state is never read), verified against
        their checksums; any failure is one CheckpointError."""
        step_dir = epath.Path(self.directory) / str(step)
        target = {"params": abstract_params}
        try:
            restored = ocp.PyTreeCheckpointer().restore(
                step_dir / "state",
                args=ocp.args.PyTreeRestore(
                    item=target,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True,
                ),
            )
            if (step_dir / "meta").exists():
                saved = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "meta")["checksums"]
                # TrainState paths read `.params[...]`; the restored dict's read `['params'][...]`.
                expected = {
                    "['params']" + k[len(".params") :]: v for k, v in saved.items() if k.startswith(".params")
                }
                verify(restored, expected)
        except Exception as e:  # noqa: BLE001 - every unreadable checkpoint is reported the same way
            others = [s for s in self.all_steps() if s != step]
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} cannot be restored ({_reason(e)})"
                + (f"; other steps there: {others}" if others else "")
            ) from e
        return restored["params"]

    def read_meta(self, step: int) -> dict:
        """The meta item of one step ({} for checkpoints written before it existed)."""
        path = epath.Path(self.directory) / str(step) / "meta"
        if not path.exists():
            return {}
        return dict(ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path))

    def restore_latest(
        self, abstract_state: Any, config: dict | None = None, saved_config: dict | None = None
    ) -> tuple[int, Any, dict, dict] | None:
        """The newest intact checkpoint as (step, state, data state, meta); None if there is none.

        `config`: the run's config as a dict; where the checkpoint's arrays do not fit `abstract_state`,
        the error names the fields that differ from the config it was written with (its meta, else
        `saved_config`, the workdir's config.json). Only damaged checkpoints are set aside (and the
        previous one tried); see restore_errors for the other cases.
        """
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            self._refuse_if_only_set_aside()
            return None
        failures = []
        for step in steps:
            self._check_layout(step, abstract_state, config, saved_config)
            restored, kind, error = self._restore_with_retries(step, abstract_state)
            if restored is not None:
                if failures:
                    logging.warning(
                        "Restored step %d after setting aside %d damaged checkpoint(s)", step, len(failures)
                    )
                return (step, *restored)
            if kind != restore_errors.DAMAGED:
                what = "the storage kept failing" if kind == restore_errors.TRANSIENT else "unexpected error"
                older = [s for s in steps if s < step]
                raise CheckpointError(
                    f"checkpoint {self.directory}/{step} cannot be read ({what}: {error}); nothing was "
                    "moved. Fix the cause and rerun: the run resumes from it"
                    + (
                        f"; or, if it is damaged, move it to {self.directory.rstrip('/')}_corrupt/ and "
                        f"rerun to resume from step {older[0]}"
                        if older
                        else ""
                    )
                )
            failures.append(f"step {step}: {error}")
            aside = self._set_aside(step)
            msg = f"checkpoint {self.directory}/{step} is damaged ({error}); moved to {aside}"
            logging.warning(msg)
            print(f"jsft: warning: {msg}; trying the previous checkpoint", flush=True)
        raise CheckpointError(
            f"no intact checkpoint in {self.directory} ("
            + "; ".join(failures)
            + f"); the damaged ones are in {self.directory.rstrip('/')}_corrupt/. Start afresh with another "
            "--workdir, or move the set-aside checkpoints out of this one"
        )

    def _check_layout(self, step: int, abstract_state: Any, config: dict | None, saved_config: dict | None):
        """Raise CheckpointMismatch (on every process) if the checkpoint's arrays are not the ones this
        run expects. Unreadable metadata says nothing here: the restore itself judges the bytes."""
        changes = []
        try:
            saved = ocp.PyTreeCheckpointer().metadata(epath.Path(self.directory) / str(step) / "state")
            tree = getattr(saved, "item_metadata", saved)
            changes = restore_errors.layout_changes(getattr(tree, "tree", tree), abstract_state)
        except Exception:  # noqa: BLE001 - damaged metadata: left to the restore and its checksums
            changes = []
        changes = next((c for c in multihost.allgather_json(changes) if c), [])  # the same on every process
        if not changes:
            return
        try:
            written_with = self.read_meta(step).get("config") or saved_config
        except Exception:  # noqa: BLE001 - the arrays are named instead
            written_with = saved_config
        fields = restore_errors.config_changes(written_with, config) if config is not None else []
        raise CheckpointMismatch(restore_errors.mismatch_message(self.directory, step, changes, fields))

    def _restore_with_retries(self, step: int, abstract_state: Any) -> tuple[tuple | None, str, str]:
        """((state, data, meta) or None, kind of failure, reason); every process takes the same branch."""
        for attempt in range(self.retries + 1):
            restored, kind, error = None, "", ""
            try:
                restored = self.restore_with_meta(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - classified: only damaged bytes are set aside
                kind, error = restore_errors.classify(e), _reason(e)
            kinds = multihost.allgather_json(kind)
            if not any(kinds):
                return restored, "", ""
            # One process's transient failure makes them all retry; any other failure decides.
            kind = next(
                (k for k in (restore_errors.TRANSIENT, restore_errors.UNKNOWN) if k in kinds), "damaged"
            )
            error = error or "another process could not restore it"
            if kind != restore_errors.TRANSIENT or attempt == self.retries:
                return None, kind, error
            logging.warning("Reading checkpoint %s/%d failed (%s); retrying", self.directory, step, error)
            time.sleep(self.retry_wait_s * 2**attempt)
        raise AssertionError("unreachable")

    def _refuse_if_only_set_aside(self) -> None:
        """A run whose checkpoints were all set aside must not silently start again at step 0."""
        aside = epath.Path(f"{self.directory.rstrip('/')}_corrupt")
        if aside.exists() and any(aside.iterdir()):
            raise CheckpointError(
                f"{self.directory} holds no checkpoint, but {aside} holds set-aside ones "
                f"({sorted(p.name for p in aside.iterdir())}): this run is not started afresh over them. "
                f"Move an intact one back into {self.directory}/ (as its step number) to resume from "
                f"it, or remove {aside} to start afresh, or use another --workdir"
            )

    def _set_aside(self, step: int) -> str:
        src = epath.Path(self.directory) / str(step)
        dst_root = epath.Path(f"{self.directory.rstrip('/')}_corrupt")
        dst = dst_root / f"{step}-{int(time.time())}"
        if jax.process_index() == 0 and src.exists():
            dst_root.mkdir(parents=True, exist_ok=True)
            src.rename(dst)
        multihost.barrier("jsft_checkpoint_set_aside")
        self._manager.reload()
        return str(dst)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


class BestCheckpoint:
    """The record of the best value of one metric, whose checkpoint is a regular one kept out of the
    keep-N rotation (`Checkpointer.keep_step`): an improvement costs no second, synchronous save.

    The record (step, value, evaluations since the best, for early stopping) travels in the regular
    checkpoints' meta item, so after a restart every process compares against the same best value;
    `best.json` beside the checkpoints is a copy for people (and for `--checkpoint=best`).
    """

    def __init__(
        self,
        checkpointer: Checkpointer,
        metric: str,
        mode: str,
        record: dict | None = None,
        is_main: bool = True,
    ):
        if mode not in ("max", "min"):
            raise ValueError(f"config.train.best_mode={mode!r} must be 'max' or 'min'")
        self.metric, self.mode, self.is_main = metric, mode, is_main
        self.checkpointer = checkpointer
        self.record = dict(record or {"step": None, "value": None, "evals_since_best": 0})
        checkpointer.keep_step(self.record["step"])

    def _better(self, value: float) -> bool:
        best = self.record["value"]
        if not np.isfinite(value):
            return False
        return best is None or (value > best if self.mode == "max" else value < best)

    def update(self, step: int, metrics: dict) -> bool:
        """True if `metrics[metric]` beats the best so far: the caller then saves a checkpoint of this
        step (if it does not anyway), which the rotation keeps."""
        if self.metric not in metrics:
            raise ConfigError(
                f"config.train.best_metric={self.metric!r} is not among the eval metrics {sorted(metrics)}"
            )
        value = float(metrics[self.metric])
        improved = self._better(value)
        if improved:
            self.record = {"step": step, "value": value, "evals_since_best": 0}
            self.checkpointer.keep_step(step)
        else:
            self.record["evals_since_best"] += 1
        return improved

    def write_record(self) -> None:
        """best.json beside the checkpoints (local or gs://), once the best step's save is under way."""
        if self.is_main and self.record["step"] is not None:
            (epath.Path(self.checkpointer.directory) / BEST_JSON).write_text(json.dumps(self.record))


BEST_JSON = "best.json"


def best_step(ckpt: Checkpointer) -> int | None:
    """The best step of a checkpoint directory: the latest checkpoint's record, else best.json."""
    try:
        latest = ckpt.latest_step()
        record = (ckpt.read_meta(latest).get("best") or {}) if latest is not None else {}
    except Exception:  # noqa: BLE001 - a damaged meta: fall back to the copy
        record = {}
    if record.get("step") is None:
        path = epath.Path(ckpt.directory) / BEST_JSON
        record = json.loads(path.read_text()) if path.exists() else {}
    return record.get("step")
