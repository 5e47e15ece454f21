"""Mixture-of-Experts import/export proven against `transformers` (tiny random Qwen3-MoE and Mixtral,
CPU, fp32): logits, the load-balancing loss, and exact round trips."""

import dataclasses

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the hf extra (torch==2.13.0, transformers) is not installed")
transformers = pytest.importorskip("transformers")

from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func  # noqa: E402

from jsft.interop import hf  # noqa: E402
from jsft.models.registry import ModelDef  # noqa: E402
from tests.conftest import packed_row  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")

VOCAB = 300
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    num_experts_per_tok=2,
)
FAMILIES = {
    # a dense layer in the middle (mlp_only_layers), top-k probabilities not renormalised
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            num_hidden_layers=3,
            intermediate_size=48,
            moe_intermediate_size=24,
            num_experts=4,
            mlp_only_layers=[1],
        ),
    ),
    # decoder_sparse_step=2: layers 0 and 2 dense, 1 and 3 sparse; 8 experts renormalised
    "qwen3_moe_step": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            num_hidden_layers=4,
            intermediate_size=40,
            moe_intermediate_size=16,
            num_experts=8,
            decoder_sparse_step=2,
            norm_topk_prob=True,
            tie_word_embeddings=True,
        ),
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_hidden_layers=2, intermediate_size=24, num_local_experts=8, sliding_window=6),
    ),
}
KERNELS = ["auto", "reference", "chunked", "flash", "splash", "xla_sdpa"]


def _save_tiny(name, directory):
    config_cls, model_cls, extra = FAMILIES[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**COMMON, **extra)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:  # random norms too, so a mapping slip cannot hide behind ones
                p.add_(torch.randn_like(p) * 0.1)
            if pname.endswith("gate.weight"):  # decisive routers: no near-ties in the top-k choice
                p.mul_(30.0)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def _hf(model, ids, mask=None):
    with torch.no_grad():
        mask = None if mask is None else torch.tensor(mask)
        return model(torch.tensor(ids), attention_mask=mask, output_router_logits=True)


def _margin(out, k=2):
    """The smallest gap between the k-th and (k+1)-th router probability of any token and layer."""
    gaps = []
    for logits in out.router_logits:
        top = torch.topk(torch.softmax(logits.float(), -1), k + 1, dim=-1).values
        gaps.append(float((top[:, k - 1] - top[:, k]).min()))
    return min(gaps)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    model = _save_tiny(request.param, str(d))
    cfg = hf.config_from_hf(hf.read_config(str(d)))
    return request.param, d, model, cfg, hf.load_params(str(d), cfg)


def test_configs_become_the_expected_stacks(family):
    name, _, _, cfg, params = family
    expected = {"qwen3_moe": (1,), "qwen3_moe_step": (0, 2), "mixtral": ()}[name]
    assert cfg.dense_layers == expected and cfg.n_experts == (4 if name == "qwen3_moe" else 8)
    assert cfg.norm_topk_prob == (name != "qwen3_moe")
    assert ("dense_layers" in params) == bool(expected)


@pytest.mark.parametrize("kernel", KERNELS)
def test_logits_match_transformers(family, kernel):
    name, _, model, cfg, params = family
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 20))
    out = _hf(model, ids)
    assert _margin(out) > 1e-6, "near-tied routing (fp32 error ~1e-7 could flip it): pick another seed"
    ours = np.asarray(jax.jit(ModelDef.create(dataclasses.replace(cfg, attention=kernel)).apply)(params, ids))
    err = np.abs(ours - out.logits.numpy()).max()
    print(f"{name} ({kernel}): max abs logit error {err:.2e}")
    assert err < 1e-4


