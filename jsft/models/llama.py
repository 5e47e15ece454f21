"""A Llama-family decoder in Flax NNX: RMSNorm, RoPE (rope.py), grouped-query attention, SwiGLU.

One implementation serves every family jsft supports; differences between families are fields of
`LlamaConfig`, never forks of this file (which is why it is one file of about 400 lines). Layers are
created stacked (a leading `layers` axis on every block parameter) and run under `jax.lax.scan`, so
compile time does not grow with depth.

Shape letters used in einsums and suffixes:
  B batch, T query length, S key length, D model width, N query heads, K kv heads,
  G query heads per kv head (N = K * G), H head dim, F mlp width, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jsft.models import attention, lora, moe, quant
from jsft.models.rope import apply_rope, rope_scaling_problems, rope_tables
from jsft.parallel.sharding import constrain

# Logical axis names used on parameters; config.mesh.rules (jsft/parallel/sharding.py) map them to mesh axes.
LOGICAL_AXES = ("batch", "seq", "embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", "layers", "expert")

ACTIVATION_AXES = ("batch", "seq", "embed")  # the residual stream between blocks
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}

# What a layer keeps for the backward (`model.remat`). The projections and the attention kernel's output
# are named (`checkpoint_name`: q_proj ... down_proj, attention_out; a MoE layer's router logits and
# expert matmuls), so a policy can keep exactly them.
_POLICIES = jax.checkpoint_policies
ATTENTION_SAVES = ("q_proj", "k_proj", "v_proj", "attention_out", "o_proj")
MLP_SAVES = ("gate_proj", "up_proj", "down_proj")
MOE_SAVES = ("router_logits", "expert_gate", "expert_up", "expert_down")  # jsft/models/moe.py's names
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: keep every activation (fastest, most memory)
    "full": _POLICIES.nothing_saveable,  # keep only each layer's input; recompute the layer
    # Keep every projection's output and the attention output: the backward recomputes only norms,
    # RoPE and elementwise ops (the attention itself is never recomputed).
    "save_dots": _POLICIES.save_only_these_names(*ATTENTION_SAVES, *MLP_SAVES, *MOE_SAVES),
    # As save_dots, but the MLP (the widest activations, [B, T, mlp_dim] x 3; a MoE layer's router
    # logits and experts' [T * k, moe_mlp_dim] x 2 and [T * k, D]) is recomputed.
    "save_dots_except_mlp": _POLICIES.save_only_these_names(*ATTENTION_SAVES),
    # Keep only what is costly to recompute at long context: the attention output.
    "save_attention_out": _POLICIES.save_only_these_names("attention_out"),
    # save_dots' residuals, moved to host memory after the forward and back for the backward
    # (needs a `pinned_host` memory space: GPUs and TPUs have one, and so does XLA's CPU client).
    "offload": _POLICIES.save_and_offload_only_these_names(
        names_which_can_be_saved=(),
        names_which_can_be_offloaded=(*ATTENTION_SAVES, *MLP_SAVES, *MOE_SAVES),
        offload_src="device",
        offload_dst="pinned_host",
    ),
    # JAX's own dot policies, by their earlier jsft names: every matmul output (attention's QK^T and
    # PV included, [B, N, T, S]), or those without batch dimensions (the projections).
    "dots": _POLICIES.dots_saveable,
    "dots_no_batch": _POLICIES.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shapes and numerics of one decoder. Presets are named constructors below."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: biases on the q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on queries and keys, before RoPE
    sliding_window: int = 0  # Mistral: a query sees at most this many keys back (0: unlimited)
    # RoPE frequency scaling as (key, value) pairs named as in HF's `rope_scaling`, e.g.
    # (("rope_type", "yarn"), ("factor", 4.0), ...): default, linear, llama3, yarn, dynamic (rope.py)
    rope_scaling: tuple = ()
    # Gemma 2: RMSNorm scales by (norm_offset + w); embeddings scaled by sqrt(d_model); tanh soft-caps
    # on attention and final logits; queries scaled by query_scale**-0.5 instead of head_dim**-0.5;
    # GeLU (tanh) MLP; extra norms after attention and MLP; a sliding window on some layers.
    norm_offset: float = 0.0
    embed_scale: bool = False
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    query_scale: float = 0.0
    activation: str = "silu"
    post_norms: bool = False
    layer_windows: tuple = ()  # per-layer sliding window (0: global); overrides sliding_window
    # Gemma 3: the layers with a window (layer_windows) rotate with their own RoPE base and scaling;
    # the others keep rope_theta/rope_scaling (0: every layer uses those).
    local_rope_theta: float = 0.0
    local_rope_scaling: tuple = ()
    init_std: float = 0.02
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"
    attention: str = "auto"  # a kernel of jsft/models/attention.py
    attention_chunk: int = 128  # query rows per chunk of the chunked kernel
    # LoRA / QLoRA (jsft/models/lora.py): adapters of rank `lora_rank` on the `lora_targets`
    # projections (paths such as "attn.q_proj"), output scaled by `lora_scale`; `quant` stores every
    # projection of the layers as int8 or nf4 in blocks of `quant_block` along its last axis.
    lora_rank: int = 0
    lora_targets: tuple = ()
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    quant: str = "none"
    quant_block: int = 64
    # NEFTune (Jain et al., arXiv 2310.05914): training only (when the forward gets an rng), uniform
    # noise of scale alpha / sqrt(L * d_model) on the input embeddings, L the example's own length.
    neftune_alpha: float = 0.0
    # Dropout, training only (when the forward gets an rng): on the embeddings, and on each sublayer's
    # output before it joins the residual stream (GPT-2's resid_pdrop). Attention-probability dropout
    # is not offered: the fused kernels (flash, splash, cuDNN through XLA) do not expose it.
    dropout_embed: float = 0.0
    dropout_residual: float = 0.0
    # Mixture of Experts (jsft/models/moe.py; Qwen3-MoE, Mixtral): with `n_experts` > 0 each layer's MLP
    # is `n_experts` SwiGLU experts of width `moe_mlp_dim`, each token routed to `experts_per_token` of
    # them (weights renormalised with `norm_topk_prob`), except the layers in `dense_layers`, which
    # keep a dense MLP of width `mlp_dim` (Qwen3-MoE's mlp_only_layers / decoder_sparse_step).
    # `capacity_factor` > 0 caps each expert's tokens (0: dropless). Training adds
    # `router_aux_loss_coef` * the load-balancing loss and `router_z_loss_coef` * the router z-loss.
    n_experts: int = 0
    experts_per_token: int = 0
    moe_mlp_dim: int = 0
    norm_topk_prob: bool = True
    dense_layers: tuple = ()
    capacity_factor: float = 0.0
    router_aux_loss_coef: float = 0.0
    router_z_loss_coef: float = 0.0

    def __post_init__(self):
        if self.attention not in attention.IMPLEMENTATIONS:
            raise ValueError(
                f"config.model.attention={self.attention!r} is not one of {attention.IMPLEMENTATIONS}"
            )
        if self.attention_chunk < 1:
            raise ValueError(f"config.model.attention_chunk={self.attention_chunk} must be >= 1")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} is not one of {sorted(REMAT_POLICIES)}")
        for name in ("param_dtype", "compute_dtype"):
            jnp.dtype(getattr(self, name))  # fails loudly on a typo such as 'bfloat'
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        if self.layer_windows and len(self.layer_windows) != self.n_layers:
            raise ValueError(
                f"layer_windows has {len(self.layer_windows)} entries for {self.n_layers} layers"
            )
        for name in ("dropout_embed", "dropout_residual", "lora_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"config.model.{name}={getattr(self, name)} must be in [0, 1)")
        if self.quant not in ("none", *quant.FORMATS):
            raise ValueError(f"quant={self.quant!r} is not one of {('none', *quant.FORMATS)}")
        if self.lora_targets and self.lora_rank < 1:
            raise ValueError(f"lora_rank={self.lora_rank} must be >= 1 with LoRA targets")
        for name in ("rope_scaling", "local_rope_scaling"):
            problems = rope_scaling_problems(getattr(self, name))
            if problems:
                raise ValueError(f"{name}: {'; '.join(problems)}")
        if self.local_rope_theta and not any(self.layer_windows):
            raise ValueError(
                "local_rope_theta is the RoPE base of windowed layers, but layer_windows has none"
            )
        self._check_moe()

    def _check_moe(self) -> None:
        object.__setattr__(self, "dense_layers", tuple(self.dense_layers))  # hashable from a config list
        if not self.n_experts:
            if self.dense_layers or self.experts_per_token or self.moe_mlp_dim:
                raise ValueError("dense_layers, experts_per_token and moe_mlp_dim need n_experts > 0")
            return
        if not 1 <= self.experts_per_token <= self.n_experts:
            raise ValueError(
                f"experts_per_token={self.experts_per_token} must be in 1..n_experts={self.n_experts}"
            )
        if self.moe_mlp_dim < 1:
            raise ValueError(f"moe_mlp_dim={self.moe_mlp_dim} must be >= 1 with n_experts > 0")
        if any(not 0 <= i < self.n_layers for i in self.dense_layers) or len(set(self.dense_layers)) != len(
            self.dense_layers
        ):
            raise ValueError(
                f"dense_layers={self.dense_layers} must be distinct layers 0..{self.n_layers - 1}"
            )
        if len(self.dense_layers) == self.n_layers:
            raise ValueError("every layer is in dense_layers; a dense model has n_experts=0")
        if self.capacity_factor < 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be >= 0 (0: dropless)")
        if self.is_peft:
            raise ValueError("LoRA/QLoRA on Mixture-of-Experts models is not implemented yet")
        if self.activation != "silu":
            raise ValueError(f"activation={self.activation!r}: the experts are SwiGLU (silu) only")

    @classmethod
    def tiny(cls, vocab_size: int = 256, **overrides: Any) -> LlamaConfig:
        """A model small enough for unit tests on one CPU core."""
        base = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=128)
        return cls(vocab_size=vocab_size, **{**base, **overrides})

    @classmethod
    def llama3_8b(cls, **overrides: Any) -> LlamaConfig:
        base = dict(
            vocab_size=128256,
            d_model=4096,
            n_layers=32,
            n_heads=32,
            n_kv_heads=8,
            head_dim=128,
            mlp_dim=14336,
            rope_theta=500000.0,
            norm_eps=1e-5,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def llama3_70b(cls, **overrides: Any) -> LlamaConfig:
        return cls.llama3_8b(
            **{"d_model": 8192, "n_layers": 80, "n_heads": 64, "mlp_dim": 28672, **overrides}
        )

    def shape_fields(self) -> dict[str, Any]:
        """The architecture fields (not numerics or remat), e.g. to fill a config's `model` section."""
        keep = (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "mlp_dim",
            "rope_theta",
            "norm_eps",
            "tie_embeddings",
        )
        return {k: getattr(self, k) for k in keep}

    def base(self) -> LlamaConfig:
        """The same decoder without adapters or quantization (what checkpoints of the base hold)."""
        return dataclasses.replace(self, lora_rank=0, lora_targets=(), quant="none")

    @property
    def is_peft(self) -> bool:
        return bool(self.lora_targets) or self.quant != "none"

    def num_params(self) -> int:
        """Every parameter (with MoE: every expert's)."""
        return self._params(self.n_experts)

    def active_params(self) -> int:
        """Parameters one token uses (with MoE: its `experts_per_token` experts and the router), for
        FLOPs and MFU; `num_params()` for a dense model."""
        return self._params(self.experts_per_token)

    def _params(self, experts: int) -> int:
        d, h = self.d_model, self.head_dim
        attn = d * h * (2 * self.n_heads + 2 * self.n_kv_heads)
        block = attn + 3 * d * self.mlp_dim + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        n_moe = self.n_layers - len(self.dense_layers) if self.n_experts else 0
        moe_block = attn + experts * 3 * d * self.moe_mlp_dim + d * self.n_experts + 2 * d
        return self.vocab_size * d + (self.n_layers - n_moe) * block + n_moe * moe_block + d + head

    def layer_stacks(self) -> tuple[tuple[str, tuple[int, ...], bool], ...]:
        """(params key, the layers it stacks in depth order, whether they are MoE) per stack of layers:
        `layers` holds every layer of a dense model and the MoE layers of a MoE model; `dense_layers`
        the dense layers of a MoE model that has some."""
        every = tuple(range(self.n_layers))
        if not self.n_experts:
            return (("layers", every, False),)
        sparse = tuple(i for i in every if i not in self.dense_layers)
        dense = tuple(sorted(self.dense_layers))
        return (("layers", sparse, True),) + ((("dense_layers", dense, False),) if dense else ())

    def layer_runs(self) -> tuple[tuple[str, int, int, int], ...]:
        """(stack, first, end within the stack, first layer in depth) per run of consecutive layers of
        one stack, in depth order: the forward scans each run (one run unless dense and MoE layers mix)."""
        where = {i: (name, j) for name, ids, _ in self.layer_stacks() for j, i in enumerate(ids)}
        runs: list[list] = []
        for i in range(self.n_layers):
            name, j = where[i]
            if runs and runs[-1][0] == name:
                runs[-1][2] = j + 1
            else:
                runs.append([name, j, j + 1, i])
        return tuple(tuple(r) for r in runs)


