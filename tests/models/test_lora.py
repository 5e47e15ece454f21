"""LoRA and QLoRA: quantization error within the format's bound, step 0 equals the base, only the
adapters train (bitwise), optimizer state for the adapters only, QLoRA trains, and the planner's base
bytes shrink to the format's size."""

import contextlib
import dataclasses
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from jsft.models import lora, quant
from jsft.models.llama import LlamaConfig
from jsft.models.registry import ModelDef
from jsft.train import optim, trainable
from jsft.train.state import TrainState
from jsft.train.step import make_train_step
from tests.train.test_step import _examples, _optim_cfg, _padded

VOCAB = 64


def _peft(cfg: LlamaConfig, quant_fmt="none", targets="all", rank=4, **kw) -> ModelDef:
    fields = dict(
        lora_rank=rank,
        lora_targets=lora.parse_targets(targets),
        lora_scale=lora.scaling(rank, 8.0, False),
        quant=quant_fmt,
        quant_block=16,
    )
    return ModelDef.create(dataclasses.replace(cfg, **{**fields, **kw}))


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_dequantization_error_is_within_the_formats_bound(fmt):
    w = jax.random.normal(jax.random.key(0), (3, 64, 128)) * jnp.linspace(0.01, 3.0, 128)
    w = w.at[0, 0, :64].set(0.0)  # an all-zero block dequantizes to zeros
    codes, scale = quant.quantize(w, fmt, 64)
    assert codes.dtype == (jnp.int8 if fmt == "int8" else jnp.uint8)
    assert (codes.shape, scale.shape) == quant.stored_shapes(w.shape, fmt, 64)
    back = quant.dequantize(codes, scale, fmt)
    blocks = np.abs(np.asarray(w)).reshape(3, 64, 2, 64).max(-1, keepdims=True)
    err = np.abs(np.asarray(back - w)).reshape(3, 64, 2, 64)
    assert np.all(err <= quant.error_bound(fmt) * blocks * (1 + 1e-6) + 1e-7)
    assert np.all(np.asarray(back)[0, 0, :64] == 0.0)
    # The bound is tight: the largest error seen is close to it (a wrong codebook would be far off).
    assert (err / np.maximum(blocks, 1e-12)).max() > 0.8 * quant.error_bound(fmt)
    # Values on the grid come back exactly (absmax itself, zero).
    assert np.allclose(np.abs(np.asarray(back)).reshape(3, 64, 2, 64).max(-1), blocks[..., 0])


def test_nf4_codes_are_the_nearest_level_packed_two_per_byte():
    levels = jnp.asarray(quant.NF4)
    w = jnp.concatenate([levels, levels[::-1]])[None, :]  # absmax 1: the codes are the indices
    codes, scale = quant.quantize(w, "nf4", 32)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(codes, scale, "nf4")), np.asarray(w))
    assert codes.shape == (1, 16) and int(codes[0, 0]) == (0 << 4) | 1


def test_targets_by_name_hf_name_and_regex_and_refusals():
    assert lora.parse_targets("q,v") == ("attn.q_proj", "attn.v_proj")
    assert lora.parse_targets("q_proj, down_proj") == ("attn.q_proj", "mlp.down_proj")
    assert lora.parse_targets(r"mlp\.") == ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert len(lora.parse_targets("all")) == 7
    with pytest.raises(ValueError, match="'qq' matches no linear projection"):
        lora.parse_targets("q,qq")
    with pytest.raises(ValueError, match="larger than layers.attn.k_proj's 64 x 32 matrix"):
        lora.check_rank(40, {"attn.q_proj": (64, 4, 16), "attn.k_proj": (64, 2, 16)})


