"""Damaged checkpoints are detected, set aside and the newest intact one restored; checkpoints of
another config and transient read errors are errors that move nothing; the best step is kept."""

import errno
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsft.train import restore_errors
from jsft.train.checkpoint import (
    BestCheckpoint,
    Checkpointer,
    CheckpointError,
    CheckpointMismatch,
    best_step,
    checksums,
)


def _state(seed: float):
    return {
        "w": jnp.arange(4096, dtype=jnp.float32).reshape(64, 64) * seed,
        "b": jnp.full((7,), seed, jnp.bfloat16),
        "step": jnp.asarray(int(seed), jnp.int32),
    }


def _target():
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), _state(1.0))


def _save_two(directory):
    ckpt = Checkpointer(directory, keep=5, async_save=False)
    for step in (2, 4):
        ckpt.save(step, _state(float(step)), {"position": step}, {"note": step})
    ckpt.wait()
    ckpt.close()


def _one(pattern):
    found = glob.glob(pattern, recursive=True)
    assert found, pattern
    return max(found, key=os.path.getsize)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(max(os.path.getsize(path) // 2, 0))


def _overwrite_16_bytes(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\xff" * 16)


CORRUPTIONS = {
    "truncated array file": lambda d: _truncate(_one(f"{d}/4/state/**/d/*")),
    "16 overwritten bytes": lambda d: _overwrite_16_bytes(_one(f"{d}/4/state/**/d/*")),
    "truncated _METADATA": lambda d: _truncate(f"{d}/4/state/_METADATA"),
    "truncated data position": lambda d: _truncate(f"{d}/4/data/metadata"),
    "missing state/": lambda d: __import__("shutil").rmtree(f"{d}/4/state"),
    "emptied manifest": lambda d: open(f"{d}/4/state/manifest.ocdbt", "w").close(),
}


def test_checksums_are_independent_of_sharding_and_see_any_change():
    state = _state(3.0)
    base = checksums(state)
    mesh = jax.make_mesh((len(jax.devices()),), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = dict(
        state, w=jax.device_put(state["w"], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x")))
    )
    assert checksums(sharded) == base
    changed = dict(state, w=state["w"].at[17, 3].add(1.0))
    assert checksums(changed)["['w']"] != base["['w']"]
    swapped = dict(state, w=state["w"].at[0, 1].set(state["w"][0, 2]).at[0, 2].set(state["w"][0, 1]))
    assert checksums(swapped)["['w']"] != base["['w']"]  # the position counts, not only the values


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_a_corrupted_latest_checkpoint_falls_back_to_the_previous_intact_one(how, tmp_path, capsys):
    directory = str(tmp_path / "checkpoints")
    _save_two(directory)
    CORRUPTIONS[how](directory)
    ckpt = Checkpointer(directory, keep=5)
    step, state, data_state, meta = ckpt.restore_latest(_target())
    assert step == 2 and data_state == {"position": 2} and meta["note"] == 2
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_state(2.0)["w"]))
    assert "checkpoint" in capsys.readouterr().out  # one warning line naming it
    assert ckpt.all_steps() == [2]
    assert os.listdir(tmp_path / "checkpoints_corrupt")  # set aside, not deleted
    ckpt.save(4, _state(4.0), {"position": 4})  # the replayed step saves again
    ckpt.wait()
    assert ckpt.all_steps() == [2, 4]
    ckpt.close()


def test_no_intact_checkpoint_is_one_clear_error(tmp_path):
    directory = str(tmp_path / "checkpoints")
    _save_two(directory)
    CORRUPTIONS["missing state/"](directory)
    _truncate(f"{directory}/2/data/metadata")
    ckpt = Checkpointer(directory, keep=5)
    with pytest.raises(CheckpointError, match="no intact checkpoint in .*step 4: .*step 2: "):
        ckpt.restore_latest(_target())
    ckpt.close()


def test_an_empty_directory_restores_nothing(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=5)
    assert ckpt.restore_latest(_target()) is None
    ckpt.close()


def test_the_best_checkpoint_is_a_regular_one_kept_out_of_the_rotation(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=1, async_save=False)
    best = BestCheckpoint(ckpt, "eval/loss", "min")
    for step, loss in ((3, 2.0), (6, float("nan")), (9, 2.5)):
        if best.update(step, {"eval/loss": loss}):
            assert step == 3  # NaN never wins
        ckpt.save(step, _state(float(step)), {}, {"best": best.record})
        best.write_record()
    ckpt.wait()
    assert best.record == {"step": 3, "value": 2.0, "evals_since_best": 2}
    assert ckpt.all_steps() == [3, 9]  # keep=1 keeps the latest, and the best besides it
    ckpt.close()
    # A restart hands the record from the regular checkpoint's meta: the best step stays kept.
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=1, async_save=False)
    resumed = BestCheckpoint(ckpt, "eval/loss", "min", record=ckpt.read_meta(9)["best"])
    ckpt.save(10, _state(10.0), {}, {"best": resumed.record})
    assert ckpt.all_steps() == [3, 10]
    assert resumed.update(12, {"eval/loss": 1.0})
    ckpt.save(12, _state(12.0), {}, {"best": resumed.record})
    resumed.write_record()
    assert ckpt.all_steps() == [12]  # the old best leaves the rotation once a new one is saved
    assert json.loads((tmp_path / "checkpoints" / "best.json").read_text())["step"] == 12
    assert best_step(ckpt) == 12
    ckpt.close()


def _snapshot(directory) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), directory)] = f.read()
    return out


