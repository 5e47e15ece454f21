"""Hugging Face import/export proven by logits against `transformers` (tiny random models, CPU, fp32)."""

import dataclasses
import json
import os
import re

import jax
import numpy as np
import pytest

from tests.conftest import cpu_env

torch = pytest.importorskip("torch", reason="the hf extra (torch==2.13.0, transformers) is not installed")
transformers = pytest.importorskip("transformers")

from jsft.interop import hf  # noqa: E402
from jsft.models import attention  # noqa: E402
from jsft.models.registry import ModelDef  # noqa: E402
from tests import zygote  # noqa: E402
from tests.conftest import packed_row  # noqa: E402
from tests.data.test_templates import hf_dir  # noqa: E402, F401  (the fixture)

jax.config.update("jax_default_matmul_precision", "float32")

COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)
GEMMA3 = dict(
    head_dim=16,
    query_pre_attn_scalar=24,
    sliding_window=5,
    sliding_window_pattern=2,
    rope_theta=1_000_000.0,
    rope_local_base_freq=10.0,
    rope_scaling={"rope_type": "linear", "factor": 8.0},
)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=500000.0)),
    "llama3_scaled_tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=6)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24)),
    # Small caps and window so soft-capping and the alternating sliding window really bite.
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            head_dim=16,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
            sliding_window=5,
            tie_word_embeddings=True,
        ),
    ),
    # Global layers rotate with rope_theta and a linear scaling, sliding ones with their own base; no
    # soft-caps (as Gemma 3 ships), so every kernel takes it.
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", GEMMA3),
}


def _save_tiny(name, directory):
    config_cls, model_cls, extra = FAMILIES[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**COMMON, **extra)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random norms/biases too, so a mapping slip cannot hide behind ones/zeros
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    model = _save_tiny(request.param, str(d))
    cfg = hf.config_from_hf(hf.read_config(str(d)))
    params = hf.load_params(str(d), cfg)
    return request.param, d, model, cfg, params


@pytest.mark.parametrize("kernel", ["auto", "reference", "chunked", "flash", "splash", "xla_sdpa"])
def test_logits_match_transformers(family, kernel):
    name, _, model, cfg, params = family
    try:
        attention.resolve(kernel, cfg.attn_softcap, per_layer_windows=bool(cfg.layer_windows))
    except ValueError as e:  # a kernel this family cannot use is refused, naming why (Gemma 2)
        assert (name, kernel) == ("gemma2", "xla_sdpa") and "soft-cap" in str(e), e
        return
    ids = np.random.default_rng(0).integers(0, 96, (2, 20))
    ours = np.asarray(ModelDef.create(dataclasses.replace(cfg, attention=kernel)).apply(params, ids))
    err = np.abs(ours - _hf_logits(model, ids)).max()
    print(f"{name} ({kernel}): max abs logit error {err:.2e}")
    assert err < 1e-4


def test_gemma3_logits_match_transformers_with_the_gpu_kernel_interpreted(tmp_path):
    """pallas_gpu (Pallas interpret mode here) with Gemma 3's per-layer windows and two RoPE bases;
    the other families' GPU-kernel equivalence is tests/models/test_attention.py's."""
    model = _save_tiny("gemma3_text", str(tmp_path))
    cfg = hf.config_from_hf(hf.read_config(str(tmp_path)))
    ids = np.random.default_rng(0).integers(0, 96, (2, 20))
    gpu_kernel = ModelDef.create(dataclasses.replace(cfg, attention="pallas_gpu"))
    err = np.abs(
        np.asarray(gpu_kernel.apply(hf.load_params(str(tmp_path), cfg), ids)) - _hf_logits(model, ids)
    ).max()
    print(f"gemma3_text (pallas_gpu, interpreted): max abs logit error {err:.2e}")
    assert err < 1e-4


def test_a_packed_row_matches_each_example_alone(family):
    _, _, model, cfg, params = family
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 96, 11), rng.integers(0, 96, 7)
    row, segs, pos = packed_row(a, b, pad=2)
    packed = np.asarray(ModelDef.create(cfg).apply(params, row, pos, segs))[0]
    assert np.abs(packed[:11] - _hf_logits(model, a[None])[0]).max() < 1e-4
    assert np.abs(packed[11:18] - _hf_logits(model, b[None])[0]).max() < 1e-4


