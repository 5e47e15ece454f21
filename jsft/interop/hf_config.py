"""config.json <-> LlamaConfig: which Hugging Face families jsft speaks, and what it refuses.

Supported families: Llama (2, 3, 3.1/3.2 with `llama3` RoPE scaling and tied embeddings), Mistral
(sliding window), Qwen2/2.5 (q/k/v biases), Qwen3 (q/k norms), Gemma 2 (norm offset, embedding scale,
attention and final logit soft-capping, sandwich norms, GeLU, alternating sliding-window layers),
Gemma 3 text models (Gemma 2's layout without attention soft-caps, plus q/k norms and a RoPE base and
scaling per layer type; `gemma3_text`, and the language model of a `gemma3` image-text checkpoint,
whose vision tower is not imported),
Qwen3-MoE (top-k experts, `norm_topk_prob`, dense layers from `mlp_only_layers`/`decoder_sparse_step`)
and Mixtral (top-k experts, sliding window); RoPE scalings linear, llama3, yarn and dynamic
(jsft/models/rope.py).
Anything in a config that would change the math and that jsft does not implement is refused by name.
Its ~410 lines are one table per direction (import, export) of nine families' fields and refusals;
split per family they would repeat the shared Llama fields.
"""

from __future__ import annotations

from jsft.models.llama import LlamaConfig
from jsft.models.rope import rope_scaling_problems

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3", "qwen3_moe", "mixtral")
GEMMAS = ("gemma2", "gemma3_text")
# transformers 5.24's Gemma3TextConfig defaults, for the fields a config.json may leave out (the
# `text_config` of google/gemma-3-4b-it names six); RoPE's are in _gemma3_rope, the layer pattern's in
# _gemma_layer_types.
GEMMA3_TEXT_DEFAULTS = dict(
    vocab_size=262_208,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=131_072,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    query_pre_attn_scalar=256,
    sliding_window=4096,
)
LAYER_TYPES = ("sliding_attention", "full_attention")
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
    if family == "gemma3":  # image-text: the language model alone (hf_keys.checkpoint_layout)
        hf = gemma3_text_config(hf)
        family = "gemma3_text"
    if family == "gemma3_text":  # the Hub's image-text configs write only what differs from these
        hf = {**GEMMA3_TEXT_DEFAULTS, **hf}
    refuse = _refusals(family, hf)
    if refuse:
        raise UnsupportedCheckpoint(f"{family} config fields jsft does not implement: {', '.join(refuse)}")
    theta, scaling = _rope(hf) if family != "gemma3_text" else _gemma3_rope(hf)["full_attention"]
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
        qk_norm=family in ("qwen3", "qwen3_moe", "gemma3_text"),
        sliding_window=int(hf.get("sliding_window") or 0) if family in ("mistral", "mixtral") else 0,
        **(_gemma_fields(hf) if family in GEMMAS else {}),
        **(_gemma3_fields(hf) if family == "gemma3_text" else {}),
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


def _refusals(family: str, hf: dict) -> list[str]:
    """The fields of `hf` (a `family` config.json) that would change the math in a way jsft does not."""
    refuse = []
    default_act = "gelu_pytorch_tanh" if family in GEMMAS else "silu"  # transformers' defaults
    act = hf.get("hidden_activation") or hf.get("hidden_act") or default_act
    if family in GEMMAS:
        if act not in GEMMA_ACTIVATIONS:
            refuse.append(f"hidden_activation={act!r} (only gelu_pytorch_tanh)")
        if hf.get("use_bidirectional_attention"):
            refuse.append("use_bidirectional_attention=true")
        types = sorted(set(hf.get("layer_types") or ()) - set(LAYER_TYPES))
        refuse += [f"layer_types entry {t!r}" for t in types]
    elif act != "silu":
        refuse.append(f"hidden_act={act!r} (only silu)")
    if family == "gemma3_text":
        if hf.get("attn_logit_softcapping") is not None:  # stored, but never applied by transformers 5.24
            refuse.append(
                f"attn_logit_softcapping={hf['attn_logit_softcapping']} (Gemma 3 attention has none)"
            )
        legacy = hf.get("rope_scaling") or {}
        if "type" in legacy and "rope_type" not in legacy:  # transformers 4 applied it, 5.24 ignores it
            refuse.append("rope_scaling with 'type' and no 'rope_type' (ambiguous: call it rope_type)")
        if hf.get("sliding_window") is None and "sliding_attention" in _gemma_layer_types(hf):
            refuse.append("sliding_window=null with sliding_attention layers")
    if hf.get("mlp_bias"):
        refuse.append("mlp_bias=true")
    if hf.get("attention_bias") and family not in ("qwen2",):
        refuse.append("attention_bias=true")
    if family in ("qwen2", "qwen3", "qwen3_moe") and hf.get("use_sliding_window"):
        refuse.append("use_sliding_window=true")
    if family in MOE_FAMILIES:
        refuse += [f"{k}={hf[k]!r}" for k in _MOE_REFUSED if hf.get(k) not in (None, 0, 0.0, 1.0, False)]
        if hf.get("router_jitter_noise"):
            refuse.append(f"router_jitter_noise={hf['router_jitter_noise']} (training-time router noise)")
    if "quantization_config" in hf:
        refuse.append("quantization_config (quantized weights)")
    return refuse