@pytest.mark.parametrize("fmt", ["none", "nf4"])
def test_step_zero_is_the_base_model_exactly(fmt):
    base = ModelDef.create(LlamaConfig.tiny(vocab_size=VOCAB))
    model = _peft(base.config, "none" if fmt == "none" else fmt)
    params = model.init(jax.random.key(0))
    tokens = jnp.arange(20).reshape(2, 10) % VOCAB
    if fmt == "none":  # B = 0: the adapted model is the base, bit for bit
        np.testing.assert_array_equal(
            model.apply(params, tokens), base.apply(base.init(jax.random.key(0)), tokens)
        )
    else:  # the base is quantized; B = 0 adds nothing to the dequantized base
        merged = lora.merge(params, model.config, jnp.float32)
        np.testing.assert_allclose(model.apply(params, tokens), base.apply(merged, tokens), atol=1e-5)
    b_leaves = [x for p, x in jax.tree_util.tree_leaves_with_path(params) if "lora_b" in str(p[-1])]
    assert b_leaves and all(not np.any(np.asarray(b)) for b in b_leaves)


def _train(model, steps=4, lr=3e-3, dropout=False):
    mask = lora.adapter_mask(model.abstract_params())
    cfg = _optim_cfg(weight_decay=0.1, clip_norm=1.0, lr=lr)
    schedule = optim.build_schedule(cfg, 20)
    tx = optim.build_optimizer(cfg, schedule)
    init = model.init(jax.random.key(0))
    state = TrainState.create(init, tx, jax.random.key(1), mask)
    step = jax.jit(make_train_step(model, tx, schedule, grad_accum_steps=2, mask=mask))
    batch = _padded(_examples(8, seed=3), 24)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return init, state, mask, losses


@pytest.mark.parametrize("fmt", ["none", "int8", "nf4"])
def test_only_the_adapters_train_and_hold_optimizer_state(fmt):
    model = _peft(LlamaConfig.tiny(vocab_size=VOCAB), fmt, targets="q,v,down")
    init, state, mask, losses = _train(model, steps=12, lr=1e-2)
    for m, a, b in zip(
        jax.tree.leaves(mask), jax.tree.leaves(init), jax.tree.leaves(state.params), strict=True
    ):
        if m:
            assert not np.array_equal(np.asarray(a), np.asarray(b))
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the base: bitwise unchanged
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    adapters = jax.tree.leaves(trainable.split(state.params, mask)[0])
    assert len(adapters) == 6 and len(moments) == 2 * len(adapters)
    assert sorted(x.shape for x in moments) == sorted([x.shape for x in adapters] * 2)
    assert losses[-1] < losses[0] - 0.05, losses  # it learns (QLoRA included)


def test_lora_dropout_changes_the_step_and_is_deterministic():
    cfg = LlamaConfig.tiny(vocab_size=VOCAB)
    with_dropout = _peft(cfg, lora_dropout=0.5)
    _, a, _, la = _train(with_dropout, steps=2)
    _, b, _, lb = _train(with_dropout, steps=2)
    _, c, _, lc = _train(_peft(cfg), steps=2)
    assert la == lb and la != lc  # same keys, same result; dropout on changes it


def test_the_delta_folds_into_the_weight_as_the_activation_path_computes():
    model = _peft(LlamaConfig.tiny(vocab_size=VOCAB))
    params = model.init(jax.random.key(0))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.random.normal(jax.random.key(7), x.shape) * 0.1 if "lora_b" in str(p[-1]) else x,
        params,
    )
    merged = lora.merge(params, model.config, jnp.float32)
    tokens = jnp.arange(20).reshape(2, 10) % VOCAB
    base = ModelDef.create(model.config.base())
    np.testing.assert_allclose(model.apply(params, tokens), base.apply(merged, tokens), atol=2e-5)


