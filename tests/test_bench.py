"""`jsft.bench train` on a tiny copy of the shared workload's layout, and the accelerator check's
dry run: both write what they promise, and every kernel agrees with the reference."""

import json
import os
import sys

import numpy as np
import pytest

from jsft.bench import train as bench_train
from jsft.models.llama import LlamaConfig
from tests import zygote

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flops_per_token_follows_the_documented_formula():
    cfg = LlamaConfig(
        vocab_size=8192, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64, mlp_dim=768
    )
    matmul = 4 * (256 * 64 * (2 * 4 + 2 * 2) + 3 * 256 * 768) + 256 * 8192  # projections + head, no lookup
    assert bench_train.flops_per_token(cfg, 512) == 6 * matmul + 6 * 4 * 4 * 64 * 256.5


def test_synthetic_rows_are_packed_examples_with_trained_halves():
    (batch,) = bench_train.synthetic_batches(vocab=100, seq_len=256, steps=1, rows=2)
    seg = batch["segment_ids"]
    assert seg.shape == (2, 256) and (seg > 0).mean() > 0.7
    for r in range(2):
        starts = np.flatnonzero(np.diff(seg[r], prepend=-1) != 0)
        assert all(batch["positions"][r, s] == 0 for s in starts if seg[r, s])  # positions restart
    assert 0 < batch["loss_mask"].sum() < (seg > 0).sum()
    assert batch["inputs"][seg == 0].max() == 0


@pytest.fixture(scope="module")
def tiny_workload(tmp_path_factory):
    """The workload's files at tiny scale: a random HF Llama in init/, packed and padded rows."""
    torch = pytest.importorskip("torch", reason="the hf extra is not installed")
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("bench_data")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(d / "init"), safe_serialization=True)
    rows = bench_train.synthetic_batches(vocab=128, seq_len=64, steps=12, rows=8)
    ids = np.concatenate([b["inputs"] for b in rows])
    labels = np.where(np.concatenate([np.roll(b["loss_mask"], 1, axis=1) for b in rows]) > 0, ids, -100)
    np.save(d / "packed_ids.npy", ids)
    np.save(d / "packed_labels.npy", labels)
    np.save(d / "packed_pos.npy", np.concatenate([b["positions"] for b in rows]))
    np.save(d / "packed_seg.npy", np.concatenate([b["segment_ids"] for b in rows]))
    return d


def _bench(data_dir, tmp_path, name, *overrides):
    out = tmp_path / f"{name}.json"
    env = dict(os.environ, BENCH_DATA=str(data_dir), JAX_PLATFORMS="cpu")
    cmd = [
        sys.executable,
        "-m",
        "jsft.bench",
        "train",
        "--config=configs/bench_workload.py",
        "--train_steps=12",
        f"--json={out}",
        "--config.data.seq_len=64",
        *overrides,
    ]
    r = zygote.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "real tokens/s" in r.stdout
    return json.loads(out.read_text())["jsft"]


@pytest.mark.slow
def test_bench_train_gives_the_reference_loss_curve_with_the_fast_kernels(tiny_workload, tmp_path):
    fast = _bench(tiny_workload, tmp_path, "fast")
    ref = _bench(
        tiny_workload,
        tmp_path,
        "ref",
        "--config.model.attention=reference",
        "--config.loss.implementation=reference",
    )
    np.testing.assert_allclose(fast["losses"], ref["losses"], rtol=1e-5)
    assert abs(fast["losses"][0] - np.log(128)) < 0.2  # a random init on random tokens: ~ln(vocab)
    assert fast["real_tokens_per_s"] > 0 and fast["peak_memory_gb"] > 0
    assert fast["config"]["optim"]["lr"] == 1e-4 and fast["mfu"] is None  # no known peak for a CPU


@pytest.mark.slow
def test_the_accelerator_check_dry_run_writes_both_reports(tmp_path):
    r = zygote.run(
        ["bash", "launch/gpu_check.sh", "--dry-run", str(tmp_path)],
        cwd=REPO,
        env=dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    check = json.loads((tmp_path / "attention_check.json").read_text())
    assert {row["kernel"] for row in check["results"]} == {"flash", "chunked", "xla_sdpa"}
    assert all(row["ok"] for row in check["results"])
    bench = json.loads((tmp_path / "bench_llama1b.json").read_text())["jsft"]
    assert bench["mode"] == "synthetic" and bench["steps"] == 12


@pytest.mark.slow  # ~20 s: writes data, trains a tokenizer, starts a benchmark process
def test_bench_data_at_scale_writes_both_formats_and_measures_each_process(tmp_path):
    from configs import demo
    from jsft.bench import data_scale

    table = data_scale.bench_scale(demo.get_config().data.to_dict(), [0.004], [1], [0], 1.0, str(tmp_path))
    assert sorted(p.name for p in tmp_path.glob("synthetic_*")) == [
        "synthetic_0.004gb.jsonl",
        "synthetic_0.004gb.parquet",
    ]
    assert 2e6 <= (tmp_path / "synthetic_0.004gb.jsonl").stat().st_size < 3e6  # half of the bytes
    row = table.splitlines()[-1].split()
    size, procs, workers, records, tokens, first, rss = row[:7]
    assert (size, procs, workers) == ("0.004", "1", "0") and row[-1] == "100.0%"
    assert float(records.replace(",", "")) > 0 and float(tokens.replace(",", "")) > 0
    assert 0 < float(first) < 60 and 100 < float(rss.replace(",", "")) < 4000
