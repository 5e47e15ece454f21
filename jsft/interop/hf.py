"""Hugging Face checkpoints in and out: config.json <-> LlamaConfig, safetensors <-> jsft params.

Supported families: Llama (2, 3, 3.1/3.2 with `llama3` RoPE scaling and tied embeddings), Mistral
(sliding window), Qwen2/2.5 (q/k/v biases), Qwen3 (q/k norms), Gemma 2 (norm offset, embedding scale,
attention and final logit soft-capping, sandwich norms, GeLU, alternating sliding-window layers).
Anything in a config that would change the math and that jsft does not implement is refused by name;
only safetensors are read (no pickle).

HF stores projections as [out, in] matrices; jsft keeps [in, out] with heads split out
(q_proj [D, N, H], o_proj [N, H, D]) and layers stacked on a leading axis. `specs()` lists every
parameter with its HF name and the two reshapes; import and export both read this one table.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jsft.models.llama import LlamaConfig

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2")


GEMMA_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


class UnsupportedCheckpoint(ValueError):
    """A checkpoint jsft cannot load faithfully; the message names what and why."""


# --------------------------------------------------------------------------- config


def _rope(hf: dict) -> tuple[float, tuple]:
    """(theta, scaling pairs) from either transformers 4 (`rope_theta`, `rope_scaling`) or 5
    (`rope_parameters`) config layouts."""
    params = dict(hf.get("rope_parameters") or {})
    theta = float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)
    scaling = dict(hf.get("rope_scaling") or {}) or {k: v for k, v in params.items() if k != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, ()
    if kind == "linear":
        return theta, (("rope_type", "linear"), ("factor", float(scaling["factor"])))
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return theta, (("rope_type", "llama3"), *((k, float(scaling[k])) for k in keys))
    raise UnsupportedCheckpoint(f"rope scaling type {kind!r} is not supported (default, linear, llama3)")


def config_from_hf(hf: dict, **numerics) -> LlamaConfig:
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
    if family == "qwen3" and hf.get("use_sliding_window"):
        refuse.append("use_sliding_window=true")
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
        qk_norm=family == "qwen3",
        sliding_window=int(hf.get("sliding_window") or 0) if family == "mistral" else 0,
        **(_gemma2_fields(hf) if family == "gemma2" else {}),
        **numerics,
    )
    return cfg


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
    should be the source checkpoint's, or the sequence length a model was trained at from scratch.
    """
    if family not in FAMILIES:
        raise UnsupportedCheckpoint(f"cannot export as {family!r}; jsft exports {FAMILIES}")
    if (cfg.qkv_bias, cfg.qk_norm, cfg.post_norms) != (
        family == "qwen2",
        family == "qwen3",
        family == "gemma2",
    ):
        raise UnsupportedCheckpoint(
            f"this model (qkv_bias={cfg.qkv_bias}, qk_norm={cfg.qk_norm}, post_norms={cfg.post_norms}) "
            f"is not a {family}"
        )
    arch = {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
        "gemma2": "Gemma2ForCausalLM",
    }[family]
    rope = {"rope_type": "default", **dict(cfg.rope_scaling)}
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
    if family in ("llama", "mistral", "qwen3"):
        out["attention_bias"] = False
    if family == "mistral":
        out["sliding_window"] = cfg.sliding_window or None
    if family in ("qwen2", "qwen3"):
        out["use_sliding_window"] = False
        out["sliding_window"] = None
    if family == "gemma2":
        out.update(_gemma2_hf_fields(cfg))
        del out["hidden_act"]
    return out


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


# --------------------------------------------------------------------------- weights


@dataclasses.dataclass(frozen=True)
class Spec:
    path: tuple[str, ...]  # in the jsft params dict
    hf: str  # HF tensor name; `{i}` for per-layer tensors
    to_jsft: Callable  # (hf array, cfg) -> jsft array (one layer)
    to_hf: Callable  # (jsft array, cfg) -> hf array (one layer)


def _t(w, _cfg):
    return w.T


def _heads_in(n_attr):
    return lambda w, c: w.T.reshape(c.d_model, getattr(c, n_attr), c.head_dim)


def _heads_out(n_attr):
    return lambda x, c: x.reshape(c.d_model, getattr(c, n_attr) * c.head_dim).T


def _bias_in(n_attr):
    return lambda w, c: w.reshape(getattr(c, n_attr), c.head_dim)


def _same(w, _cfg):
    return w


