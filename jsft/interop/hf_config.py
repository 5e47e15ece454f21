"""config.json <-> LlamaConfig: which Hugging Face families jsft speaks, and what it refuses.

Supported families: Llama (2, 3, 3.1/3.2 with `llama3` RoPE scaling and tied embeddings), Mistral
(sliding window), Qwen2/2.5 (q/k/v biases), Qwen3 (q/k norms), Gemma 2 (norm offset, embedding scale,
attention and final logit soft-capping, sandwich norms, GeLU, alternating sliding-window layers),
Qwen3-MoE (top-k experts, `norm_topk_prob`, dense layers from `mlp_only_layers`/`decoder_sparse_step`)
and Mixtral (top-k experts, sliding window); RoPE scalings linear, llama3, yarn and dynamic
(jsft/models/rope.py).
Anything in a config that would change the math and that jsft does not implement is refused by name.
"""

from __future__ import annotations

from jsft.models.llama import LlamaConfig
from jsft.models.rope import rope_scaling_problems

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "qwen3_moe", "mixtral")
MOE_FAMILIES = ("qwen3_moe", "mixtral")
# Fields of other MoE families (Qwen2-MoE, DeepSeek, ...) that change the math; refused when set.
_MOE_REFUSED = (
    "shared_expert_intermediate_size",
    "n_shared_experts",
    "num_shared_experts",
    "moe_shared_expert_intermediate_size",
    "first_k_dense_replace",
    "routed_scaling_factor",
    "topk_group",
    "n_group",
    "scoring_func",
    "topk_method",
)


GEMMA_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


class UnsupportedCheckpoint(ValueError):
    """A checkpoint jsft cannot load faithfully; the message names what and why."""


