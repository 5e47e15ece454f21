"""End-to-end runs of the training loop on tiny data: resume, checkpoints, metrics files."""

import json
import os

import pytest

from jsft.modes.train import train_and_evaluate
from jsft.train.checkpoint import Checkpointer


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _losses(workdir):
    return {m["step"]: m["train/loss"] for m in _metrics(workdir) if "train/loss" in m}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["table", "stream"])
def test_interrupted_run_reproduces_the_uninterrupted_loss_curve_exactly(tiny_config, tmp_path, engine):
    # Two sources in a weighted mixture, so the data position spans sampler, pack chunks and epochs.
    tiny_config.data.engine = engine
    tiny_config.data.shard_bytes = 1024  # stream: several shards per source
    tiny_config.data.shuffle_window = 16
    import ml_collections

    from configs.demo import source
    from tests.conftest import make_records, write_jsonl

    write_jsonl(
        tmp_path / "b.jsonl",
        [{"instruction": r["prompt"], "output": r["response"]} for r in make_records(50, 9)],
    )
    tiny_config.data.sources = ml_collections.ConfigDict(
        {"a": tiny_config.data.sources.demo, "b": source(str(tmp_path / "b.jsonl"), weight=0.5)}
    )
    tiny_config.data.pack_chunk_examples = 32
    tiny_config.train.steps = 40
    tiny_config.train.checkpoint_every_steps = 10
    tiny_config.train.eval_every_steps = 0
    tiny_config.optim.warmup_steps = 5
    train_and_evaluate(tiny_config, str(tmp_path / "full"))

    resumed = str(tmp_path / "resumed")
    tiny_config.train.stop_after_steps = 20  # the interruption: leave after step 20 ...
    first = train_and_evaluate(tiny_config, resumed)
    assert first["steps"] == 20
    tiny_config.train.stop_after_steps = 0  # ... and rerun the same job to the end
    second = train_and_evaluate(tiny_config, resumed)
    assert second["steps"] == 40

    full_curve, resumed_curve = _losses(tmp_path / "full"), _losses(resumed)
    assert sorted(resumed_curve) == list(range(1, 41)), "no step is logged twice or lost"
    assert resumed_curve == full_curve  # bitwise-equal floats on CPU

    def per_source(workdir):
        return {
            m["step"]: (m.get("train/loss/a"), m.get("train/loss/b"))
            for m in _metrics(workdir)
            if "train/loss" in m
        }

    assert per_source(resumed) == per_source(tmp_path / "full")
    assert sum(b is not None for _, b in per_source(resumed).values()) > 10
    assert _metrics(resumed)[-1]["data/epoch/b"] > 1.0  # the small source went round more than once


@pytest.mark.slow
def test_a_run_writes_checkpoints_metrics_samples_and_tensorboard(tiny_config, tmp_path):
    tiny_config.train.steps = 6
    tiny_config.train.checkpoint_every_steps = 2
    tiny_config.train.keep_checkpoints = 2
    workdir = tmp_path / "run"
    summary = train_and_evaluate(tiny_config, str(workdir))
    ckpt = Checkpointer(str(workdir / "checkpoints"), keep=2)
    # keep-K rotation, and the best step (the demo keeps the best eval exact match) besides it
    assert ckpt.all_steps() == sorted({4, 6, summary["best_step"]})
    ckpt.close()
    rows = _metrics(workdir)
    assert all("step" in r for r in rows)
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert all(0.0 <= r["eval/exact_match"] <= 1.0 for r in evals)
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "data/epoch/demo"} <= set(train_rows[0])
    assert rows[0] == {
        "step": 0,
        "data/demo/skipped_records": 0,
        "data/demo/truncated": 0,
        "data/demo/dropped_overlong": 0,
    }
    assert os.listdir(workdir / "tb")
    assert (workdir / "samples" / "step_000006.jsonl").exists()
    assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 6
    assert (workdir / "tokenizer.model").exists()
    assert summary["eval/loss"] == evals[-1]["eval/loss"]