def specs(cfg: LlamaConfig) -> list[Spec]:
    """Every parameter of a model with `cfg`, in HF terms."""
    layer = "model.layers.{i}."
    out = [
        Spec(("embed",), "model.embed_tokens.weight", _same, _same),
        Spec(("final_norm", "scale"), "model.norm.weight", _same, _same),
        Spec(("layers", "attn_norm", "scale"), layer + "input_layernorm.weight", _same, _same),
        Spec(
            ("layers", "attn", "q_proj"),
            layer + "self_attn.q_proj.weight",
            _heads_in("n_heads"),
            _heads_out("n_heads"),
        ),
        Spec(
            ("layers", "attn", "k_proj"),
            layer + "self_attn.k_proj.weight",
            _heads_in("n_kv_heads"),
            _heads_out("n_kv_heads"),
        ),
        Spec(
            ("layers", "attn", "v_proj"),
            layer + "self_attn.v_proj.weight",
            _heads_in("n_kv_heads"),
            _heads_out("n_kv_heads"),
        ),
        Spec(
            ("layers", "attn", "o_proj"),
            layer + "self_attn.o_proj.weight",
            lambda w, c: w.T.reshape(c.n_heads, c.head_dim, c.d_model),
            lambda x, c: x.reshape(c.n_heads * c.head_dim, c.d_model).T,
        ),
        Spec(("layers", "mlp", "gate_proj"), layer + "mlp.gate_proj.weight", _t, _t),
        Spec(("layers", "mlp", "up_proj"), layer + "mlp.up_proj.weight", _t, _t),
        Spec(("layers", "mlp", "down_proj"), layer + "mlp.down_proj.weight", _t, _t),
    ]
    if cfg.post_norms:  # Gemma 2: HF's post_attention_layernorm is the norm *after* attention
        out += [
            Spec(
                ("layers", "post_attn_norm", "scale"), layer + "post_attention_layernorm.weight", _same, _same
            ),
            Spec(("layers", "mlp_norm", "scale"), layer + "pre_feedforward_layernorm.weight", _same, _same),
            Spec(
                ("layers", "post_mlp_norm", "scale"),
                layer + "post_feedforward_layernorm.weight",
                _same,
                _same,
            ),
        ]
    else:
        out.append(
            Spec(("layers", "mlp_norm", "scale"), layer + "post_attention_layernorm.weight", _same, _same)
        )
    if not cfg.tie_embeddings:
        out.append(Spec(("lm_head",), "lm_head.weight", _t, _t))
    if cfg.qkv_bias:
        for name, n in (("q", "n_heads"), ("k", "n_kv_heads"), ("v", "n_kv_heads")):
            out.append(
                Spec(
                    ("layers", "attn", f"{name}_bias"),
                    layer + f"self_attn.{name}_proj.bias",
                    _bias_in(n),
                    lambda x, _c: x.reshape(-1),
                )
            )
    if cfg.qk_norm:
        for name in ("q", "k"):
            out.append(
                Spec(
                    ("layers", "attn", f"{name}_norm", "scale"),
                    layer + f"self_attn.{name}_norm.weight",
                    _same,
                    _same,
                )
            )
    return out


def _files(directory: str) -> dict[str, str]:
    """HF tensor name -> safetensors file; pickle-only checkpoints are refused."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return {k: os.path.join(directory, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(single):
        from safetensors import safe_open  # noqa: PLC0415

        with safe_open(single, "numpy") as f:
            return dict.fromkeys(f.keys(), single)
    if glob.glob(os.path.join(directory, "*.bin")) or glob.glob(os.path.join(directory, "*.pt")):
        raise UnsupportedCheckpoint(
            f"{directory} holds only pickle weights (*.bin/*.pt); jsft reads safetensors only, since "
            "unpickling can run arbitrary code. Convert with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)"
        )
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {directory}")


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config.json in {directory} (config.model.hf_path)")
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------- checkpoint directories

# The tokenizer files of a checkpoint (read from a Hub repository, copied into an export).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
# What jsft reads from a Hub repository: the model config, safetensors weights and the tokenizer.
HUB_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "model*.safetensors",
    *TOKENIZER_FILES,
    "additional_chat_templates/*.jinja",
]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _hub_cache() -> str:
    """The Hub cache directory as huggingface_hub computes it, from the environment of this moment."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return os.path.expanduser(cache or os.path.join(home, "hub"))