def test_a_checkpoint_of_another_config_is_one_error_naming_the_fields_and_nothing_moves(tmp_path):
    directory = str(tmp_path / "checkpoints")
    ckpt = Checkpointer(directory, keep=5, async_save=False)
    for step in (2, 4):
        ckpt.save(step, _state(float(step)), {}, {"config": {"model": {"mlp_dim": 64}, "seed": 0}})
    ckpt.close()
    before = _snapshot(directory)
    wider = dict(_target(), w=jax.ShapeDtypeStruct((64, 96), jnp.float32))
    ckpt = Checkpointer(directory, keep=5)
    with pytest.raises(CheckpointMismatch, match=r"step 4 .*model\.mlp_dim: 64 in the checkpoint, 96 now"):
        ckpt.restore_latest(wider, config={"model": {"mlp_dim": 96}, "seed": 0})
    # Without a config to compare, the arrays are named; a dtype counts as much as a shape.
    bf16 = dict(_target(), w=jax.ShapeDtypeStruct((64, 64), jnp.bfloat16))
    with pytest.raises(CheckpointMismatch, match=r"w float32 in the checkpoint, bfloat16 now"):
        ckpt.restore_latest(bf16)
    extra = dict(_target(), lora=jax.ShapeDtypeStruct((4,), jnp.float32))
    with pytest.raises(CheckpointMismatch, match=r"lora not in the checkpoint"):
        ckpt.restore_latest(extra)
    assert _snapshot(directory) == before and not os.path.exists(f"{directory}_corrupt")
    assert ckpt.restore_latest(_target())[0] == 4  # the checkpoint's own config still resumes
    ckpt.close()


def _failing_reads(monkeypatch, failures: int, directory: str) -> list:
    """Make the next `failures` reads of array `w` of step 4 fail in TensorStore, as a disk or object
    store read error surfaces there (an injected read error on one array file)."""
    import tensorstore  # noqa: PLC0415

    calls, original = [], tensorstore.open

    def open_(spec, *args, **kwargs):
        kvstore = spec.get("base", {}).get("kvstore", {}) if isinstance(spec, dict) else {}
        if kvstore.get("path") == "w" and "/4/state" in kvstore.get("base", {}).get("path", ""):
            calls.append(4)
            if len(calls) <= failures:
                raise ValueError(
                    'UNAVAILABLE: Error reading "w/0.0" in OCDBT database at local file '
                    f'"{directory}/4/state/": [OS error 5: Input/output error]'
                )
        return original(spec, *args, **kwargs)

    monkeypatch.setattr(tensorstore, "open", open_)
    return calls


def test_a_transient_read_error_is_retried_and_never_moves_a_checkpoint(tmp_path, monkeypatch):
    directory = str(tmp_path / "checkpoints")
    _save_two(directory)
    calls = _failing_reads(monkeypatch, 2, directory)
    ckpt = Checkpointer(directory, keep=5, retries=3, retry_wait_s=0.0)
    step, state, _, _ = ckpt.restore_latest(_target())
    assert step == 4 and calls == [4, 4, 4]  # read again: the bytes were fine
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_state(4.0)["w"]))
    ckpt.close()
    before = _snapshot(directory)
    monkeypatch.undo()
    _failing_reads(monkeypatch, 100, directory)
    ckpt = Checkpointer(directory, keep=5, retries=2, retry_wait_s=0.0)
    with pytest.raises(
        CheckpointError, match=r"checkpoint .*/4 cannot be read .*Input/output error.*nothing was moved"
    ):
        ckpt.restore_latest(_target())
    assert _snapshot(directory) == before and not os.path.exists(f"{directory}_corrupt")
    assert ckpt.all_steps() == [2, 4]
    ckpt.close()


@pytest.mark.parametrize(
    "error, kind",
    [
        (
            ValueError('UNAVAILABLE: Error reading "w/0.0" in OCDBT database at gs://b/ckpt/4/state/'),
            "transient",
        ),
        (
            RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 96000000000 bytes."),
            "transient",
        ),
        (MemoryError(), "transient"),
        (OSError(errno.EACCES, "Permission denied", "/ckpt/4/state/d/x"), "transient"),
        (ValueError("UNKNOWN: Error reading local file: Input/output error [OS error 5]"), "transient"),
        (ValueError('DATA_LOSS: Error decoding local file "/ckpt/4/state/manifest.ocdbt"'), "damaged"),
        (
            ValueError("OUT_OF_RANGE: Requested byte range [0, 10359) is not valid for value of size 5332"),
            "damaged",
        ),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/ckpt/4/meta"), "damaged"),
        (KeyError('Item "state" was not found in the checkpoint.'), "damaged"),
        (TypeError("'NoneType' object is not subscriptable"), "unknown"),
    ],
)
def test_restore_failures_are_told_apart(error, kind):
    wrapped = Exception("Encountered error while reading array index")
    wrapped.__cause__ = error  # orbax wraps tensorstore's error: the cause decides
    assert restore_errors.classify(error) == kind
    assert restore_errors.classify(wrapped) == kind


def test_a_directory_with_only_set_aside_checkpoints_is_refused_not_restarted(tmp_path):
    directory = str(tmp_path / "checkpoints")
    _save_two(directory)
    CORRUPTIONS["missing state/"](directory)
    _truncate(f"{directory}/2/data/metadata")
    ckpt = Checkpointer(directory, keep=5)
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        ckpt.restore_latest(_target())
    ckpt.close()
    ckpt = Checkpointer(directory, keep=5)  # the next run: an empty directory, but not a fresh start
    with pytest.raises(CheckpointError, match=r"holds set-aside ones .*remove .*_corrupt to start afresh"):
        ckpt.restore_latest(_target())
    assert len(os.listdir(f"{directory}_corrupt")) == 2  # never deleted
    ckpt.close()
