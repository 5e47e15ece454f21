"""Orbax checkpoints of the train state, the data iterator's position and the loop's own record.

Each checkpoint is a step directory holding three items:
  state   the TrainState pytree (orbax, sharded; restores onto any mesh)
  data    the data iterator's position (JSON)
  meta    JSON: a checksum of every array (verified on restore), the best-checkpoint record and the
          data-stream fingerprint, so every process of a resumed run reads the same values

Orbax writes into a temporary directory and renames it when complete, so a crash or SIGTERM during a
save leaves the previous checkpoint as the latest one. Restore goes further: a latest checkpoint that
cannot be read, or whose arrays do not match their checksums, is set aside (moved to
`<directory>_corrupt/`) with a warning, and the newest intact one is restored instead.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jsft.errors import ConfigError
from jsft.parallel import multihost

# Two sets of per-dimension odd multipliers: each array gets two position-weighted sums mod 2**32.
_PRIMES = ((2654435761, 2246822519, 3266489917, 668265263), (374761393, 3550635113, 1500450271, 2870177450))


class CheckpointError(RuntimeError):
    """No checkpoint could be restored; the message names the directory and each step's reason."""


class CorruptCheckpoint(ValueError):
    """A checkpoint whose arrays differ from the checksums written when it was saved."""


def _as_uint32(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size == 8:  # [..., 2] words
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, {2: jnp.uint16, 1: jnp.uint8}[size]).astype(jnp.uint32)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """Two position-weighted sums of the bits (uint32, wrapping): order-independent reductions, so the
    value is the same on any mesh, and any changed word changes it (but for a 2**-64 chance)."""
    bits = _as_uint32(x)
    sums = []
    for primes in _PRIMES:
        weight = jnp.ones(bits.shape, jnp.uint32)
        for d in range(bits.ndim):
            iota = jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d)
            weight = weight + iota * jnp.uint32(primes[d % len(primes)] + 2 * (d // len(primes)))
        sums.append(jnp.sum(bits * (weight | jnp.uint32(1)), dtype=jnp.uint32))
    return jnp.stack(sums)


_checksums_jit = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def checksums(tree: Any) -> dict[str, list[int]]:
    """{leaf path: [two uint32 sums]} of a pytree of (possibly sharded) arrays; computed on device."""
    sums = jax.device_get(_checksums_jit(tree))
    flat, _ = jax.tree_util.tree_flatten_with_path(sums)
    return {jax.tree_util.keystr(path): [int(v) for v in np.asarray(leaf)] for path, leaf in flat}


def verify(tree: Any, expected: dict[str, list[int]]) -> None:
    actual = checksums(tree)
    bad = sorted(k for k in expected if actual.get(k) != expected[k])
    missing = sorted(set(expected) ^ set(actual))
    if bad or missing:
        raise CorruptCheckpoint(
            f"array contents differ from the checksums written at save time: {(bad + missing)[:4]}"
            + (f" and {len(bad) + len(missing) - 4} more" if len(bad) + len(missing) > 4 else "")
        )


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:300]}"


class Checkpointer:
    def __init__(self, directory: str, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # leftovers of a save killed with -9
        )
        self.directory = directory
        self._manager = ocp.CheckpointManager(directory, options=options)

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

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict, dict] | None:
        """The newest intact checkpoint as (step, state, data state, meta); None if there is none.

        A checkpoint that fails to restore is moved aside with a warning and the previous one is tried;
        if every one fails, CheckpointError lists each step's reason.
        """
        failures = []
        for step in sorted(self.all_steps(), reverse=True):
            error = None
            try:
                state, data_state, meta = self.restore_with_meta(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped, with its reason
                error = _reason(e)
            # Every process must take the same branch: one that failed makes them all move on.
            if not multihost.any_process(error is not None):
                if failures:
                    logging.warning(
                        "Restored step %d after setting aside %d bad checkpoint(s)", step, len(failures)
                    )
                return step, state, data_state, meta
            error = error or "another process could not restore it"
            failures.append(f"step {step}: {error}")
            aside = self._set_aside(step)
            msg = f"checkpoint {self.directory}/{step} cannot be restored ({error}); moved to {aside}"
            logging.warning(msg)
            print(f"jsft: warning: {msg}; trying the previous checkpoint", flush=True)
        if failures:
            raise CheckpointError(
                f"no intact checkpoint in {self.directory} ("
                + "; ".join(failures)
                + f"); the broken ones are in {self.directory}_corrupt/. Start afresh with another "
                "--workdir, or remove the checkpoints directory"
            )
        return None

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
    """Keeps the checkpoint with the best value of one metric, apart from the keep-K rotation.

    The record (step, value, evaluations since the best, for early stopping) travels in the regular
    checkpoints' meta item, so after a restart every process compares against the same best value;
    `best.json` in the best directory is a copy for people.
    """

    def __init__(
        self, directory: str, metric: str, mode: str, record: dict | None = None, is_main: bool = True
    ):
        if mode not in ("max", "min"):
            raise ValueError(f"config.train.best_mode={mode!r} must be 'max' or 'min'")
        self.metric, self.mode, self.is_main = metric, mode, is_main
        self.checkpointer = Checkpointer(directory, keep=1, async_save=False)
        self.record = dict(record or {"step": None, "value": None, "evals_since_best": 0})

    def _better(self, value: float) -> bool:
        best = self.record["value"]
        if not np.isfinite(value):
            return False
        return best is None or (value > best if self.mode == "max" else value < best)

    def update(self, step: int, metrics: dict, state: Any, data_state: dict, meta: dict) -> bool:
        """Save `state` if `metrics[metric]` beats the best so far; True if it did."""
        if self.metric not in metrics:
            raise ConfigError(
                f"config.train.best_metric={self.metric!r} is not among the eval metrics {sorted(metrics)}"
            )
        value = float(metrics[self.metric])
        improved = self._better(value)
        if improved:
            self.record = {"step": step, "value": value, "evals_since_best": 0}
            self.checkpointer.save(step, state, data_state, dict(meta, best=self.record))
            self.checkpointer.wait()
        else:
            self.record["evals_since_best"] += 1
        if self.is_main and "://" not in self.checkpointer.directory:
            path = epath.Path(self.checkpointer.directory) / "best.json"
            path.write_text(json.dumps(self.record))
        return improved

    def close(self) -> None:
        self.checkpointer.close()