def _offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return any((f or "").strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def resolve_path(path_or_id: str, key: str = "config.model.hf_path") -> str:
    """A local checkpoint directory for `path_or_id`: a local directory as it is, or a Hugging Face
    Hub id (`owner/name`) as its snapshot in the Hub cache, downloaded first unless HF_HUB_OFFLINE is
    set (config, tokenizer and safetensors files only)."""
    if not path_or_id or os.path.isdir(path_or_id):
        return path_or_id
    if os.path.exists(path_or_id):
        raise UnsupportedCheckpoint(
            f"{key}={path_or_id!r} is a file; point it at a Hugging Face model directory or Hub id"
        )
    if not _HUB_ID.fullmatch(path_or_id):
        raise UnsupportedCheckpoint(
            f"{key}={path_or_id!r}: no such directory (nor a Hugging Face Hub id such as 'Qwen/Qwen3-0.6B')"
        )
    from huggingface_hub import snapshot_download  # noqa: PLC0415
    from huggingface_hub.errors import (  # noqa: PLC0415
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    cache, offline = _hub_cache(), _offline()
    try:
        return snapshot_download(
            path_or_id, cache_dir=cache, local_files_only=offline, allow_patterns=HUB_FILES
        )
    except LocalEntryNotFoundError as e:
        if type(e).__name__ == "IncompleteSnapshotError":  # huggingface_hub >= 1.x knows partial snapshots
            raise UnsupportedCheckpoint(
                f"{key}={path_or_id!r}: its snapshot in the Hugging Face cache ({cache}) is incomplete; "
                f"finish the download with `hf download {path_or_id}` while online"
            ) from e
        cause = e.__cause__ or e
        reason = (
            "HF_HUB_OFFLINE is set; download it first with `hf download {id}` (or point HF_HOME at a "
            "cache that has it) or set HF_HUB_OFFLINE=0"
            if offline
            else f"the Hub could not be reached ({type(cause).__name__}: {str(cause).splitlines()[0]}); "
            "check the network, or download it elsewhere with `hf download {id}` and copy the cache"
        )
        raise UnsupportedCheckpoint(
            f"{key}={path_or_id!r} is not a local directory and is not in the Hugging Face cache "
            f"({cache}, from HF_HOME or HF_HUB_CACHE), and " + reason.format(id=path_or_id)
        ) from e
    except RepositoryNotFoundError as e:
        raise UnsupportedCheckpoint(
            f"{key}={path_or_id!r}: no such model on the Hugging Face Hub, or it is private or gated "
            "(accept its terms on the model page and log in with `hf auth login`)"
        ) from e
    except HfHubHTTPError as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UnsupportedCheckpoint(
            f"{key}={path_or_id!r}: the Hugging Face Hub refused ({first_line})"
        ) from e


def check_directory(path: str, weights: bool = True, key: str = "config.model.hf_path") -> None:
    """Refuse a checkpoint directory jsft cannot load, before any data is read: no config.json, an
    unsupported architecture, or (with `weights`) no safetensors weights. Reads config.json and the
    safetensors index only."""
    where = f"{key}={path!r}"
    if not os.path.isdir(path):
        raise UnsupportedCheckpoint(f"{where}: no such directory")
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise UnsupportedCheckpoint(
            f"{where}: no config.json there; point it at a Hugging Face model directory "
            "(config.json and *.safetensors, as save_pretrained writes them)"
        )
    try:
        with open(config_path) as f:
            config_from_hf(json.load(f))
    except UnsupportedCheckpoint as e:
        raise UnsupportedCheckpoint(f"{where}: {e}") from e
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UnsupportedCheckpoint(f"{where}: config.json is not a model config ({e!r})") from e
    if not weights:
        return
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        missing = [s for s in shards if not os.path.exists(os.path.join(path, s))]
        if missing:
            raise UnsupportedCheckpoint(
                f"{where}: model.safetensors.index.json names shards that are not there: {missing[:4]}; "
                "download the checkpoint again"
            )
        return
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return
    pickles = sorted(
        os.path.basename(p)
        for p in glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt"))
    )
    if pickles:
        raise UnsupportedCheckpoint(
            f"{where} holds only pickle weights ({', '.join(pickles[:3])}); jsft reads safetensors "
            "only, since unpickling can run arbitrary code. Convert with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)"
        )
    raise UnsupportedCheckpoint(
        f"{where}: no weights (model.safetensors or model.safetensors.index.json) in the directory"
    )


def load_params(directory: str, cfg: LlamaConfig, shardings=None, dtype: str | None = None) -> dict:
    """jsft params from a HF safetensors checkpoint, one tensor at a time, each placed straight into
    its sharding (when given). Every tensor in the checkpoint must be used; extra ones are refused."""
    from safetensors import safe_open  # noqa: PLC0415

    files = _files(directory)
    handles: dict[str, object] = {}

    def tensor(name: str) -> np.ndarray:
        if name not in files:
            raise UnsupportedCheckpoint(f"{directory}: tensor {name!r} is missing")
        path = files[name]
        if path not in handles:
            handles[path] = safe_open(path, "numpy")
        return handles[path].get_tensor(name)

    dtype = jnp.dtype(dtype or cfg.param_dtype)
    params: dict = {}
    used = set()
    for spec in specs(cfg):
        sharding = _get(shardings, spec.path) if shardings is not None else None
        if "{i}" in spec.hf:
            names = [spec.hf.format(i=i) for i in range(cfg.n_layers)]
            layers = (spec.to_jsft(tensor(n), cfg).astype(dtype) for n in names)
            value = _stack_layers(layers, sharding)
        else:
            names = [spec.hf]
            value = spec.to_jsft(tensor(spec.hf), cfg).astype(dtype)
            value = jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value)
        used.update(names)
        _set(params, spec.path, value)
    extra = sorted(k for k in files if k not in used and not k.endswith("rotary_emb.inv_freq"))
    if cfg.tie_embeddings and "lm_head.weight" in extra:
        extra.remove("lm_head.weight")  # some tied checkpoints store the shared matrix twice
    if extra:
        raise UnsupportedCheckpoint(
            f"{directory}: tensors jsft would ignore (they change the model): "
            f"{extra[:8]}{' ...' if len(extra) > 8 else ''}"
        )
    return params


def _stack_layers(layers, sharding) -> jax.Array:
    """[L, ...] from per-layer host arrays. With a sharding whose layer axis is not split, each layer
    goes to the devices as it is read (one layer on the host at a time) and is stacked there."""
    if sharding is None or sharding.spec[:1] not in ((), (None,)):
        stacked = np.stack(list(layers))
        return jax.device_put(stacked, sharding) if sharding is not None else jnp.asarray(stacked)
    per_layer = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
    placed = [jax.device_put(layer, per_layer) for layer in layers]
    return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)(*placed)


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def hf_tensors(params: dict, cfg: LlamaConfig, dtype: str) -> dict[str, np.ndarray]:
    """HF-named host arrays from jsft params (gathered from every device)."""
    out = {}
    for spec in specs(cfg):
        value = np.asarray(jax.device_get(_get(params, spec.path)))
        if "{i}" in spec.hf:
            for i in range(cfg.n_layers):
                out[spec.hf.format(i=i)] = np.ascontiguousarray(
                    spec.to_hf(value[i], cfg).astype(jnp.dtype(dtype))
                )
        else:
            out[spec.hf] = np.ascontiguousarray(spec.to_hf(value, cfg).astype(jnp.dtype(dtype)))
    return out