def test_export_loads_in_transformers_with_identical_logits_and_reimports_bit_exactly(family, tmp_path):
    name, _, model, cfg, params = family
    family_name = hf.read_config(str(family[1]))["model_type"]
    hf.save_pretrained(
        str(tmp_path), params, cfg, family_name, dtype="float32", bos_id=1, eos_id=2, max_shard_bytes=40_000
    )  # small shards: exercise the index
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = np.random.default_rng(2).integers(0, 96, (1, 16))
    assert np.abs(_hf_logits(reloaded, ids) - _hf_logits(model, ids)).max() == 0.0
    again = hf.load_params(str(tmp_path), hf.config_from_hf(hf.read_config(str(tmp_path))))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), params, again)


def test_unsupported_architectures_and_pickle_checkpoints_are_refused(tmp_path):
    with pytest.raises(hf.UnsupportedCheckpoint, match="model_type 'gpt2' is not supported"):
        hf.config_from_hf({"model_type": "gpt2"})
    cfg = dict(model_type="llama", hidden_act="gelu", mlp_bias=True, **COMMON)
    with pytest.raises(hf.UnsupportedCheckpoint, match=r"hidden_act='gelu'.*mlp_bias=true"):
        hf.config_from_hf(cfg)
    with pytest.raises(hf.UnsupportedCheckpoint, match="rope_type='longrope' is not supported"):
        hf.config_from_hf(
            dict(model_type="llama", rope_scaling={"rope_type": "longrope", "factor": 4.0}, **COMMON)
        )
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(hf.UnsupportedCheckpoint, match=r"only pickle weights .*safetensors only"):
        hf.load_params(str(tmp_path), hf.config_from_hf(dict(model_type="llama", **COMMON)))
    os.remove(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        hf.load_params(str(tmp_path), hf.config_from_hf(dict(model_type="llama", **COMMON)))


def _save_tiny_gemma3_image_text(directory):
    """A tiny Gemma3ForConditionalGeneration (a one-layer SigLIP tower on 28-pixel images)."""
    torch.manual_seed(0)
    text = dict(COMMON, **GEMMA3)
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = transformers.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=93,
        eoi_token_index=94,
        image_token_index=95,
    )
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def test_the_language_model_of_a_gemma3_image_text_checkpoint_imports_and_exports_as_gemma3_text(
    tmp_path, caplog
):
    from safetensors.numpy import load_file, save_file  # noqa: PLC0415

    src = tmp_path / "src"
    model = _save_tiny_gemma3_image_text(str(src))
    ids = np.random.default_rng(3).integers(0, 93, (2, 20))  # text only: no image tokens
    want = _hf_logits(model, ids)
    cfg = hf.config_from_hf(hf.read_config(str(src)))
    assert cfg.local_rope_theta == 10.0 and cfg.layer_windows == (5, 0, 5)
    with caplog.at_level("INFO"):
        params = hf.load_params(str(src), cfg)
    assert "vision tower and projector" in caplog.text
    ours = np.asarray(ModelDef.create(cfg).apply(params, ids))
    print(f"gemma3 image-text: max abs logit error {np.abs(ours - want).max():.2e}")
    assert np.abs(ours - want).max() < 1e-4
    # transformers 4.5x's layout (model.language_model.*, model.vision_tower.*) loads the same weights.
    tensors = load_file(str(src / "model.safetensors"))
    renamed = {re.sub(r"^language_model\.model\.", "model.language_model.", k): v for k, v in tensors.items()}
    renamed = {
        re.sub(r"^(vision_tower|multi_modal_projector)\.", r"model.\1.", k): v for k, v in renamed.items()
    }
    assert "model.vision_tower.post_layernorm.weight" in renamed
    save_file(renamed, str(src / "model.safetensors"))
    again = hf.load_params(str(src), cfg)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), params, again)
    # Exported (as its source's model_type), it is a Gemma3ForCausalLM with the same logits.
    hf.save_pretrained(str(tmp_path / "out"), params, cfg, "gemma3", bos_id=2, eos_id=1)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "gemma3_text"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    assert type(reloaded).__name__ == "Gemma3ForCausalLM"
    np.testing.assert_array_equal(_hf_logits(reloaded.eval(), ids), want)