def _rope(hf: dict) -> tuple[float, tuple]:
    """(theta, scaling pairs) from either transformers 4 (`rope_theta`, `rope_scaling`) or 5
    (`rope_parameters`) config layouts, with transformers' fallbacks filled in (so an export writes
    them out); a type or field jsft does not compute is refused by name."""
    params = dict(hf.get("rope_parameters") or {})
    theta = float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)
    field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    scaling = dict(hf.get("rope_scaling") or {}) or params
    scaling.pop("rope_theta", None)
    legacy = scaling.pop("type", None)  # transformers 4's older name for rope_type
    kind = scaling.pop("rope_type", None) or legacy or "default"
    if kind == "default":  # transformers' default RoPE reads nothing else
        return theta, ()
    rotary = scaling.pop("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if rotary not in (None, 1, 1.0):
        raise UnsupportedCheckpoint(f"partial_rotary_factor={rotary} (jsft rotates whole heads)")
    if kind == "dynamic":  # transformers reads the top-level max_position_embeddings, never one here
        if "max_position_embeddings" in scaling:
            raise UnsupportedCheckpoint(f"{field}: 'max_position_embeddings' is not a field of dynamic")
        scaling["max_position_embeddings"] = hf.get("max_position_embeddings")
    if kind in ("llama3", "yarn") and scaling.get("original_max_position_embeddings") is None:
        scaling["original_max_position_embeddings"] = hf.get("max_position_embeddings")  # as transformers
    if kind == "yarn" and scaling.get("factor") is None and hf.get("max_position_embeddings"):
        scaling["factor"] = hf["max_position_embeddings"] / scaling["original_max_position_embeddings"]
    if kind in ("linear", "llama3"):  # as jsft always wrote them back
        scaling = {k: float(v) if isinstance(v, int | float) else v for k, v in scaling.items()}
    pairs = (("rope_type", kind), *scaling.items())
    problems = rope_scaling_problems(pairs)
    if problems:
        raise UnsupportedCheckpoint(f"{field}: {'; '.join(problems)}")
    return theta, pairs


def config_from_hf(hf: dict, **numerics: str) -> LlamaConfig:
    """A LlamaConfig equal in math to the HF config; `numerics` sets dtypes/remat."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise UnsupportedCheckpoint(f"model_type {family!r} is not supported; jsft imports {FAMILIES}")
    refuse = []
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if family == "gemma2":
        if act not in GEMMA_ACTIVATIONS:
            refuse.append(f"hidden_activation={act!r} (only gelu_pytorch_tanh)")
        if hf.get("use_bidirectional_attention"):
            refuse.append("use_bidirectional_attention=true")
    elif act != "silu":
        refuse.append(f"hidden_act={act!r} (only silu)")
    if hf.get("mlp_bias"):
        refuse.append("mlp_bias=true")
    if hf.get("attention_bias") and family not in ("qwen2",):
        refuse.append("attention_bias=true")
    if family == "qwen2" and hf.get("use_sliding_window"):
        refuse.append("use_sliding_window=true")
    if family in ("qwen3", "qwen3_moe") and hf.get("use_sliding_window"):
        refuse.append("use_sliding_window=true")
    if family in MOE_FAMILIES:
        refuse += [f"{k}={hf[k]!r}" for k in _MOE_REFUSED if hf.get(k) not in (None, 0, 0.0, 1.0, False)]
        if hf.get("router_jitter_noise"):
            refuse.append(f"router_jitter_noise={hf['router_jitter_noise']} (training-time router noise)")
    if "quantization_config" in hf:
        refuse.append("quantization_config (quantized weights)")
    if refuse:
        raise UnsupportedCheckpoint(f"{family} config fields jsft does not implement: {', '.join(refuse)}")
    theta, scaling = _rope(hf)
    n_heads = hf["num_attention_heads"]
    cfg = LlamaConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        mlp_dim=hf["intermediate_size"],
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2",
        qk_norm=family in ("qwen3", "qwen3_moe"),
        sliding_window=int(hf.get("sliding_window") or 0) if family in ("mistral", "mixtral") else 0,
        **(_gemma2_fields(hf) if family == "gemma2" else {}),
        **{**(_moe_fields(hf) if family in MOE_FAMILIES else {}), **numerics},
    )
    return cfg


def _moe_fields(hf: dict) -> dict:
    """Qwen3-MoE's and Mixtral's experts as LlamaConfig fields. The load-balancing coefficient is
    the checkpoint's `router_aux_loss_coef` when its `output_router_logits` is set (when transformers
    adds the loss in training), else 0; a run's config.model.router_aux_loss_coef overrides it."""
    n = hf["num_hidden_layers"]
    experts = hf.get("num_experts") or hf.get("num_local_experts") or 0
    if not experts:  # a Qwen3-MoE config without experts is a dense model
        return {}
    if hf["model_type"] == "mixtral":
        dense, width, norm_topk = (), hf["intermediate_size"], True
    else:
        step = hf.get("decoder_sparse_step") or 1
        only = set(hf.get("mlp_only_layers") or ())
        dense = tuple(i for i in range(n) if i in only or (i + 1) % step)
        width, norm_topk = hf["moe_intermediate_size"], bool(hf.get("norm_topk_prob", False))
    return dict(
        n_experts=experts,
        experts_per_token=hf["num_experts_per_tok"],
        moe_mlp_dim=width,
        norm_topk_prob=norm_topk,
        dense_layers=dense,
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0)
        if hf.get("output_router_logits")
        else 0.0,
    )


def _gemma2_fields(hf: dict) -> dict:
    """Gemma 2's departures from Llama, as LlamaConfig fields."""
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)
    ]
    window = int(hf.get("sliding_window") or 0)
    return dict(
        norm_offset=1.0,
        embed_scale=True,
        post_norms=True,
        activation=GEMMA_ACTIVATIONS[
            hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        ],
        attn_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
        final_softcap=float(hf.get("final_logit_softcapping") or 0.0),
        query_scale=float(hf.get("query_pre_attn_scalar") or 0.0),
        layer_windows=tuple(window if t == "sliding_attention" else 0 for t in types),
    )


