"""Every attention kernel equals the reference on packed rows: outputs and gradients, with GQA,
sliding windows (static and per layer) and soft-capping where the kernel takes it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsft.data import packing
from jsft.models import attention
from jsft.models.llama import LlamaConfig
from jsft.models.registry import ModelDef

jax.config.update("jax_default_matmul_precision", "float32")


def _packed_segments(b=3, t=40, seed=0):
    """Rows of contiguous examples of random lengths, padding (segment 0) at the end."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, t), np.int32)
    for r in range(b):
        pos, k = 0, 1
        while pos < t - 3:
            n = int(rng.integers(2, 15))
            seg[r, pos : pos + n] = k
            pos, k = pos + n, k + 1
    return jnp.asarray(seg)


def _qkv(b=3, t=40, n=4, k=2, h=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(keys[0], (b, t, n, h)),
        jax.random.normal(keys[1], (b, t, k, h)),
        jax.random.normal(keys[2], (b, t, k, h)),
    )


def test_the_mask_from_segment_starts_equals_same_segment_and_causal():
    seg = _packed_segments()
    t = seg.shape[1]
    expected = (seg[:, :, None] == seg[:, None, :]) & jnp.tril(jnp.ones((t, t), bool))[None]
    np.testing.assert_array_equal(attention.Mask.from_segments(seg).dense(), expected)
    windowed = attention.Mask.from_segments(seg, 5).dense()
    distance = jnp.arange(t)[:, None] - jnp.arange(t)[None, :]
    np.testing.assert_array_equal(windowed, expected & (distance < 5)[None])


CASES = [(0, 0.0, 16), (6, 0.0, 7), (0, 4.0, 16), (0, 0.0, 64)]  # (window, softcap, chunk)


@pytest.mark.parametrize(
    "kernel,window,softcap,chunk",
    [(kernel, *c) for kernel in ("chunked", "flash") for c in CASES]
    + [("splash", *c) for c in CASES]  # Pallas interpret mode off TPU; blocks of 128
    + [("xla_sdpa", *c) for c in CASES if not c[1]],  # sdpa: no soft-cap
)
def test_a_kernel_equals_the_reference_in_outputs_and_gradients(kernel, window, softcap, chunk):
    q, k, v = _qkv()
    mask = attention.Mask.from_segments(_packed_segments(), window)
    scale = 8**-0.5

    def loss(fn):
        def f(q, k, v):
            out = fn(q, k, v)
            return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape)))  # any fixed projection

        return jax.value_and_grad(f, (0, 1, 2))(q, k, v)

    ref_val, ref_grads = loss(lambda q, k, v: attention.attend("reference", q, k, v, mask, scale, softcap))
    val, grads = loss(lambda q, k, v: attention.attend(kernel, q, k, v, mask, scale, softcap, chunk, window))
    np.testing.assert_allclose(val, ref_val, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["chunked", "flash"])
def test_a_per_layer_window_traced_under_scan_equals_the_reference(kernel):
    q, k, v = _qkv()
    seg = _packed_segments()

    def run(kernel):
        def body(_, window):
            mask = attention.Mask(attention.Mask.from_segments(seg).start_bt, window)
            return None, attention.attend(kernel, q, k, v, mask, 0.3, 0.0, 9)

        return jax.lax.scan(body, None, jnp.asarray([0, 4, 11], jnp.int32))[1]

    np.testing.assert_allclose(run(kernel), run("reference"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["chunked", "flash", "splash", "xla_sdpa"])
def test_a_model_with_each_kernel_gives_the_reference_logits_on_packed_rows(kernel):
    base = LlamaConfig.tiny(vocab_size=64, sliding_window=6)
    models = {
        name: ModelDef.create(base.__class__(**{**base.__dict__, "attention": name}))
        for name in ("reference", kernel)
    }
    params = models["reference"].init(jax.random.key(0))
    rng = np.random.default_rng(1)
    examples = [
        packing.Example(rng.integers(1, 64, n).astype(np.int32), np.ones(n, bool)) for n in (5, 9, 13, 7)
    ]
    batch = packing.pack(examples, 20)
    args = (params, batch["inputs"], batch["positions"], batch["segment_ids"])
    np.testing.assert_allclose(
        models[kernel].apply(*args), models["reference"].apply(*args), atol=1e-5, rtol=1e-5
    )


def test_kernels_a_model_or_platform_cannot_use_are_refused_and_auto_falls_back():
    assert attention.resolve("auto", 0.0, "cpu") == "flash"
    assert attention.resolve("auto", 0.0, "tpu") == "splash"
    assert attention.resolve("auto", 0.0, "tpu", per_layer_windows=True) == "flash"  # Gemma 2, 3
    with pytest.raises(ValueError, match="per-layer windows"):
        attention.resolve("splash", 0.0, "tpu", per_layer_windows=True)
    assert attention.resolve("auto", 0.0, "gpu") == "cudnn"
    assert attention.resolve("auto", 50.0, "gpu") == "flash"  # Gemma 2 soft-caps: cuDNN cannot
    with pytest.raises(ValueError, match="does not soft-cap"):
        attention.resolve("xla_sdpa", 50.0, "cpu")
    with pytest.raises(ValueError, match="needs a GPU"):
        attention.resolve("cudnn", 0.0, "cpu")
    with pytest.raises(ValueError, match="is not one of"):
        attention.resolve("flash3", 0.0, "cpu")