def test_gemma3_configs_in_older_layouts_give_the_same_model(tmp_path):
    """transformers 5 writes per-layer-type `rope_parameters` and `layer_types`; Hub checkpoints of
    transformers 4 have `rope_theta`, `rope_local_base_freq`, `rope_scaling` (global layers only) and
    `sliding_window_pattern`. Both read as transformers reads them."""
    _save_tiny("gemma3_text", str(tmp_path))
    saved = hf.read_config(str(tmp_path))
    older = {
        k: v
        for k, v in saved.items()
        if k not in ("rope_parameters", "layer_types", "_sliding_window_pattern")
    }
    older.update(
        rope_theta=1_000_000.0, rope_local_base_freq=10.0, rope_scaling={"rope_type": "linear", "factor": 8}
    )
    assert transformers.Gemma3TextConfig(**older).layer_types == saved["layer_types"]
    assert hf.config_from_hf(older) == hf.config_from_hf(saved)
    # Without any pattern, transformers makes every 6th layer global.
    seven = {**older, "num_hidden_layers": 7, "sliding_window_pattern": None}
    del seven["sliding_window_pattern"]
    assert hf.config_from_hf(seven).layer_windows == (5,) * 5 + (0, 5)
    assert hf.config_from_hf(seven).layer_windows == tuple(
        5 if t == "sliding_attention" else 0 for t in transformers.Gemma3TextConfig(**seven).layer_types
    )


def test_a_gemma3_config_that_names_only_what_differs_reads_with_transformers_defaults():
    """The Hub's image-text configs (google/gemma-3-4b-it) write a short `text_config` and leave the
    rest to Gemma3TextConfig's defaults; jsft fills in the same values transformers does."""
    short = {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
    }
    short.update(rope_scaling={"factor": 8.0, "rope_type": "linear"}, sliding_window=1024)
    ours = hf.config_from_hf({"model_type": "gemma3", "text_config": short})
    full = transformers.Gemma3Config(text_config=dict(short)).to_dict()
    assert ours == hf.config_from_hf(full)
    assert (ours.vocab_size, ours.head_dim, ours.query_scale, ours.n_kv_heads) == (262_208, 256, 256.0, 4)
    assert ours.layer_windows == tuple(0 if (i + 1) % 6 == 0 else 1024 for i in range(34))
    assert (ours.rope_theta, ours.local_rope_theta, dict(ours.rope_scaling)["factor"]) == (1e6, 1e4, 8.0)


def test_gemma3_fields_jsft_does_not_implement_are_refused_by_name():
    saved = dict(model_type="gemma3_text", **COMMON, **GEMMA3)
    for field, value, match in [
        ("attn_logit_softcapping", 50.0, "attn_logit_softcapping=50.0"),
        ("use_bidirectional_attention", True, "use_bidirectional_attention=true"),
        ("layer_types", ["sliding_attention", "chunked_attention", "full_attention"], "'chunked_attention'"),
        ("sliding_window", None, "sliding_window=null with sliding_attention layers"),
        ("hidden_activation", "gelu", "hidden_activation='gelu'"),
        ("rope_parameters", {"rope_type": "default", "rope_theta": 1.0}, "one entry per layer type"),
    ]:
        with pytest.raises(hf.UnsupportedCheckpoint, match=re.escape(match)):
            hf.config_from_hf({**saved, field: value})
    with pytest.raises(hf.UnsupportedCheckpoint, match="rope_scaling with 'type' and no 'rope_type'"):
        hf.config_from_hf({**saved, "rope_scaling": {"type": "linear", "factor": 8.0}})
    with pytest.raises(hf.UnsupportedCheckpoint, match="rope_type='longrope'"):
        hf.config_from_hf({**saved, "rope_scaling": {"rope_type": "longrope", "factor": 4.0}})
    with pytest.raises(hf.UnsupportedCheckpoint, match="without text_config"):
        hf.config_from_hf({"model_type": "gemma3"})
    # Export: a model whose math the written config would not give is refused, naming why.
    cfg = hf.config_from_hf(saved)
    with pytest.raises(hf.UnsupportedCheckpoint, match="attn_softcap=50.0 cannot be exported as gemma3_text"):
        hf.config_to_hf(dataclasses.replace(cfg, attn_softcap=50.0), "gemma3_text", "float32", 2, 1)
    with pytest.raises(hf.UnsupportedCheckpoint, match="local_rope_theta=10.0.*is not a gemma2"):
        hf.config_to_hf(dataclasses.replace(cfg, qk_norm=False), "gemma2", "float32", 2, 1)
    with pytest.raises(ValueError, match="layer_windows has none"):
        dataclasses.replace(cfg, layer_windows=(0, 0, 0))


