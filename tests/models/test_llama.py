import collections
import contextlib
import dataclasses
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from jsft.models.llama import LOGICAL_AXES, REMAT_POLICIES, LlamaConfig
from jsft.models.registry import ModelDef

jax.config.update("jax_default_matmul_precision", "float32")


@pytest.fixture(scope="module")
def model_and_params():
    model = ModelDef.create(LlamaConfig.tiny(vocab_size=64))
    return model, jax.jit(model.init)(jax.random.key(0))


def test_changing_a_future_token_never_changes_earlier_logits(model_and_params):
    model, params = model_and_params
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    changed = tokens.at[:, 9].set((tokens[:, 9] + 1) % 64)
    a, b = model.apply(params, tokens), model.apply(params, changed)
    np.testing.assert_array_equal(a[:, :9], b[:, :9])
    assert not np.allclose(a[:, 9:], b[:, 9:])


def test_packed_examples_do_not_see_each_other_and_match_unpacked(model_and_params):
    model, params = model_and_params
    rng = np.random.default_rng(0)
    ex1, ex2 = rng.integers(0, 64, 7), rng.integers(0, 64, 5)
    row = np.zeros((1, 16), np.int32)
    row[0, :7], row[0, 7:12] = ex1, ex2
    segs = np.array([[1] * 7 + [2] * 5 + [0] * 4])
    pos = np.array([list(range(7)) + list(range(5)) + [0] * 4])
    packed = model.apply(params, row, pos, segs)
    alone1 = model.apply(params, ex1[None])
    alone2 = model.apply(params, ex2[None])
    np.testing.assert_allclose(packed[0, :7], alone1[0], atol=1e-5)
    np.testing.assert_allclose(packed[0, 7:12], alone2[0], atol=1e-5)
    # Changing the first example leaves the second one's logits untouched.
    row2 = row.copy()
    row2[0, 3] = (row2[0, 3] + 1) % 64
    np.testing.assert_array_equal(model.apply(params, row2, pos, segs)[0, 7:12], packed[0, 7:12])


def test_every_parameter_has_logical_axes_of_its_rank(model_and_params):
    model, params = model_and_params
    axes = model.logical_axes()
    flat_p = jax.tree_util.tree_leaves_with_path(params)
    flat_a = dict(jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, tuple)))
    for path, p in flat_p:
        names = flat_a[path]
        assert len(names) == p.ndim, (path, names, p.shape)
        assert set(names) <= set(LOGICAL_AXES)
    assert axes["layers"]["attn"]["q_proj"] == ("layers", "embed", "heads", "head_dim")


@pytest.mark.parametrize("remat", [r for r in REMAT_POLICIES if r != "none"])
def test_remat_policy_changes_nothing_numerically(model_and_params, remat):
    model, params = model_and_params
    other = ModelDef.create(LlamaConfig.tiny(vocab_size=64, remat=remat))
    tokens = jax.random.randint(jax.random.key(2), (2, 8), 0, 64)

    def loss(m, p):
        return jnp.mean(m.apply(p, tokens) ** 2)

    g1, g2 = jax.grad(lambda p: loss(model, p))(params), jax.grad(lambda p: loss(other, p))(params)
    # Rematerialisation recomputes in another fusion order: float32 noise of ~1e-7 in absolute terms
    # (seen on an AMD EPYC host: 1 element of 4096 off by 1.3e-7), so atol is 1e-6, not a bitwise claim.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g2)


# What each named policy keeps per layer for the backward (stacked over the layers by scan), by shape
# in the tiny model below: D = [L, B, T, d_model] (the layer's input; o_proj and down_proj outputs),
# NH = q_proj / attention_out [L, B, T, heads, head_dim], KH = k_proj / v_proj, F = gate_proj / up_proj.
KEPT = {
    "full": {"D": 1},
    "save_attention_out": {"D": 1, "NH": 1},
    "save_dots_except_mlp": {"D": 2, "NH": 2, "KH": 2},
    "save_dots": {"D": 2, "NH": 2, "KH": 2, "F": 2},  # (down_proj's output feeds only a sum: not needed)
    "offload": {"D": 2, "NH": 2, "KH": 2, "F": 2},
}


@pytest.mark.parametrize("remat", sorted(KEPT))
def test_a_named_remat_policy_keeps_exactly_its_activations(remat):
    cfg = LlamaConfig.tiny(vocab_size=64, d_model=48, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=96)
    model = ModelDef.create(dataclasses.replace(cfg, remat=remat))
    params = model.init(jax.random.key(0))
    tokens = jnp.zeros((2, 16), jnp.int32)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(lambda p: jnp.sum(model.apply(p, tokens)), params)
    L = cfg.n_layers  # noqa: N806
    names = {(L, 2, 16, 48): "D", (L, 2, 16, 4, 8): "NH", (L, 2, 16, 2, 8): "KH", (L, 2, 16, 96): "F"}
    kept, on_host = collections.Counter(), collections.Counter()
    for line in out.getvalue().splitlines():
        m = re.match(r"f32(<host>)?\[([\d,]*)\] output of scan", line)
        shape = m and tuple(int(d) for d in m.group(2).split(","))
        if shape in names:  # (the scan's final carry, [B, T, D], is not per layer)
            name = names[shape]
            kept[name] += 1
            on_host[name] += bool(m.group(1))
    assert dict(kept) == KEPT[remat], out.getvalue()
    # offload moves every kept projection and the attention output to host memory; the layer input
    # (scan's carry) stays on the device.
    expected_host = {k: v - (k == "D") for k, v in KEPT[remat].items()} if remat == "offload" else {}
    assert {k: v for k, v in on_host.items() if v} == {k: v for k, v in expected_host.items() if v}


def test_tied_embeddings_and_bf16_compute():
    cfg = LlamaConfig.tiny(vocab_size=64, tie_embeddings=True, compute_dtype="bfloat16")
    model = ModelDef.create(cfg)
    params = model.init(jax.random.key(0))
    assert "lm_head" not in params
    assert cfg.num_params() == sum(p.size for p in jax.tree.leaves(params))
    logits = model.apply(params, jnp.zeros((1, 4), jnp.int32))
    assert logits.dtype == jnp.float32 and logits.shape == (1, 4, 64)


def test_bad_shapes_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="n_kv_heads"):
        LlamaConfig.tiny(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="remat"):
        LlamaConfig.tiny(remat="sometimes")
