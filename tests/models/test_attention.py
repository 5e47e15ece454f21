"""Every attention kernel equals the reference on packed rows: outputs and gradients, with GQA,
sliding windows (static and per layer) and soft-capping where the kernel takes it (the Pallas GPU
kernel's own cases: test_pallas_gpu.py). `auto` gives every shipped model a kernel that takes it on
every platform and dtype; a kernel the model or platform cannot use is refused naming why."""

import dataclasses
import glob
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsft.data import packing
from jsft.models import attention
from jsft.models.llama import LlamaConfig
from jsft.models.registry import ModelDef, build_model
from tests import zygote

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


@pytest.mark.parametrize("kernel", ["chunked", "flash", "splash"])
def test_a_per_layer_window_traced_under_scan_equals_the_reference_in_outputs_and_gradients(kernel):
    q, k, v = _qkv()
    seg = _packed_segments()
    windows = (0, 4, 11, 4)  # splash: one kernel per distinct window, each layer switching to its own

    def run(kernel, q):
        def body(_, window):
            mask = attention.Mask(attention.Mask.from_segments(seg).start_bt, window)
            return None, attention.attend(kernel, q, k, v, mask, 0.3, 0.0, 9, 0, windows)

        out = jax.lax.scan(body, None, jnp.asarray(windows, jnp.int32))[1]
        return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape))), out

    (_, got), grad = jax.value_and_grad(run, 1, has_aux=True)(kernel, q)
    (_, want), ref_grad = jax.value_and_grad(run, 1, has_aux=True)("reference", q)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["chunked", "flash", "pallas_gpu", "splash", "xla_sdpa"])
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


def test_the_cudnn_arguments_causal_window_and_same_example_mask_give_the_reference():
    """cuDNN cannot run here; its arguments (is_causal, the window, the same-example mask, or none for
    unpacked rows) go through jax.nn.dot_product_attention's XLA path instead."""
    q, k, v = _qkv()
    for window in (0, 6):
        for seg in (_packed_segments(), jnp.ones((3, 40), jnp.int32)):
            mask = attention.Mask.from_segments(seg, window)
            want = attention.reference_attention(q, k, v, mask.dense(), 0.3)
            got = attention.cudnn_attention(q, k, v, mask, 0.3, window, implementation="xla")
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
        unpacked = dataclasses.replace(attention.Mask.from_segments(seg, window), packed=False)
        got = attention.cudnn_attention(q, k, v, unpacked, 0.3, window, implementation="xla")
        np.testing.assert_allclose(
            got, attention.reference_attention(q, k, v, unpacked.dense(), 0.3), atol=1e-5
        )


def test_auto_takes_cudnn_on_gpus_only_where_it_takes_the_dtype_head_size_softcap_and_rows():
    half = dict(dtype="bfloat16", head_dim=128, packed=False)
    assert attention.resolve("auto", 0.0, "gpu", **half) == "cudnn"
    assert attention.resolve("auto", 0.0, "gpu", **{**half, "dtype": "float16"}) == "cudnn"
    assert attention.resolve("auto", 0.0, "gpu", **{**half, "dtype": "float32"}) == "pallas_gpu"
    assert attention.resolve("auto", 0.0, "gpu", **{**half, "head_dim": 256}) == "pallas_gpu"
    assert attention.resolve("auto", 0.0, "gpu", **{**half, "head_dim": 100}) == "pallas_gpu"
    assert attention.resolve("auto", 50.0, "gpu", **half) == "pallas_gpu"  # Gemma 2 soft-caps
    assert attention.resolve("auto", 0.0, "gpu", True, **half) == "pallas_gpu"  # per-layer windows
    assert attention.resolve("auto", 0.0, "gpu", **{**half, "packed": True}) == "pallas_gpu"  # dense mask
    assert attention.resolve("auto", 0.0, "gpu") == "pallas_gpu"  # dtype and head size unknown
    assert attention.resolve("auto", 0.0, "tpu") == "splash"
    assert attention.resolve("auto", 0.0, "tpu", per_layer_windows=True) == "splash"  # Gemma 2, 3
    assert attention.resolve("auto", 0.0, "cpu") == "flash"