SHARDED_LOAD = r"""
import sys, jax, numpy as np
from jsft.interop import hf
from jsft.models.registry import ModelDef
from jsft.parallel import sharding
from jsft.parallel.mesh import build_mesh
d = sys.argv[1]
cfg = hf.config_from_hf(hf.read_config(d))
model = ModelDef.create(cfg)
mesh = build_mesh((1, 2, 2))
rules = sharding.parse_rules(dict(batch="data,fsdp", embed="fsdp", mlp="tensor", heads="tensor",
                                  kv_heads="tensor", vocab="tensor", head_dim="", layers="", seq=""))
shardings = sharding.param_shardings(model.abstract_params(), model.logical_axes(), mesh, rules)
sharded, plain = hf.load_params(d, cfg, shardings), hf.load_params(d, cfg)
for (path, a), b, s in zip(jax.tree_util.tree_leaves_with_path(sharded), jax.tree.leaves(plain),
                           jax.tree.leaves(shardings)):
    assert a.sharding == s, (path, a.sharding, s)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
print("ok", len(jax.tree.leaves(sharded)))
"""


def test_weights_stream_into_their_shardings(tmp_path):
    import sys

    _save_tiny("qwen3", str(tmp_path))  # the placement code is family-independent
    env = cpu_env(4)
    r = zygote.run(
        [sys.executable, "-c", SHARDED_LOAD, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok")


def _llama_with_special_ids(directory):
    """A tiny Llama saved with Llama-3-like metadata: several EOS ids, a pad id, a short context."""
    torch.manual_seed(0)
    ids = dict(bos_token_id=1, eos_token_id=[2, 0, 1], pad_token_id=0)
    config = transformers.LlamaConfig(**{**COMMON, "max_position_embeddings": 77}, **ids)
    transformers.LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    transformers.GenerationConfig(**ids, do_sample=True, temperature=0.6, top_p=0.9).save_pretrained(
        directory
    )


def test_export_carries_the_source_special_ids_context_length_and_generation_config(hf_dir, tmp_path):  # noqa: F811
    from jsft.data.tokenizer import load_tokenizer  # noqa: PLC0415
    from jsft.interop.hf_metadata import export_metadata  # noqa: PLC0415
    from tests import tiny_config  # noqa: PLC0415

    src, out = tmp_path / "src", tmp_path / "out"
    _llama_with_special_ids(str(src))
    for name in ("tokenizer.json", "tokenizer_config.json"):  # eos <|im_end|>=2, pad <|endoftext|>=0
        (src / name).write_text((hf_dir / name).read_text())
    config = tiny_config.get_config(str(tmp_path))
    config.model.hf_path, config.data.template = str(src), "hf"
    cfg = hf.config_from_hf(hf.read_config(str(src)))
    tok = load_tokenizer(str(src))
    hf.save_pretrained(
        str(out),
        hf.load_params(str(src), cfg),
        cfg,
        "llama",
        tokenizer_dir=str(src),
        **export_metadata(config, tok),
    )
    exported = json.loads((out / "config.json").read_text())
    assert exported["max_position_embeddings"] == 77
    assert (exported["bos_token_id"], exported["eos_token_id"], exported["pad_token_id"]) == (1, [2, 0, 1], 0)
    generation = transformers.GenerationConfig.from_pretrained(str(out))
    assert generation.eos_token_id == [2, 0, 1] and generation.pad_token_id == 0
    assert generation.temperature == 0.6 and generation.top_p == 0.9  # the source's sampling defaults
    loaded = transformers.AutoConfig.from_pretrained(str(out))
    assert loaded.max_position_embeddings == 77 and loaded.eos_token_id == [2, 0, 1]


def test_export_of_a_model_trained_from_scratch_uses_the_tokenizer_and_seq_len(hf_dir, tmp_path):  # noqa: F811
    from jsft.data.tokenizer import load_tokenizer  # noqa: PLC0415
    from jsft.interop.hf_metadata import export_metadata  # noqa: PLC0415
    from tests import tiny_config  # noqa: PLC0415

    config = tiny_config.get_config(str(tmp_path))
    config.data.tokenizer, config.data.template, config.data.seq_len = str(hf_dir), "chatml", 48
    tok = load_tokenizer(str(hf_dir))
    meta = export_metadata(config, tok)
    assert meta["max_position_embeddings"] == 48 and meta["generation_config"] is None
    assert (meta["bos_id"], meta["eos_id"], meta["pad_id"]) == (None, tok.token_id("<|im_end|>"), 0)
    model = ModelDef.create(hf.config_from_hf(dict(model_type="llama", **COMMON)))
    hf.save_pretrained(str(tmp_path / "out"), model.init(jax.random.key(0)), model.config, "llama", **meta)
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.token_id("<|im_end|>") and generation["pad_token_id"] == 0


def _fill_hub_cache(cache, repo_id, commit="0123456789abcdef0123456789abcdef01234567"):
    """The layout huggingface_hub writes: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    _save_tiny("qwen3", str(snapshot))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_a_hub_id_resolves_to_its_cached_snapshot_offline(tmp_path, monkeypatch):
    cache = tmp_path / "hf_home" / "hub"
    snapshot = _fill_hub_cache(cache, "tiny-org/tiny-qwen")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    resolved = hf.resolve_path("tiny-org/tiny-qwen")
    assert os.path.realpath(resolved) == os.path.realpath(snapshot)
    hf.check_directory(resolved)  # a loadable checkpoint
    assert hf.resolve_path(str(snapshot)) == str(snapshot)  # local directories are returned as they are
    with pytest.raises(hf.UnsupportedCheckpoint) as e:
        hf.resolve_path("tiny-org/not-downloaded")
    message = str(e.value)
    assert message.startswith(
        "config.model.hf_path='tiny-org/not-downloaded' is not a local directory and is not in the "
        f"Hugging Face cache ({cache}"
    )
    assert "hf download tiny-org/not-downloaded" in message and "HF_HUB_OFFLINE=0" in message
    with pytest.raises(hf.UnsupportedCheckpoint, match="no such directory"):
        hf.resolve_path(str(tmp_path / "missing" / "dir" / "x"))


def test_check_directory_refuses_what_cannot_be_loaded_naming_the_key(tmp_path):
    where = f"config.model.hf_path={str(tmp_path)!r}"
    with pytest.raises(hf.UnsupportedCheckpoint, match=re.escape(where) + ": no config.json there"):
        hf.check_directory(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(
        hf.UnsupportedCheckpoint, match=re.escape(where) + ": model_type 'gpt2' is not supported"
    ):
        hf.check_directory(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(dict(model_type="llama", **COMMON)))
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(hf.UnsupportedCheckpoint) as e:
        hf.check_directory(str(tmp_path))
    assert str(e.value).startswith(f"{where} holds only pickle weights (pytorch_model.bin)")
    hf.check_directory(str(tmp_path), weights=False)  # --mode export/eval of jsft checkpoints need no weights
    os.remove(tmp_path / "pytorch_model.bin")
    with pytest.raises(hf.UnsupportedCheckpoint, match="no weights"):
        hf.check_directory(str(tmp_path))