def test_aux_loss_equals_transformers_without_and_with_an_attention_mask(family):
    _, _, model, cfg, params = family
    model_def = ModelDef.create(cfg)
    router = jax.jit(lambda p, ids, pos, seg: model_def.features_and_router(p, ids, pos, seg)[2])
    ids = np.random.default_rng(2).integers(0, VOCAB, (2, 16))
    positions = np.broadcast_to(np.arange(16), (2, 16))
    out = _hf(model, ids)
    ours = router(params, ids, positions, np.ones((2, 16), np.int32))
    print(f"aux: jsft {float(ours['aux']):.8f}, transformers {float(out.aux_loss):.8f}")
    np.testing.assert_allclose(ours["aux"], out.aux_loss.numpy(), rtol=1e-6)
    # Right padding: transformers given the mask counts only the real tokens, and so does jsft.
    mask = np.ones((2, 16), np.int64)
    mask[0, 11:], mask[1, 5:] = 0, 0
    masked = _hf(model, ids, mask)
    ours = router(params, ids, positions, mask.astype(np.int32))
    np.testing.assert_allclose(ours["aux"], masked.aux_loss.numpy(), rtol=1e-6)
    assert abs(float(masked.aux_loss) - float(out.aux_loss)) > 1e-4  # the mask really changes it


def test_a_packed_row_matches_each_example_alone_in_logits_and_aux_loss(family):
    _, _, model, cfg, params = family
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, VOCAB, 11), rng.integers(0, VOCAB, 7)
    row, segs, pos = packed_row(a, b, pad=2)
    model_def = ModelDef.create(cfg)
    packed = np.asarray(jax.jit(model_def.apply)(params, row, pos, segs))[0]
    out_a, out_b = _hf(model, a[None]), _hf(model, b[None])
    assert np.abs(packed[:11] - out_a.logits[0].numpy()).max() < 1e-4
    assert np.abs(packed[11:18] - out_b.logits[0].numpy()).max() < 1e-4
    # transformers' loss over the two examples' router logits together = jsft's over the packed row
    together = tuple(
        torch.cat([la, lb]) for la, lb in zip(out_a.router_logits, out_b.router_logits, strict=True)
    )
    expected = load_balancing_loss_func(together, cfg.n_experts, cfg.experts_per_token)
    ours = jax.jit(lambda p: model_def.features_and_router(p, row, pos, segs)[2])(params)
    np.testing.assert_allclose(ours["aux"], expected.numpy(), rtol=1e-6)


def test_export_loads_in_transformers_with_identical_logits_and_reimports_bit_exactly(family, tmp_path):
    _, source, model, cfg, params = family
    model_type = hf.read_config(str(source))["model_type"]
    hf.save_pretrained(str(tmp_path), params, cfg, model_type, dtype="float32", bos_id=1, eos_id=2)
    from safetensors import safe_open  # noqa: PLC0415

    def keys(d):
        with safe_open(str(d / "model.safetensors"), "np") as f:
            return set(f.keys())

    assert keys(tmp_path) == keys(source)  # the per-expert layout transformers itself writes
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = np.random.default_rng(3).integers(0, VOCAB, (1, 16))
    assert np.abs(_hf(reloaded, ids).logits.numpy() - _hf(model, ids).logits.numpy()).max() == 0.0
    again_cfg = hf.config_from_hf(hf.read_config(str(tmp_path)))
    assert again_cfg == cfg
    again = hf.load_params(str(tmp_path), again_cfg)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), params, again)


def test_transformers_in_memory_fused_experts_load_to_the_same_params(family, tmp_path):
    import shutil  # noqa: PLC0415

    from safetensors.torch import save_file  # noqa: PLC0415

    _, source, model, cfg, params = family
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}  # tied: two copies
    assert any(k.endswith("experts.gate_up_proj") for k in state)  # transformers' own fused names
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(source / "config.json", tmp_path / "config.json")
    fused = hf.load_params(str(tmp_path), cfg)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), params, fused)