def _param(rngs: nnx.Rngs, init, shape, axes, dtype) -> nnx.Param:
    # eager_sharding=False: parameters only carry their logical names here; placement on a mesh
    # happens once, outside the model, from those names (see DESIGN.md).
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


def _fan_in_init(fan_in: int):
    return jax.nn.initializers.normal(stddev=fan_in**-0.5)


class RMSNorm(nnx.Module):
    def __init__(
        self, dim: int, eps: float, dtype: str, rngs: nnx.Rngs, axis_name: str = "embed", offset: float = 0.0
    ):
        self.eps, self.offset = eps, offset
        init = jax.nn.initializers.zeros if offset else jax.nn.initializers.ones  # starts as identity
        self.scale = _param(rngs, init, (dim,), (axis_name,), dtype)

    def __call__(self, x):
        # Normalise in float32 whatever the compute dtype: bf16 variance is too coarse.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout (kept values scaled by 1 / (1 - rate)); the identity without an rng or rate."""
    if rng is None or not rate:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _linear_maker(module: nnx.Module, rngs: nnx.Rngs, group: str, cfg: LlamaConfig):
    """name, init, shape, axes -> the projection `name` on `module` (quantized, with adapters: lora.py)."""

    def make_param(init, shape, axes, dtype):
        return _param(rngs, init, shape, axes, dtype)

    def linear(name, init, shape, axes):
        lora.declare(module, name, f"{group}.{name}", make_param, init, shape, axes, cfg)

    return linear