@pytest.mark.parametrize(
    "name,platform,model,match",
    [
        ("splash", "gpu", {}, "runs on TPUs, elsewhere only in Pallas interpret mode"),
        ("splash", "cpu", {}, "runs on TPUs"),
        ("pallas_gpu", "tpu", {}, "runs on GPUs"),
        ("pallas_gpu", "cpu", {}, "runs on GPUs"),
        ("cudnn", "cpu", {}, "runs on GPUs"),
        ("cudnn", "gpu", {"dtype": "float32"}, "takes bfloat16/float16 only"),
        ("cudnn", "gpu", {"head_dim": 256}, "heads up to 128 wide"),
        ("cudnn", "gpu", {"softcap": 50.0}, "does not soft-cap"),
        ("cudnn", "gpu", {"per_layer_windows": True}, "per-layer windows"),
        ("xla_sdpa", "cpu", {"softcap": 50.0}, "does not soft-cap"),
        ("flash3", "cpu", {}, "is not one of"),
    ],
)
def test_a_kernel_the_model_or_platform_cannot_use_is_refused_naming_why(name, platform, model, match):
    args = {"softcap": 0.0, **model}
    with pytest.raises(ValueError, match=match):
        attention.resolve(name, args.pop("softcap"), platform, interpret_ok=False, **args)


def test_pallas_kernels_run_interpreted_off_their_platform_only_when_allowed():
    assert attention.resolve("splash", 0.0, "cpu") == "splash"  # the model's default: tests interpret it
    assert attention.resolve("pallas_gpu", 50.0, "cpu", True, dtype="float32", head_dim=8) == "pallas_gpu"
    with pytest.raises(ValueError, match="runs on GPUs"):
        attention.resolve("cudnn", 0.0, "cpu")  # no interpret mode for cuDNN


def _shipped_models():
    """The model of every shipped config and argument (its shapes; an HF config's checkpoint decides
    its own), and the architectures an HF checkpoint can bring: wide heads, odd head sizes, soft-caps,
    per-layer windows (Gemma 2, 3), a sliding window (Mistral)."""
    models = {}
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
        if path.endswith("__init__.py"):
            continue
        spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for arg in module.ARGS:
            config = module.get_config(arg)
            config.model.hf_path = ""
            models[f"{os.path.basename(path)}:{arg}"] = build_model(config.model, 512).config
    base = LlamaConfig.tiny(vocab_size=64)
    for h, softcap, windows, sliding in [(256, 50.0, True, 0), (256, 0.0, True, 0), (96, 0.0, False, 4096)]:
        layer_windows = (4096, 0) if windows else ()
        models[f"hf:h{h}-cap{softcap}-windows{windows}-sliding{sliding}"] = dataclasses.replace(
            base, head_dim=h, attn_softcap=softcap, layer_windows=layer_windows, sliding_window=sliding
        )
    return models


SHIPPED = _shipped_models()


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_auto_gives_every_shipped_model_a_kernel_that_takes_it_on_every_platform_and_dtype(name):
    arch = SHIPPED[name]
    for platform in ("cpu", "gpu", "tpu"):
        for dtype in ("float32", "bfloat16", "float16"):
            for packed in (True, False):
                model = dict(
                    softcap=arch.attn_softcap,
                    per_layer_windows=bool(arch.layer_windows),
                    dtype=dtype,
                    head_dim=arch.head_dim,
                )
                kernel = attention.resolve("auto", platform=platform, packed=packed, **model)
                assert not attention.unusable(kernel, platform, **model, interpret_ok=False), (
                    platform,
                    kernel,
                )
                if platform == "gpu":
                    assert kernel in ("cudnn", "pallas_gpu")
                    assert kernel == "pallas_gpu" or (dtype != "float32" and not packed)


def test_splash_off_a_tpu_is_one_error_line_from_the_command_line(tmp_path):
    r = zygote.run(
        [
            sys.executable,
            "-m",
            "jsft.main",
            "--config=configs/demo.py:smoke",
            "--config.model.attention=splash",
            f"--workdir={tmp_path / 'wd'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "jsft: error: config.model.attention='splash' runs on TPUs, elsewhere only in Pallas"
    )