def _saved_float_shapes(loss, *args) -> list[tuple[int, ...]]:
    """Shapes of the float arrays autodiff keeps for the backward of `loss` (print_saved_residuals)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(loss, *args)
    found = [re.match(r"(bf16|f32)\[([\d,]*)\]", line) for line in out.getvalue().splitlines()]
    return [tuple(int(d) for d in m.group(2).split(",") if d) for m in found if m]


def test_qlora_without_remat_keeps_the_codes_not_float_weights_and_the_same_gradients():
    """remat=none keeps every activation but no dequantized projection (the backward re-dequantizes
    from the codes); the adapters' gradients equal LoRA's over the dequantized base under every remat.
    (NF4; int8 takes the same path, lora._dequantized_einsum.)"""
    tiny = LlamaConfig.tiny(vocab_size=VOCAB)
    tokens = jnp.arange(20).reshape(2, 10) % VOCAB

    def with_b(params, scale):  # B != 0, so both adapters get gradients
        def b(path, x):
            return jax.random.normal(jax.random.key(7), x.shape) * scale if "lora_b" in str(path[-1]) else x

        return jax.tree_util.tree_map_with_path(b, params)

    qlora = _peft(tiny, "nf4")
    params = with_b(qlora.init(jax.random.key(0)), 0.1)
    # The reference: float LoRA over the dequantized base (B = 0 merges only the dequantization).
    float_params = lora.merge(with_b(params, 0.0), qlora.config, jnp.float32)
    for group, leaves in params["layers"].items():
        float_params["layers"][group].update({k: v for k, v in leaves.items() if lora.is_adapter(k)})
    flat = jax.tree_util.tree_leaves_with_path(float_params)
    projections = {x.shape for p, x in flat if lora.is_projection(tuple(k.key for k in p))}
    assert len(projections) == 5

    def grads(model, params):
        train, frozen = trainable.split(params, lora.adapter_mask(params))

        def loss(train):
            return jnp.sum(jnp.sin(model.apply(trainable.merge(train, frozen), tokens)))

        return jax.jit(jax.grad(loss))(train), _saved_float_shapes(loss, train)

    expected, _ = grads(_peft(tiny, "none"), float_params)
    for remat in ("none", "dots", "full"):
        got, saved = grads(_peft(dataclasses.replace(tiny, remat=remat), "nf4"), params)
        assert len(saved) > 10 and not projections & set(saved), (remat, projections & set(saved))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, expected)
    # The same check sees the float weight a plain dequantize-then-matmul keeps.
    codes, scale = quant.quantize(jax.random.normal(jax.random.key(1), (16, 32)), "nf4", 16)

    def plain(x):
        return jnp.sum(jnp.einsum("BTD,DN->BTN", x, quant.dequantize(codes, scale, "nf4")) ** 2)

    assert (16, 32) in _saved_float_shapes(plain, jnp.ones((2, 3, 16)))


@pytest.mark.parametrize("fmt,ratio", [("nf4", 4.5 / 32), ("int8", 8.5 / 32)])
def test_planner_bytes_of_the_quantized_base_on_llama3_8b_shapes(fmt, ratio):
    # Abstract only (eval_shape): what --mode plan counts. Blocks of 64 with float32 scales.
    cfg = LlamaConfig.llama3_8b(param_dtype="float32")
    full = ModelDef.create(cfg).abstract_params()
    q = _peft(cfg, fmt, rank=16, quant_block=64).abstract_params()

    def projection_bytes(params, suffixes=("",)):
        total = 0
        for path in lora.PROJECTIONS:
            group, name = path.split(".")
            for s in suffixes:
                x = params["layers"][group].get(name + s)
                total += 0 if x is None else int(np.prod(x.shape)) * x.dtype.itemsize
        return total

    measured = projection_bytes(q, ("", "_scale")) / projection_bytes(full)
    assert abs(measured - ratio) < 1e-9, measured
    assert measured < (0.15 if fmt == "nf4" else 0.27)  # about 1/8 and 1/4 of float32
    adapters = sum(
        int(np.prod(x.shape)) for p, x in jax.tree_util.tree_leaves_with_path(q) if "lora" in str(p[-1])
    )
    assert adapters == 16 * 32 * (
        2 * 4096 + 2 * (4096 + 1024) + 2 * 4096 + 3 * (4096 + 14336)
    )  # r (in + out)
