"""Weights & Biases logging in offline mode (no network): the W&B run holds every metrics.jsonl value
at its step, the resolved config and the sweep trial id; a resumed run keeps its W&B run id (online,
W&B appends to that run; offline, each start is its own offline run directory under that id), and a
fresh start in an old workdir gets a new id."""

import glob
import json
import os
import struct

import pytest

from jsft.errors import ConfigError
from jsft.modes.train import train_and_evaluate


def _records(path: str) -> list:
    """The protobuf records of a .wandb file (a LevelDB-style log: 32 KiB blocks of checksummed chunks
    after a 7-byte ':W&B' header), read without W&B's internals, which change between releases."""
    from wandb.proto import wandb_internal_pb2 as pb  # noqa: PLC0415

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
        elif kind == 0:
            buf = b""
    return out


def _run_of(workdir: str, index: int = -1):
    """(run record, {step: {key: value}}) of the workdir's offline W&B runs (sorted by start)."""
    files = sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "*.wandb")))
    records = _records(files[index])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    history: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            history.setdefault(row["_step"], {}).update(row)
    return run, history


def _metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_offline_run_holds_every_metric_the_config_and_the_trial_and_a_resume_keeps_its_id(
    tiny_config, tmp_path
):
    pytest.importorskip("wandb")
    workdir = str(tmp_path / "w")
    tiny_config.logging.wandb.mode = "offline"
    tiny_config.logging.wandb.group = "demo_lr"
    tiny_config.logging.wandb.trial = "demo_lr/3"
    tiny_config.train.stop_after_steps = 3  # leave after step 3; the rerun resumes
    train_and_evaluate(tiny_config, workdir)
    tiny_config.train.stop_after_steps = 0
    train_and_evaluate(tiny_config, workdir)

    with open(os.path.join(workdir, "wandb_id")) as f:
        run_id = f.read().strip()
    first, history_1 = _run_of(workdir, 0)
    second, history_2 = _run_of(workdir, -1)
    assert first.run_id == second.run_id == run_id and first.run_group == "demo_lr"
    assert "trial-demo_lr/3" in first.tags
    config = {u.key: json.loads(u.value_json) for u in first.config.update}
    assert config["optim"]["lr"] == tiny_config.optim.lr and config["sweep_trial"] == "demo_lr/3"
    assert config["train"]["steps"] == tiny_config.train.steps
    assert max(history_1) == 3 and max(history_2) == tiny_config.train.steps
    history = {**history_1, **history_2}
    for row in _metrics(workdir):
        for key, value in row.items():
            if key != "step":
                assert history[row["step"]][key] == pytest.approx(value, rel=1e-6), (row["step"], key)

    # The checkpoints gone, the same workdir starts afresh: a new W&B run, not the old one reopened.
    import shutil  # noqa: PLC0415

    shutil.rmtree(os.path.join(workdir, "checkpoints"))
    tiny_config.train.steps = 2
    train_and_evaluate(tiny_config, workdir)
    third, history_3 = _run_of(workdir, -1)
    with open(os.path.join(workdir, "wandb_id")) as f:
        assert third.run_id == f.read().strip() != run_id
    assert max(history_3) == 2


def test_bad_or_unavailable_wandb_mode_is_one_config_error(tiny_config, monkeypatch):
    from jsft import config as config_lib  # noqa: PLC0415

    tiny_config.logging.wandb.mode = "on"
    with pytest.raises(ConfigError, match=r"config.logging.wandb.mode='on' is not one of"):
        config_lib.validate(tiny_config)
    tiny_config.logging.wandb.mode = "offline"
    real = config_lib.importlib.util.find_spec
    monkeypatch.setattr(
        config_lib.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name)
    )
    with pytest.raises(ConfigError, match=r"needs the wandb package: pip install 'jsft\[wandb\]'"):
        config_lib.validate(tiny_config)


def test_online_without_a_key_is_one_config_error_and_opens_no_file(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from jsft.train.writer import MetricWriter  # noqa: PLC0415

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc or W&B settings of this machine's user
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    with pytest.raises(ConfigError, match=r"W&B could not start: .*Use mode='offline'"):
        MetricWriter(str(tmp_path), True, {"mode": "online", "project": "p"})
    assert not (tmp_path / "metrics.jsonl").exists()
