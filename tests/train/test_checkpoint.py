"""Checkpoints that cannot be trusted are detected, set aside, and the newest intact one restored."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsft.train.checkpoint import BestCheckpoint, Checkpointer, CheckpointError, checksums


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


def test_the_best_record_travels_with_the_checkpoint(tmp_path):
    best = BestCheckpoint(str(tmp_path / "best"), "eval/loss", "min")
    assert best.update(3, {"eval/loss": 2.0}, _state(3.0), {}, {})
    assert not best.update(6, {"eval/loss": float("nan")}, _state(6.0), {}, {})  # NaN never wins
    assert best.record == {"step": 3, "value": 2.0, "evals_since_best": 1}
    best.close()
    # A restart hands the record from the regular checkpoint's meta: no file is consulted.
    resumed = BestCheckpoint(str(tmp_path / "best"), "eval/loss", "min", record=dict(best.record))
    assert not resumed.update(9, {"eval/loss": 2.5}, _state(9.0), {}, {})
    assert resumed.update(12, {"eval/loss": 1.0}, _state(12.0), {}, {})
    assert json.loads((tmp_path / "best" / "best.json").read_text())["step"] == 12
    assert resumed.checkpointer.all_steps() == [12]
    resumed.close()