def config_to_hf(
    cfg: LlamaConfig,
    family: str,
    dtype: str,
    bos_id: int | None,
    eos_id: int | list[int],
    pad_id: int | None = None,
    max_position_embeddings: int = 8192,
) -> dict:
    """The config.json `transformers` needs to rebuild `cfg` as `family`.

    `eos_id` may list several ids (Llama 3: end of text and end of turn); `max_position_embeddings`
    should be the source checkpoint's, or the sequence length a model was trained at from scratch
    (with `dynamic` RoPE scaling, the scaling's own is written: the math depends on it).
    """
    if family not in FAMILIES:
        raise UnsupportedCheckpoint(f"cannot export as {family!r}; jsft exports {FAMILIES}")
    if (cfg.qkv_bias, cfg.qk_norm, cfg.post_norms, bool(cfg.n_experts)) != (
        family == "qwen2",
        family in ("qwen3", "qwen3_moe"),
        family == "gemma2",
        family in MOE_FAMILIES,
    ):
        raise UnsupportedCheckpoint(
            f"this model (qkv_bias={cfg.qkv_bias}, qk_norm={cfg.qk_norm}, post_norms={cfg.post_norms}, "
            f"n_experts={cfg.n_experts}) is not a {family}"
        )
    if family == "mixtral" and (cfg.dense_layers or not cfg.norm_topk_prob):
        raise UnsupportedCheckpoint("mixtral has no dense layers and always renormalises its top-k weights")
    arch = {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
        "gemma2": "Gemma2ForCausalLM",
        "qwen3_moe": "Qwen3MoeForCausalLM",
        "mixtral": "MixtralForCausalLM",
    }[family]
    rope = {"rope_type": "default", **dict(cfg.rope_scaling)}
    if rope["rope_type"] == "dynamic":  # its math reads the top-level field, so that one is its own
        max_position_embeddings = rope.pop("max_position_embeddings")
    out = {
        "architectures": [arch],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.mlp_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope if cfg.rope_scaling else None,
        "rope_parameters": {"rope_theta": cfg.rope_theta, **rope},
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": dtype,
        "dtype": dtype,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "max_position_embeddings": int(max_position_embeddings),
    }
    if family in ("llama", "mistral", "qwen3", "qwen3_moe"):
        out["attention_bias"] = False
    if family in ("mistral", "mixtral"):
        out["sliding_window"] = cfg.sliding_window or None
    if family in MOE_FAMILIES:
        out.update(_moe_hf_fields(cfg, family))
    if family in ("qwen2", "qwen3", "qwen3_moe"):
        out["use_sliding_window"] = False
        out["sliding_window"] = None
    if family == "gemma2":
        out.update(_gemma2_hf_fields(cfg))
        del out["hidden_act"]
    return out


def _moe_hf_fields(cfg: LlamaConfig, family: str) -> dict:
    """The experts' config.json fields; dense layers are written as `mlp_only_layers` (step 1)."""
    out = dict(
        num_experts_per_tok=cfg.experts_per_token,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        output_router_logits=cfg.router_aux_loss_coef > 0,
    )
    if family == "mixtral":
        return dict(
            out, num_local_experts=cfg.n_experts, intermediate_size=cfg.moe_mlp_dim, router_jitter_noise=0.0
        )
    return dict(
        out,
        num_experts=cfg.n_experts,
        moe_intermediate_size=cfg.moe_mlp_dim,
        norm_topk_prob=cfg.norm_topk_prob,
        decoder_sparse_step=1,
        mlp_only_layers=list(cfg.dense_layers),
    )


def _gemma2_hf_fields(cfg: LlamaConfig) -> dict:
    windows = [w for w in cfg.layer_windows if w]
    return dict(
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=int(cfg.query_scale or cfg.head_dim),
        attn_logit_softcapping=cfg.attn_softcap or None,
        final_logit_softcapping=cfg.final_softcap or None,
        sliding_window=windows[0] if windows else None,
        attention_bias=False,
        layer_types=[
            "sliding_attention" if w else "full_attention" for w in cfg.layer_windows or (0,) * cfg.n_layers
        ],
    )
