"""PEFT interop against Hugging Face `peft` itself: an adapter jsft writes loads with
`PeftModel.from_pretrained` and gives jsft's logits; an adapter peft writes loads into jsft with
peft's logits; the merged export equals peft's `merge_and_unload`."""

import json
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="the hf extra (torch==2.13.0, transformers, peft) is not installed"
)
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from jsft.interop import hf  # noqa: E402
from jsft.interop import peft as peft_io  # noqa: E402
from jsft.models import lora  # noqa: E402
from jsft.models.registry import ModelDef  # noqa: E402
from tests.interop.test_hf import _hf_logits, _save_tiny  # noqa: E402

TARGETS = "q,k,v,o,gate,up,down"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2")  # Qwen2: q/k/v biases too, which LoRA leaves alone
    _save_tiny("qwen2", str(d))
    return str(d)


def _model(base_dir, rank=4, alpha=8.0, rslora=False):
    import dataclasses  # noqa: PLC0415

    cfg = hf.config_from_hf(hf.read_config(base_dir))
    cfg = dataclasses.replace(
        cfg,
        lora_rank=rank,
        lora_targets=lora.parse_targets(TARGETS),
        lora_scale=lora.scaling(rank, alpha, rslora),
    )
    model = ModelDef.create(cfg)
    params = model.attach(hf.load_params(base_dir, cfg.base()), jax.random.key(3))
    # Non-zero B, so the adapters change the output.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            jax.random.normal(jax.random.key(zlib.crc32(str(p).encode())), x.shape) * 0.05
            if "lora_b" in str(p[-1])
            else x
        ),
        params,
    )
    return model, params


def _torch_base(base_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_the_adapter_jsft_writes_with_identical_logits(base, tmp_path, rslora):
    model, params = _model(base, rslora=rslora)
    peft_io.save_adapter(str(tmp_path), params, model.config, base, rslora=rslora, alpha=8.0)
    adapter_cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and adapter_cfg["use_rslora"] == rslora
    adapted = peft.PeftModel.from_pretrained(_torch_base(base), str(tmp_path)).eval()
    ids = np.random.default_rng(0).integers(0, 96, (2, 12))
    ours = np.asarray(model.apply(params, jnp.asarray(ids)))
    theirs = _hf_logits(adapted, ids)
    assert np.abs(ours - theirs).max() < 2e-5
    assert np.abs(ours - _hf_logits(_torch_base(base), ids)).max() > 1e-2  # the adapters do something
    # Merged: jsft's merge equals peft's merge_and_unload, tensor for tensor (HF layout).
    merged = hf.hf_tensors(lora.merge(params, model.config, jnp.float32), model.config.base(), "float32")
    theirs = {k: v.detach().numpy() for k, v in adapted.merge_and_unload().state_dict().items()}
    assert set(merged) <= set(theirs)
    for name, value in merged.items():
        np.testing.assert_allclose(value, theirs[name], atol=2e-6, err_msg=name)


def test_jsft_loads_an_adapter_peft_writes_with_identical_logits(base, tmp_path):
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )  # random A and B
    adapted = peft.get_peft_model(_torch_base(base), config).eval()
    adapted.save_pretrained(str(tmp_path))
    settings = peft_io.read_adapter_config(str(tmp_path))
    assert settings["targets"] == ("attn.q_proj", "attn.v_proj", "mlp.down_proj") and settings["rank"] == 8
    import dataclasses  # noqa: PLC0415

    cfg = hf.config_from_hf(hf.read_config(base))
    cfg = dataclasses.replace(
        cfg,
        lora_rank=8,
        lora_targets=settings["targets"],
        lora_scale=lora.scaling(8, settings["alpha"], False),
    )
    model = ModelDef.create(cfg)
    params = model.attach(hf.load_params(base, cfg.base()), jax.random.key(0))
    params = peft_io.load_adapter(str(tmp_path), params, cfg)
    ids = np.random.default_rng(1).integers(0, 96, (2, 12))
    assert np.abs(np.asarray(model.apply(params, jnp.asarray(ids))) - _hf_logits(adapted, ids)).max() < 2e-5
    # A rank that does not fit this model's shapes is refused naming the tensor.
    small = dataclasses.replace(cfg, lora_rank=4, lora_targets=settings["targets"])
    small_model = ModelDef.create(small)
    with pytest.raises(ValueError, match="lora_A.weight has shape"):
        peft_io.load_adapter(str(tmp_path), small_model.init(jax.random.key(0)), small)