def source_fields(directory: str) -> tuple[dict, dict | None]:
    """What an export carries over from the HF checkpoint a model was fine-tuned from: config.json's
    special ids and `max_position_embeddings` (those it sets), and generation_config.json if any."""
    source = read_config(directory)
    keys = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")
    fields = {k: source[k] for k in keys if source.get(k) is not None}
    path = os.path.join(directory, "generation_config.json")
    generation = None
    if os.path.exists(path):
        with open(path) as f:
            generation = json.load(f)
    return fields, generation


def save_pretrained(
    out_dir: str,
    params: dict,
    cfg: LlamaConfig,
    family: str,
    dtype: str = "float32",
    bos_id: int | None = None,
    eos_id: int | list[int] = 0,
    max_shard_bytes: int = 2 * 1024**3,
    tokenizer_dir: str | None = None,
    pad_id: int | None = None,
    max_position_embeddings: int = 8192,
    generation_config: dict | None = None,
) -> list[str]:
    """Write config.json, generation_config.json (`generation_config` as given, else one from the
    ids), sharded safetensors with an index, and the tokenizer files; returns the files written."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    os.makedirs(out_dir, exist_ok=True)
    tensors = hf_tensors(params, cfg, dtype)
    shards, current, size = [], {}, 0
    for name, value in tensors.items():
        if current and size + value.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = value
        size += value.nbytes
    shards.append(current)
    written, weight_map = [], {}
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
        written.append(fname)
    index = {
        "metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))},
        "weight_map": weight_map,
    }
    _write_json(os.path.join(out_dir, "model.safetensors.index.json"), index)
    config = config_to_hf(cfg, family, dtype, bos_id, eos_id, pad_id, max_position_embeddings)
    _write_json(os.path.join(out_dir, "config.json"), config)
    if generation_config is None:
        generation_config = {"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": False}
        if pad_id is not None:
            generation_config["pad_token_id"] = pad_id
    _write_json(os.path.join(out_dir, "generation_config.json"), generation_config)
    written += ["model.safetensors.index.json", "config.json", "generation_config.json"]
    if tokenizer_dir and os.path.isdir(tokenizer_dir):
        import shutil  # noqa: PLC0415

        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(tokenizer_dir, name)):
                shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
                written.append(name)
        extra = os.path.join(tokenizer_dir, "additional_chat_templates")
        if os.path.isdir(extra):
            shutil.copytree(extra, os.path.join(out_dir, "additional_chat_templates"), dirs_exist_ok=True)
            written.append("additional_chat_templates")
    return written


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
