"""RoPE scalings (jsft/models/rope.py) against `transformers`: yarn and dynamic NTK frequencies and
fp32 logits of tiny random models past their original context, a packed row, generation with a KV
cache, the export round trip, and the refusals by name."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the hf extra (torch==2.13.0, transformers) is not installed")
transformers = pytest.importorskip("transformers")

from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from jsft.interop import hf  # noqa: E402
from jsft.models.llama import LlamaConfig  # noqa: E402
from jsft.models.registry import ModelDef  # noqa: E402
from jsft.models.rope import rope_frequencies  # noqa: E402
from tests.conftest import packed_row  # noqa: E402
from tests.interop.test_hf import COMMON as HF_COMMON  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")

COMMON = dict(HF_COMMON, num_hidden_layers=2)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
DYNAMIC = {"rope_type": "dynamic", "factor": 3.0}
# Tiny models whose RoPE scaling bites within 56 tokens: YaRN from an original context of 16 (Qwen3's
# shape of setting; with mscale/mscale_all_dim; with an explicit attention factor, betas and no
# rounding), dynamic NTK past max_position_embeddings=16.
CASES = {
    "qwen3_yarn": ("Qwen3", dict(head_dim=24, rope_theta=1000000.0, rope_scaling=YARN)),
    "llama_yarn_mscale": (
        "Llama",
        dict(rope_theta=100.0, rope_scaling={**YARN, "factor": 8.0, "mscale": 0.9, "mscale_all_dim": 0.4}),
    ),
    "llama_yarn_attention_factor": (
        "Llama",
        dict(
            rope_theta=100.0,
            rope_scaling={
                **YARN,
                "attention_factor": 1.3,
                "beta_fast": 4,
                "beta_slow": 0.25,
                "truncate": False,
            },
        ),
    ),
    "llama_dynamic": (
        "Llama",
        dict(max_position_embeddings=16, rope_scaling=DYNAMIC),
    ),
}


def _hf_logits(model, ids, **kwargs):
    """transformers' logits for `ids` from a fresh RoPE state: its dynamic scaling keeps the longest
    length it has seen until a call shorter than max_position_embeddings (one token) resets it."""
    with torch.no_grad():
        model(torch.zeros((1, 1), dtype=torch.long))
        return model(torch.tensor(ids), **kwargs).logits.float().numpy()


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    family, extra = CASES[request.param]
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(**{**COMMON, **extra})
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():  # norms off their ones, so a q/k norm slip cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    d = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(str(d), safe_serialization=True)
    cfg = hf.config_from_hf(hf.read_config(str(d)))
    return request.param, d, model, cfg, hf.load_params(str(d), cfg)


def test_logits_match_transformers_past_the_original_context(case):
    name, _, model, cfg, params = case
    ids = np.random.default_rng(0).integers(0, 96, (2, 56))
    err = np.abs(np.asarray(ModelDef.create(cfg).apply(params, ids)) - _hf_logits(model, ids)).max()
    print(f"{name}: max abs logit error {err:.2e} ({dict(cfg.rope_scaling)})")
    assert err < 1e-4


def test_a_packed_row_gives_each_example_what_it_gets_alone(case):
    # Dynamic: the 40-token example is scaled from its own length, the 12-token one not at all.
    _, _, model, cfg, params = case
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 96, 40), rng.integers(0, 96, 12)
    row, segs, pos = packed_row(a, b, pad=4)
    packed = np.asarray(ModelDef.create(cfg).apply(params, row, pos, segs))[0]
    err_a = np.abs(packed[:40] - _hf_logits(model, a[None])[0]).max()
    err_b = np.abs(packed[40:52] - _hf_logits(model, b[None])[0]).max()
    print(f"{case[0]}: packed, max abs logit error {max(err_a, err_b):.2e}")
    assert err_a < 1e-4 and err_b < 1e-4


def test_decoding_with_a_kv_cache_matches_transformers_step_by_step(case):
    # One prompt of 12 tokens (padded to 16 slots), then 24 steps fed known tokens: dynamic scaling
    # starts past position 15, each step from its own length; cached keys keep their rotation.
    _, _, model, cfg, params = case
    ids = np.random.default_rng(2).integers(0, 96, (1, 36))
    with torch.no_grad():
        model(torch.zeros((1, 1), dtype=torch.long))  # a fresh dynamic state (see _hf_logits)
        out = model(torch.tensor(ids[:, :12]), use_cache=True)
        theirs = [out.logits[0, -1].numpy()]
        for i in range(12, 36):
            out = model(torch.tensor(ids[:, i : i + 1]), cache=out.cache, use_cache=True)
            theirs.append(out.logits[0, -1].numpy())
    model = ModelDef.create(cfg)
    prompt = jnp.asarray(np.concatenate([ids[:, :12], np.zeros((1, 4), np.int64)], axis=1))
    module = model.module(params)
    logits, cache = module.cached_forward(
        prompt, jnp.zeros(1, jnp.int32), jnp.arange(16)[None] < 12, module.init_cache(1, 40), jnp.array([11])
    )
    step = jax.jit(lambda p, tok, i, c: model.module(p).cached_forward(tok, i, jnp.ones((1, 1), bool), c))
    ours = [np.asarray(logits[0, 0])]
    for i in range(12, 36):
        logits, cache = step(params, jnp.asarray(ids[:, i : i + 1]), jnp.array([i]), cache)
        ours.append(np.asarray(logits[0, 0]))
    err = np.abs(np.stack(ours) - np.stack(theirs)).max()
    print(f"{case[0]}: decoding, max abs logit error {err:.2e}")
    assert err < 1e-4


def test_export_writes_the_scaling_back_exactly(case, tmp_path):
    name, src, model, cfg, params = case
    hf.save_pretrained(str(tmp_path), params, cfg, hf.read_config(str(src))["model_type"], dtype="float32")
    source, exported = (json.loads((d / "config.json").read_text()) for d in (src, tmp_path))
    assert exported["rope_parameters"] == source["rope_parameters"]
    assert exported["max_position_embeddings"] == (16 if name == "llama_dynamic" else 8192)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = np.random.default_rng(3).integers(0, 96, (1, 40))
    assert np.abs(_hf_logits(reloaded, ids) - _hf_logits(model, ids)).max() == 0.0
    assert hf.config_from_hf(exported).rope_scaling == cfg.rope_scaling


def _theirs(config, seq_len=None):
    kind = config.rope_parameters["rope_type"]
    inv_freq, factor = ROPE_INIT_FUNCTIONS[kind](config, None, seq_len=seq_len)
    return np.asarray(inv_freq), factor


@pytest.mark.parametrize(
    "fields",
    [
        dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}),  # original := max_position_embeddings
        dict(rope_scaling={**YARN, "factor": None}, max_position_embeddings=80),  # factor := 80 / 16
        dict(rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}),  # attention factor 1
        dict(rope_scaling={**YARN, "mscale": 0.7}),  # without mscale_all_dim: ignored
        dict(rope_scaling={**YARN, "beta_fast": 0, "beta_slow": 0.5, "truncate": None}),  # 0 means 32
        dict(rope_scaling={**YARN, "factor": 1.0}),  # no interpolation, attention factor 1
        dict(rope_scaling={**YARN, "original_max_position_embeddings": 4096}, rope_theta=500000),
        dict(rope_scaling=LLAMA3),  # original := max_position_embeddings here too
    ],
)
def test_yarn_frequencies_and_fallbacks_are_transformers(fields):
    hf_fields = {**COMMON, **fields, "model_type": "llama"}
    config = transformers.LlamaConfig(**{k: v for k, v in hf_fields.items() if k != "model_type"})
    cfg = hf.config_from_hf(hf_fields)
    inv_freq, factor = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    want_inv_freq, want_factor = _theirs(config)
    np.testing.assert_allclose(np.asarray(inv_freq), want_inv_freq, rtol=2e-7)
    assert factor == want_factor


@pytest.mark.parametrize("factor", [2.0, 3.7])
def test_dynamic_frequencies_follow_the_length_as_in_transformers(factor):
    hf_fields = dict(COMMON, max_position_embeddings=16, rope_scaling={**DYNAMIC, "factor": factor})
    config = transformers.LlamaConfig(**hf_fields)
    cfg = hf.config_from_hf({**hf_fields, "model_type": "llama"})
    lengths = np.array([[1, 16, 17, 40, 1000]])
    inv_freq, _ = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, jnp.asarray(lengths))
    default, _ = _theirs(config)  # what transformers keeps up to max_position_embeddings
    for k, length in enumerate(lengths[0]):
        want = _theirs(config, torch.tensor(length))[0] if length > 16 else default
        # rtol: XLA's and torch's float32 powers of the grown base differ by an ulp or two.
        np.testing.assert_allclose(np.asarray(inv_freq[0, k]), want, rtol=1e-6, err_msg=str(length))


@pytest.mark.parametrize(
    ("rope", "message"),
    [
        ({**YARN, "alpha": 1.0}, "rope_scaling: 'alpha' is not a field of yarn scaling"),
        ({**DYNAMIC, "beta_fast": 32}, "'beta_fast' is not a field of dynamic"),
        ({"rope_type": "dynamic"}, "dynamic needs 'factor'"),
        ({**YARN, "rope_type": "longrope"}, "rope_type='longrope' is not supported"),
        ({**YARN, "partial_rotary_factor": 0.5}, r"partial_rotary_factor=0.5 \(jsft rotates whole heads\)"),
    ],
)
def test_what_jsft_does_not_compute_is_refused_by_name(rope, message):
    with pytest.raises(hf.UnsupportedCheckpoint, match=message):
        hf.config_from_hf(dict(model_type="llama", rope_scaling=rope, **COMMON))
    layout5 = dict(model_type="llama", rope_parameters={"rope_theta": 1e4, **rope}, **COMMON)
    with pytest.raises(hf.UnsupportedCheckpoint, match=message.replace("rope_scaling", "rope_parameters")):
        hf.config_from_hf(layout5)


def test_a_jsft_config_refuses_an_incomplete_or_unknown_scaling():
    with pytest.raises(ValueError, match="rope_scaling: yarn needs 'original_max_position_embeddings'"):
        LlamaConfig.tiny(rope_scaling=(("rope_type", "yarn"), ("factor", 4.0)))
    with pytest.raises(ValueError, match="rope_type='ntk' is not supported"):
        LlamaConfig.tiny(rope_scaling=(("rope_type", "ntk"),))