def test_unsupported_adapter_configs_are_refused_naming_the_field(tmp_path):
    for field, value in (("use_dora", True), ("bias", "all"), ("peft_type", "IA3")):
        cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], field: value}
        (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=field if field != "peft_type" else "IA3"):
            peft_io.read_adapter_config(str(tmp_path))


def test_qlora_quantizes_each_projection_while_loading_with_the_same_result_and_identity(base):
    import os  # noqa: PLC0415
    import sys  # noqa: PLC0415

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from configs import demo  # noqa: PLC0415
    from jsft.run import Run  # noqa: PLC0415

    config = demo.get_config()
    config.model.hf_path = base
    config.peft.method, config.peft.rank, config.peft.quant_block = "qlora", 4, 16
    run = Run.create(config)
    model = run.model(96)
    loaded, identity = run.base_params(model)  # codes and scales, quantized leaf by leaf
    assert (
        loaded["layers"]["attn"]["q_proj"].dtype == jnp.uint8 and "q_proj_scale" in loaded["layers"]["attn"]
    )
    after = lora.attach(hf.load_params(base, model.config.base()), jax.random.key(0), model.config)
    for path in lora.PROJECTIONS:
        group, name = path.split(".")
        for leaf in (name, name + "_scale"):
            np.testing.assert_array_equal(loaded["layers"][group][leaf], after["layers"][group][leaf])
    # The identity hashes the float base, as for LoRA over the same directory.
    config.peft.method = "lora"
    lora_run = Run.create(config)
    assert lora_run.base_params(lora_run.model(96))[1] == identity


@pytest.mark.slow
def test_lora_and_qlora_on_gemma3_train_through_every_adapter_and_peft_loads_the_adapter(tmp_path):
    """Gemma 3's q/k norms sit between projections LoRA targets; they are not targets. PEFT loads the
    adapter with jsft's logits, and over a quantized (nf4) base every adapter gets gradients."""
    import dataclasses  # noqa: PLC0415

    base_dir = str(tmp_path / "base")
    _save_tiny("gemma3_text", base_dir)
    model, params = _model(base_dir)
    assert "q_norm" in params["layers"]["attn"] and "q_norm_lora_a" not in params["layers"]["attn"]
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 96, (2, 12)))
    peft_io.save_adapter(str(tmp_path / "adapter"), params, model.config, base_dir, rslora=False, alpha=8.0)
    adapted = peft.PeftModel.from_pretrained(_torch_base(base_dir), str(tmp_path / "adapter")).eval()
    err = np.abs(np.asarray(model.apply(params, ids)) - _hf_logits(adapted, np.asarray(ids))).max()
    assert err < 2e-5, err
    # QLoRA (the reference kernel: the quickest to compile here; the kernels have their own tests).
    quantized = dataclasses.replace(model.config, quant="nf4", quant_block=16, attention="reference")
    qmodel = ModelDef.create(quantized)
    qparams = qmodel.attach(hf.load_params(base_dir, quantized.base()), jax.random.key(3))
    assert qparams["layers"]["attn"]["q_proj"].dtype == jnp.uint8
    for path in lora.PROJECTIONS:  # the float model's non-zero B, so A gets gradients too
        group, name = path.split(".")
        qparams["layers"][group][name + "_lora_b"] = params["layers"][group][name + "_lora_b"]

    def loss(p):
        logits = qmodel.apply(p, ids)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], -1))

    grads = jax.jit(jax.grad(loss, allow_int=True))(qparams)
    for path in lora.PROJECTIONS:
        group, name = path.split(".")
        for suffix in lora.ADAPTER_SUFFIXES:
            g = np.asarray(grads["layers"][group][name + suffix])
            assert np.isfinite(g).all() and np.abs(g).max() > 0, (path, suffix)