def test_moe_fields_jsft_does_not_implement_are_refused_by_name():
    base = dict(COMMON, num_hidden_layers=2, intermediate_size=24, moe_intermediate_size=16, num_experts=4)
    with pytest.raises(hf.UnsupportedCheckpoint, match="shared_expert_intermediate_size=64"):
        hf.config_from_hf(dict(base, model_type="qwen3_moe", shared_expert_intermediate_size=64))
    with pytest.raises(hf.UnsupportedCheckpoint, match="router_jitter_noise=0.1"):
        hf.config_from_hf(dict(base, model_type="mixtral", num_local_experts=4, router_jitter_noise=0.1))
    with pytest.raises(hf.UnsupportedCheckpoint, match="model_type 'qwen2_moe' is not supported"):
        hf.config_from_hf(dict(base, model_type="qwen2_moe"))
    cfg = hf.config_from_hf(
        dict(base, model_type="qwen3_moe", output_router_logits=True, router_aux_loss_coef=0.01)
    )
    assert cfg.router_aux_loss_coef == 0.01  # transformers adds it in training only with output_router_logits
    assert (
        hf.config_from_hf(dict(base, model_type="qwen3_moe", router_aux_loss_coef=0.01)).router_aux_loss_coef
        == 0
    )
    with pytest.raises(hf.UnsupportedCheckpoint, match="is not a mixtral"):
        hf.config_to_hf(cfg, "mixtral", "float32", 1, 2)
    with pytest.raises(hf.UnsupportedCheckpoint, match="is not a qwen3"):
        hf.config_to_hf(cfg, "qwen3", "float32", 1, 2)


SHARDED = r"""
import sys, jax, numpy as np
from jsft.interop import hf
from jsft.models.registry import ModelDef
from jsft.parallel import sharding
from jsft.parallel.mesh import build_mesh
d = sys.argv[1]
cfg = hf.config_from_hf(hf.read_config(d))
model = ModelDef.create(cfg)
mesh = build_mesh((1, 2, 2))
plain = hf.load_params(d, cfg)
ids = np.random.default_rng(0).integers(0, 300, (4, 12))
expected = np.asarray(jax.jit(model.apply)(plain, ids))
for expert in ("", "tensor"):  # today's rule, and experts split over a mesh axis
    rules = sharding.parse_rules(dict(batch="data,fsdp", embed="fsdp", mlp="tensor", heads="tensor",
                                      kv_heads="tensor", vocab="tensor", head_dim="", layers="", seq="",
                                      expert=expert))
    shardings = sharding.param_shardings(model.abstract_params(), model.logical_axes(), mesh, rules)
    sharded = hf.load_params(d, cfg, shardings)
    for a, b, s in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain), jax.tree.leaves(shardings)):
        assert a.sharding == s
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with sharding.use_rules(mesh, rules):
        np.testing.assert_allclose(np.asarray(jax.jit(model.apply)(sharded, ids)), expected, atol=2e-5)
    print(expert or "-", shardings["layers"]["moe"]["gate_proj"].spec)
# A train step on the mesh equals the unsharded one; each batch shard sorts only its own assignments.
import optax
from jsft.train.state import TrainState
from jsft.train.step import make_train_step
batch = dict(inputs=ids, targets=np.roll(ids, -1, 1), positions=np.broadcast_to(np.arange(12), (4, 12)),
             segment_ids=np.ones((4, 12), np.int32), loss_mask=np.ones((4, 12), np.int32))
tx = optax.sgd(1.0)
step = jax.jit(make_train_step(model, tx, optax.constant_schedule(1.0)))
ref, _ = step(TrainState.create(plain, tx, jax.random.key(1)), batch)
with sharding.use_rules(mesh, rules):
    state = TrainState.create(sharded, tx, jax.random.key(1))
    placed = jax.device_put(batch, sharding.batch_sharding(mesh, rules))
    new, _ = step(state, placed)
    hlo = step.lower(state, placed).compile().as_text()
for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
sorts = [line for line in hlo.splitlines() if " sort(" in line]
sorted_sizes = {line.split("sort(")[0].split("(s32[")[1].split("]")[0] for line in sorts}
assert sorted_sizes == {"48"}, sorted_sizes  # 2 of 4 rows x 12 tokens x 2 experts, not all 96
print("ok")
"""


@pytest.mark.slow
def test_experts_stream_into_their_shardings_and_run_sharded(tmp_path):
    import sys  # noqa: PLC0415

    from tests import zygote  # noqa: PLC0415
    from tests.conftest import cpu_env  # noqa: PLC0415

    _save_tiny("qwen3_moe", str(tmp_path))
    r = zygote.run(
        [sys.executable, "-c", SHARDED, str(tmp_path)],
        env=cpu_env(4),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[-1] == "ok" and "P(None, 'tensor', 'fsdp', None)" in r.stdout
