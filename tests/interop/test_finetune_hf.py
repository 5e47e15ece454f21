"""Fine-tune an imported HF model through its own tokenizer and chat template, export, reload."""

import json
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the hf extra (torch==2.13.0, transformers) is not installed")
transformers = pytest.importorskip("transformers")

from tests import zygote  # noqa: E402
from tests.conftest import make_records, save_chatml_bpe_tokenizer, write_jsonl  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _main(tmp_path, model_dir, *extra):
    """`jsft.main` on tests/tiny_config.py over tmp_path's data, with the HF model and its template;
    asserts it succeeded. The workdir is tmp_path / "wd"."""
    args = [
        sys.executable,
        "-m",
        "jsft.main",
        f"--config={REPO}/tests/tiny_config.py:{tmp_path}",
        f"--workdir={tmp_path / 'wd'}",
        f"--config.model.hf_path={model_dir}",
        "--config.data.template=hf",
        "--config.data.seq_len=64",
        *extra,
    ]
    r = zygote.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _hf_model_dir(d):
    save_chatml_bpe_tokenizer(d)
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    transformers.Qwen2ForCausalLM(config).save_pretrained(str(d), safe_serialization=True)


@pytest.mark.slow
def test_finetune_an_imported_model_export_and_load_in_transformers(tiny_data_dir, tmp_path):
    model_dir = tmp_path / "qwen_tiny"
    model_dir.mkdir()
    _hf_model_dir(model_dir)
    write_jsonl(tmp_path / "train.jsonl", make_records(200, 5))
    write_jsonl(tmp_path / "val.jsonl", make_records(8, 6))
    wd, out = tmp_path / "wd", tmp_path / "exported"
    train = ["--config.train.steps=8", "--config.optim.lr=0.003"]
    _main(tmp_path, model_dir, *train)
    losses = [
        json.loads(x)["train/loss"]
        for x in (wd / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in x
    ]
    assert losses[-1] < losses[0]
    _main(tmp_path, model_dir, *train, "--mode=export", f"--export_dir={out}", "--export_dtype=float32")
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",  # one file, no index: the model is far below max_shard_bytes
        "tokenizer.json",
        "tokenizer_config.json",
    } <= set(os.listdir(out))

    tuned = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    original = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = tok.apply_chat_template(
        [{"role": "user", "content": "upper: a b"}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        a, b = tuned(ids).logits.numpy(), original(ids).logits.numpy()
    assert np.isfinite(a).all() and np.abs(a - b).max() > 1e-3  # the weights were trained
    assert tuned.config.model_type == "qwen2"
    # The source's context length is carried, and generation stops at the template's end of turn.
    assert tuned.config.max_position_embeddings == 128
    eos = tuned.generation_config.eos_token_id
    assert tok.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])


@pytest.mark.slow
def test_finetune_an_imported_qwen3_moe_logs_router_terms_and_exports_as_qwen3_moe(tmp_path):
    model_dir = tmp_path / "moe_tiny"
    model_dir.mkdir()
    save_chatml_bpe_tokenizer(model_dir)
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        mlp_only_layers=[0],
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
    )
    transformers.Qwen3MoeForCausalLM(config).save_pretrained(str(model_dir), safe_serialization=True)
    write_jsonl(tmp_path / "train.jsonl", make_records(100, 5))
    write_jsonl(tmp_path / "val.jsonl", make_records(8, 6))
    wd, out = tmp_path / "wd", tmp_path / "exported"
    train = ["--config.train.steps=4", "--config.train.log_every_steps=2"]
    _main(tmp_path, model_dir, *train)
    logged = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
    last = logged[-1]
    assert last["train/loss/router_aux"] > 0.5 and last["train/loss/router_z"] > 0
    loads = [last[f"train/moe/load/{e}"] for e in range(4)]
    assert abs(sum(loads) - 1.0) < 1e-5
    _main(tmp_path, model_dir, *train, "--mode=export", f"--export_dir={out}", "--export_dtype=float32")
    tuned = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert tuned.config.model_type == "qwen3_moe" and tuned.config.mlp_only_layers == [0]
    with torch.no_grad():
        assert np.isfinite(tuned(torch.tensor([[1, 2, 3]])).logits.numpy()).all()