def _projector(module: nnx.Module, rng: jax.Array | None):
    """name, einsum spec, x -> x times the projection `name` (LoRA dropout keys folded from `rng`)."""
    counter = iter(range(8))

    def proj(name, spec, x):
        key = None if rng is None else jax.random.fold_in(rng, next(counter))
        return checkpoint_name(lora.project(module, name, spec, x, module.cfg, key), name)

    return proj


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        d, n, k, h, pd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.param_dtype
        self.cfg = cfg
        linear = _linear_maker(self, rngs, "attn", cfg)
        linear("q_proj", _fan_in_init(d), (d, n, h), ("embed", "heads", "head_dim"))
        linear("k_proj", _fan_in_init(d), (d, k, h), ("embed", "kv_heads", "head_dim"))
        linear("v_proj", _fan_in_init(d), (d, k, h), ("embed", "kv_heads", "head_dim"))
        # Output projections start small (scaled by depth) so the residual stream stays O(1).
        out_std = (n * h) ** -0.5 / (2 * cfg.n_layers) ** 0.5
        linear("o_proj", jax.nn.initializers.normal(out_std), (n, h, d), ("heads", "head_dim", "embed"))
        if cfg.qkv_bias:
            zeros = jax.nn.initializers.zeros
            self.q_bias = _param(rngs, zeros, (n, h), ("heads", "head_dim"), pd)
            self.k_bias = _param(rngs, zeros, (k, h), ("kv_heads", "head_dim"), pd)
            self.v_bias = _param(rngs, zeros, (k, h), ("kv_heads", "head_dim"), pd)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, cfg.norm_eps, pd, rngs, "head_dim", cfg.norm_offset)
            self.k_norm = RMSNorm(h, cfg.norm_eps, pd, rngs, "head_dim", cfg.norm_offset)

    def __call__(self, x_btd, cos, sin, mask, kv_cache=None, rng=None):
        """Returns (output, kv). With `kv_cache` = (k [L, B, S, K, H], v, layer, slots [B, T]) the new
        keys and values are written at `slots` of layer `layer` of the stacked cache (only those slots:
        the cache is updated in place) and the queries attend over that layer's S slots (decoding;
        `mask` is then a dense [B, T, S] array); kv is the updated (k, v). Without it, attention is
        over the T tokens themselves (`mask` an attention.Mask) and kv is None."""
        dt = x_btd.dtype
        proj = _projector(self, rng)
        q_btnh = proj("q_proj", "BTD,DNH->BTNH", x_btd)
        k_btkh = proj("k_proj", "BTD,DKH->BTKH", x_btd)
        v_btkh = proj("v_proj", "BTD,DKH->BTKH", x_btd)
        if self.cfg.qkv_bias:
            q_btnh = q_btnh + self.q_bias[...].astype(dt)
            k_btkh = k_btkh + self.k_bias[...].astype(dt)
            v_btkh = v_btkh + self.v_bias[...].astype(dt)
        if self.cfg.qk_norm:
            q_btnh, k_btkh = self.q_norm(q_btnh), self.k_norm(k_btkh)
        q_btnh, k_btkh = apply_rope(q_btnh, cos, sin), apply_rope(k_btkh, cos, sin)
        scale = (self.cfg.query_scale or self.cfg.head_dim) ** -0.5
        if kv_cache is None:
            cfg = self.cfg
            kernel = attention.resolve(
                cfg.attention,
                cfg.attn_softcap,
                per_layer_windows=bool(cfg.layer_windows),
                dtype=q_btnh.dtype,
                head_dim=cfg.head_dim,
                packed=mask.packed,
            )
            out_btnh = attention.attend(
                kernel,
                q_btnh,
                k_btkh,
                v_btkh,
                mask,
                scale,
                cfg.attn_softcap,
                cfg.attention_chunk,
                cfg.sliding_window,
                cfg.layer_windows,
            )
            out_btnh = checkpoint_name(out_btnh, "attention_out")
            return proj("o_proj", "BTNH,NHD->BTD", out_btnh), None
        k_lbskh, v_lbskh, layer, slots_bt = kv_cache
        rows_b1 = jnp.arange(x_btd.shape[0])[:, None]
        k_lbskh = k_lbskh.at[layer, rows_b1, slots_bt].set(k_btkh.astype(k_lbskh.dtype))
        v_lbskh = v_lbskh.at[layer, rows_b1, slots_bt].set(v_btkh.astype(v_lbskh.dtype))
        # [B, S, K, H]: this layer's keys and values, the new ones included
        k_bskh, v_bskh = k_lbskh[layer].astype(dt), v_lbskh[layer].astype(dt)
        out_btnh = attention.reference_attention(q_btnh, k_bskh, v_bskh, mask, scale, self.cfg.attn_softcap)
        return proj("o_proj", "BTNH,NHD->BTD", out_btnh), (k_lbskh, v_lbskh)


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.mlp_dim
        self.cfg = cfg
        linear = _linear_maker(self, rngs, "mlp", cfg)
        linear("gate_proj", _fan_in_init(d), (d, f), ("embed", "mlp"))
        linear("up_proj", _fan_in_init(d), (d, f), ("embed", "mlp"))
        down_std = f**-0.5 / (2 * cfg.n_layers) ** 0.5
        linear("down_proj", jax.nn.initializers.normal(down_std), (f, d), ("mlp", "embed"))
        self.activation = cfg.activation

    def __call__(self, x_btd, rng=None):
        proj = _projector(self, rng)
        gate_btf = proj("gate_proj", "BTD,DF->BTF", x_btd)
        up_btf = proj("up_proj", "BTD,DF->BTF", x_btd)
        act = ACTIVATIONS[self.activation]
        return proj("down_proj", "BTF,FD->BTD", act(gate_btf) * up_btf)


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs, sparse: bool = False):
        def norm():
            return RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype, rngs, offset=cfg.norm_offset)

        def make_param(init, shape, axes):
            return _param(rngs, init, shape, axes, cfg.param_dtype)

        self.attn_norm, self.attn, self.mlp_norm = norm(), Attention(cfg, rngs), norm()
        self.sparse = sparse
        if sparse:  # Mixture of Experts: `moe` in place of `mlp`
            self.moe = moe.MoE(cfg, make_param, ACTIVATIONS[cfg.activation])
        else:
            self.mlp = MLP(cfg, rngs)
        self.post_norms = cfg.post_norms
        self.dropout_residual = cfg.dropout_residual
        if cfg.post_norms:  # Gemma 2's "sandwich": the sublayer's output is normalised too
            self.post_attn_norm, self.post_mlp_norm = norm(), norm()

    def __call__(self, x_btd, cos, sin, mask, kv_cache=None, rng=None, real_bt=None):
        """(x, kv as Attention returns it, router stats of a MoE layer (moe.router_stats) or None);
        `real_bt` marks real tokens for the router (None: every token; decoding, which is dropless)."""
        attn_rng, mlp_rng = (None, None) if rng is None else jax.random.split(rng)
        rate = self.dropout_residual
        drop = (
            (lambda x, i: x)
            if rng is None or not rate
            else (lambda x, i: dropout(x, rate, jax.random.fold_in(rng, i)))
        )
        attn_btd, kv = self.attn(self.attn_norm(x_btd), cos, sin, mask, kv_cache, attn_rng)
        attn_btd = drop(self.post_attn_norm(attn_btd) if self.post_norms else attn_btd, 2)
        x_btd = x_btd + attn_btd
        stats = None
        if self.sparse:
            real = jnp.ones(x_btd.shape[:2], jnp.bool_) if real_bt is None else real_bt
            mlp_btd, stats = self.moe(self.mlp_norm(x_btd), real, dropless=real_bt is None)
        else:
            mlp_btd = self.mlp(self.mlp_norm(x_btd), mlp_rng)
        return x_btd + drop(self.post_mlp_norm(mlp_btd) if self.post_norms else mlp_btd, 3), kv, stats