def gemma3_text_config(hf: dict) -> dict:
    """The text model's config of a `gemma3` (Gemma3ForConditionalGeneration) config.json: its
    `text_config`, with the top-level `tie_word_embeddings` that transformers ties the head by."""
    text = dict(hf.get("text_config") or {})
    if not text:
        raise UnsupportedCheckpoint("a gemma3 config.json without text_config")
    text["model_type"] = "gemma3_text"
    text["tie_word_embeddings"] = hf.get("tie_word_embeddings", True)  # Gemma3Config's default
    for key in ("quantization_config",):
        if key in hf:
            text[key] = hf[key]
    return text


def _gemma_layer_types(hf: dict) -> list[str]:
    """Each layer's type: `layer_types`, else every `sliding_window_pattern`-th layer global (Gemma 3's
    older configs; default 6) or every second (Gemma 2), as transformers fills it in."""
    if hf.get("layer_types"):
        return list(hf["layer_types"])
    n = hf["num_hidden_layers"]
    if hf.get("model_type") == "gemma3_text":
        pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]


def _gemma3_rope(hf: dict) -> dict[str, tuple[float, tuple]]:
    """layer type -> (theta, scaling pairs), from transformers 5's per-type `rope_parameters` or the
    older `rope_theta` (global layers), `rope_local_base_freq` (sliding layers) and `rope_scaling`
    (global layers only), with transformers' defaults (1e6 and 1e4)."""
    params = dict(hf.get("rope_parameters") or {})
    if set(params) - set(LAYER_TYPES):
        raise UnsupportedCheckpoint(
            f"rope_parameters: gemma3_text needs one entry per layer type {LAYER_TYPES}, got {sorted(params)}"
        )
    full = {**(params.get("full_attention") or {}), **(hf.get("rope_scaling") or {})}
    full.setdefault("rope_theta", hf.get("rope_theta") or 1_000_000.0)
    local = dict(params.get("sliding_attention") or {})
    local.setdefault("rope_theta", hf.get("rope_local_base_freq") or 10_000.0)
    common = {k: hf.get(k) for k in ("max_position_embeddings", "partial_rotary_factor")}
    return {
        "full_attention": _rope({**common, "rope_parameters": full}),
        "sliding_attention": _rope({**common, "rope_parameters": local}),
    }


def _gemma3_fields(hf: dict) -> dict:
    """Gemma 3's departures from Gemma 2, as LlamaConfig fields (q/k norms are set with Qwen 3's)."""
    if "sliding_attention" not in _gemma_layer_types(hf):
        return {}
    theta, scaling = _gemma3_rope(hf)["sliding_attention"]
    return dict(local_rope_theta=theta, local_rope_scaling=scaling)


def _gemma_fields(hf: dict) -> dict:
    """Gemma 2's (and 3's) departures from Llama, as LlamaConfig fields."""
    types = _gemma_layer_types(hf)
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


def _exportable_as(cfg: LlamaConfig, family: str) -> str:
    """The family `cfg` is exported as (`gemma3`: its language model, `gemma3_text`), or a refusal
    when the model's features are not that family's."""
    if family == "gemma3":  # an image-text source: jsft holds (and exports) its language model only
        family = "gemma3_text"
    if (cfg.qkv_bias, cfg.qk_norm, cfg.post_norms, bool(cfg.local_rope_theta), bool(cfg.n_experts)) != (
        family == "qwen2",
        family in ("qwen3", "qwen3_moe", "gemma3_text"),
        family in GEMMAS,
        family == "gemma3_text" and bool(cfg.local_rope_theta),
        family in MOE_FAMILIES,
    ):
        raise UnsupportedCheckpoint(
            f"this model (qkv_bias={cfg.qkv_bias}, qk_norm={cfg.qk_norm}, post_norms={cfg.post_norms}, "
            f"local_rope_theta={cfg.local_rope_theta}, n_experts={cfg.n_experts}) is not a {family}"
        )
    if family == "gemma3_text" and cfg.attn_softcap:  # transformers' Gemma 3 would not apply it
        raise UnsupportedCheckpoint(f"attn_softcap={cfg.attn_softcap} cannot be exported as gemma3_text")
    if family == "mixtral" and (cfg.dense_layers or not cfg.norm_topk_prob):
        raise UnsupportedCheckpoint("mixtral has no dense layers and always renormalises its top-k weights")
    return family


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
    family = _exportable_as(cfg, family)
    arch = {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
        "gemma2": "Gemma2ForCausalLM",
        "gemma3_text": "Gemma3ForCausalLM",
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
    if family in GEMMAS:
        out.update(_gemma_hf_fields(cfg))
        del out["hidden_act"]
    if family == "gemma3_text":
        out.update(_gemma3_hf_fields(cfg, rope))
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


def _gemma3_hf_fields(cfg: LlamaConfig, rope: dict) -> dict:
    """Per-layer-type RoPE as transformers 5 writes it, and the older fields transformers 4 reads."""
    local_theta, local_scaling = cfg.local_rope_theta, cfg.local_rope_scaling
    if not local_theta:  # every layer rotates as the global ones (a model built without local RoPE)
        local_theta, local_scaling = cfg.rope_theta, cfg.rope_scaling
    local = {"rope_type": "default", **dict(local_scaling)}
    local.pop("max_position_embeddings", None)  # dynamic: the top-level field (config_to_hf)
    return dict(
        rope_parameters={
            "full_attention": {"rope_theta": cfg.rope_theta, **rope},
            "sliding_attention": {"rope_theta": local_theta, **local},
        },
        rope_local_base_freq=local_theta,
    )


def _gemma_hf_fields(cfg: LlamaConfig) -> dict:
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