def _stacked_blocks(cfg: LlamaConfig, rngs: nnx.Rngs, n: int, sparse: bool) -> Block:
    """`n` Blocks as one module whose parameters have a leading `layers` axis."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_layers(rngs):
        return Block(cfg, rngs, sparse)

    return make_layers(rngs)


class Llama(nnx.Module):
    """Decoder-only LM: tokens [B, T] -> logits [B, T, V] (float32)."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(
            rngs,
            jax.nn.initializers.normal(cfg.init_std),
            (cfg.vocab_size, cfg.d_model),
            ("vocab", "embed"),
            cfg.param_dtype,
        )

        for name, ids, sparse in cfg.layer_stacks():
            setattr(self, name, _stacked_blocks(cfg, rngs, len(ids), sparse))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype, rngs, offset=cfg.norm_offset)
        if not cfg.tie_embeddings:
            self.lm_head = _param(
                rngs,
                _fan_in_init(cfg.d_model),
                (cfg.d_model, cfg.vocab_size),
                ("embed", "vocab"),
                cfg.param_dtype,
            )

    def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None, rng=None):
        """positions restart at 0 for each packed example; segment ids (0 = padding) keep examples
        packed in one row from attending to each other. Both default to a single unpacked example.
        `rng` (training only) drives dropout; without it the forward is deterministic."""
        return self._logits(self.features(tokens_bt, positions_bt, segment_ids_bt, rng))

    def features(
        self,
        tokens_bt: jax.Array,
        positions_bt: jax.Array | None = None,
        segment_ids_bt: jax.Array | None = None,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """The final-normed hidden states [B, T, D] (compute dtype) that `head()` turns into logits;
        the training loss takes them directly (jsft/train/chunked_ce.py) so the [B, T, V] logits of
        the whole batch never exist."""
        return self.features_and_router(tokens_bt, positions_bt, segment_ids_bt, rng)[0]

    def features_and_router(
        self,
        tokens_bt: jax.Array,
        positions_bt: jax.Array | None = None,
        segment_ids_bt: jax.Array | None = None,
        rng: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(`features`, router losses `moe.router_losses` over the real tokens: {} for a dense model)."""
        cfg = self.cfg
        b, t = tokens_bt.shape
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t), (b, t))
        packed = segment_ids_bt is not None  # else one example per row: causality is the whole mask
        if segment_ids_bt is None:
            segment_ids_bt = jnp.ones((b, t), jnp.int32)
        x_btd = self._embed(tokens_bt)
        if rng is not None and cfg.neftune_alpha > 0:
            x_btd = self._neftune(x_btd, segment_ids_bt, jax.random.fold_in(rng, cfg.n_layers))
        if rng is not None and cfg.dropout_embed > 0:
            x_btd = dropout(x_btd, cfg.dropout_embed, jax.random.fold_in(rng, cfg.n_layers + 1))
        start_bt = attention.Mask.from_segments(segment_ids_bt).start_bt
        # Each example's own length drives `dynamic` RoPE scaling (rope.py), packed or not.
        rope_for = self._rope(positions_bt, start_bt)
        windowed = bool(cfg.layer_windows or cfg.sliding_window)
        windows = jnp.asarray(cfg.layer_windows or (cfg.sliding_window,) * cfg.n_layers, jnp.int32)

        real_bt = segment_ids_bt > 0 if cfg.n_experts else None  # what the router losses count
        layer_rngs = None if rng is None else jax.random.split(rng, cfg.n_layers)
        stats = []
        for layers_def, layers_state, depth, sparse in self._runs():

            def one_layer(x_btd, layer, layers_def=layers_def):
                layer_state, window, layer_rng = layer
                # A layer with a window (0: none) sees only the last `window` keys.
                mask = attention.Mask(start_bt, window if windowed else 0, packed)
                block = nnx.merge(layers_def, layer_state)
                x_btd, _, layer_stats = block(x_btd, *rope_for(window), mask, rng=layer_rng, real_bt=real_bt)
                return constrain(x_btd, ACTIVATION_AXES), layer_stats

            if cfg.remat != "none":
                one_layer = jax.checkpoint(one_layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
            xs = (layers_state, windows, layer_rngs)
            x_btd, layer_stats = jax.lax.scan(one_layer, x_btd, xs if depth is None else _slice(xs, depth))
            if sparse:
                stats.append(layer_stats)
        if not stats:
            return self.final_norm(x_btd), {}
        stats = jax.tree.map(lambda *xs: jnp.concatenate(xs), *stats)  # [MoE layers, ...]
        return self.final_norm(x_btd), moe.router_losses(stats, cfg.experts_per_token)

    def _runs(self):
        """(graphdef, state, depth slice (None: every layer), MoE?) per run of `cfg.layer_runs()`."""
        for name, first, end, depth in self.cfg.layer_runs():
            stack = getattr(self, name)
            layers_def, layers_state = nnx.split(stack)
            if end - first == self.cfg.n_layers:  # one run of every layer (dense models): no slicing
                yield layers_def, layers_state, None, stack.sparse
                continue
            part = jax.tree.map(lambda x, a=first, b=end: x[a:b], layers_state)
            yield layers_def, part, slice(depth, depth + end - first), stack.sparse

    def _rope(self, positions_bt: jax.Array, start_bt: jax.Array):
        """window -> the (cos, sin) tables [B, T, H/2] of a layer with that window (a traced scalar
        under the scan over layers): the local tables for a windowed layer when the model has them
        (Gemma 3), else the global ones. Both sets are computed once, outside the scan."""
        cfg = self.cfg
        tables = rope_tables(positions_bt, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, start_bt)
        if not cfg.local_rope_theta:
            return lambda window: tables
        local = rope_tables(
            positions_bt, cfg.head_dim, cfg.local_rope_theta, cfg.local_rope_scaling, start_bt
        )
        return lambda window: tuple(jnp.where(window > 0, a, b) for a, b in zip(local, tables, strict=True))

    def _embed(self, tokens_bt):
        dt = jnp.dtype(self.cfg.compute_dtype)
        x_btd = jnp.take(self.embed[...], tokens_bt, axis=0).astype(dt)
        if self.cfg.embed_scale:  # the scale is rounded to the compute dtype first, as Gemma does
            x_btd = x_btd * jnp.asarray(self.cfg.d_model**0.5, dt)
        return constrain(x_btd, ACTIVATION_AXES)

    def _neftune(self, x_btd: jax.Array, segment_ids_bt: jax.Array, rng: jax.Array) -> jax.Array:
        """NEFTune noise, scaled by each packed example's own length (padding gets none)."""
        b, t = segment_ids_bt.shape
        key_bt = jnp.arange(b)[:, None] * t + segment_ids_bt  # (row, segment): one example
        counts = jax.ops.segment_sum(jnp.ones(b * t, jnp.float32), key_bt.reshape(-1), num_segments=b * t)
        length_bt = counts[key_bt.reshape(-1)].reshape(b, t)
        scale_bt = self.cfg.neftune_alpha / jnp.sqrt(length_bt * self.cfg.d_model)
        noise = jax.random.uniform(rng, x_btd.shape, jnp.float32, -1.0, 1.0) * scale_bt[..., None]
        return x_btd + jnp.where(segment_ids_bt[..., None] > 0, noise, 0.0).astype(x_btd.dtype)

    def head(self) -> jax.Array:
        """The output projection [D, V] in the compute dtype (the embedding's transpose when tied)."""
        head_dv = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
        return head_dv.astype(jnp.dtype(self.cfg.compute_dtype))

    def _logits(self, x_btd):
        """Logits [B, T, V] in float32 (float32 accumulation) from final-normed hidden states."""
        logits_btv = jnp.einsum("BTD,DV->BTV", x_btd, self.head(), preferred_element_type=jnp.float32)
        if self.cfg.final_softcap:
            logits_btv = jnp.tanh(logits_btv / self.cfg.final_softcap) * self.cfg.final_softcap
        return constrain(logits_btv, ("batch", "seq", "vocab"))

    def init_cache(self, batch: int, length: int) -> dict:
        """An empty KV cache for `batch` rows of `length` slots (compute dtype)."""
        cfg = self.cfg
        shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
        zeros = jnp.zeros(shape, jnp.dtype(cfg.compute_dtype))
        return {"k": zeros, "v": zeros, "valid": jnp.zeros((batch, length), jnp.bool_)}

    def cached_forward(
        self,
        tokens_bt: jax.Array,
        start_b: jax.Array,
        is_token_bt: jax.Array,
        cache: dict,
        logits_at_b: jax.Array | None = None,
    ) -> tuple[jax.Array, dict]:
        """Decode-time forward: row b's T tokens take cache slots start_b[b] + 0..T-1 (and RoPE
        positions equal to their slots); `is_token_bt` marks real tokens (False: right padding of a
        shorter prompt, never attended to). Returns (logits [B, T, V], updated cache), or logits
        [B, 1, V] at token `logits_at_b[b]` of each row only when given (a prefill needs only the
        last prompt token's). The layers carry the whole stacked cache and write only the new
        tokens' slots, so under a jit that donates `cache` it is updated in place."""
        cfg = self.cfg
        b, t = tokens_bt.shape
        slots_bt = start_b[:, None] + jnp.arange(t)[None, :]
        rows_b1 = jnp.arange(b)[:, None]
        valid_bs = cache["valid"].at[rows_b1, slots_bt].set(is_token_bt)
        key_slots_s = jnp.arange(valid_bs.shape[1])
        distance_bts = slots_bt[:, :, None] - key_slots_s[None, None, :]
        mask_bts = valid_bs[:, None, :] & (distance_bts >= 0)
        # `dynamic` RoPE scaling: a row's real tokens take the length max slot + 1 (a prefill: the
        # prompt's length, padding aside; a decode step: its position + 1), as transformers for one row.
        start_bt = attention.Mask.from_segments(is_token_bt.astype(jnp.int32)).start_bt
        rope_for = self._rope(slots_bt, start_bt)
        windows = jnp.asarray(cfg.layer_windows or (cfg.sliding_window,) * cfg.n_layers, jnp.int32)
        carry = (self._embed(tokens_bt), cache["k"], cache["v"])
        for layers_def, layers_state, depth, _ in self._runs():

            def one_layer(carry, layer, layers_def=layers_def):
                x_btd, k_lbskh, v_lbskh = carry
                layer_state, window, index = layer
                layer_mask = mask_bts & ((window == 0) | (distance_bts < window))
                block = nnx.merge(layers_def, layer_state)
                x_btd, (k_lbskh, v_lbskh), _ = block(
                    x_btd, *rope_for(window), layer_mask, (k_lbskh, v_lbskh, index, slots_bt)
                )
                return (x_btd, k_lbskh, v_lbskh), None

            xs = (layers_state, windows, jnp.arange(cfg.n_layers))
            carry, _ = jax.lax.scan(one_layer, carry, xs if depth is None else _slice(xs, depth))
        x_btd, k, v = carry
        if logits_at_b is not None:  # [B, 1, D]: the hidden state of one token per row
            x_btd = x_btd[jnp.arange(b)[:, None], logits_at_b[:, None]]
        return self._logits(self.final_norm(x_btd)), {"k": k, "v": v, "valid": valid_bs}


def _slice(xs: tuple, depth: slice) -> tuple:
    """A run's part of per-layer scan inputs: its parameters as they are, the rest sliced by depth."""
    state, *rest = xs
    return (state, *(None if x is None else x[depth] for x in rest))
