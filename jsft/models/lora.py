"""LoRA adapters on the decoder's linear projections, over a float or a quantized (QLoRA) base.

A target projection W (stacked over layers, e.g. q_proj [L, D, N, H]) gains A [L, D, r] and
B [L, r, N, H]; its output becomes

    x W  +  s * ((dropout(x) A) B),     s = alpha / r   (rsLoRA: alpha / sqrt(r))

computed in activation space, so no [D, N*H] weight delta or gradient exists during training. A
starts uniform in +-1/sqrt(fan_in) (PEFT's Kaiming-uniform default) and B at zero, so step 0 is the
base model exactly. With QLoRA (`quant` = int8 | nf4, jsft/models/quant.py) every projection of the
layers is stored quantized and dequantized in the matmul (and again in the backward: no dequantized
copy is kept for it, whatever `remat`); embeddings, norms and the head stay in the parameter dtype,
and adapters are always float32 parameters.

Why jsft has its own LoRA instead of qwix (Google's JAX quantization/LoRA library): qwix wraps a
stateful NNX module, finds the weight of each intercepted matmul by walking Python frames for `self`,
and creates the adapters on the first traced call; jsft's layers are one stacked module run under
`jax.lax.scan` over a plain parameter dict (the step, the optimizer, the checkpoint and the HF/PEFT
key maps all see that dict), a combination qwix does not test. The piece is small: this file and
`quant.py`.

Parameters are named `<weight>_lora_a`, `<weight>_lora_b` and `<weight>_scale` (quantization scales)
beside their weight, so sharding rules, checkpoints and `train.trainable`-style paths see them.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jsft.models import quant

# The linear projections of a block: path under `layers` -> (short name, HF module, input axes).
PROJECTIONS = {
    "attn.q_proj": ("q", "self_attn.q_proj", 1),
    "attn.k_proj": ("k", "self_attn.k_proj", 1),
    "attn.v_proj": ("v", "self_attn.v_proj", 1),
    "attn.o_proj": ("o", "self_attn.o_proj", 2),
    "mlp.gate_proj": ("gate", "mlp.gate_proj", 1),
    "mlp.up_proj": ("up", "mlp.up_proj", 1),
    "mlp.down_proj": ("down", "mlp.down_proj", 1),
}
ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")
METHODS = ("none", "lora", "qlora")


def parse_targets(text: str) -> tuple[str, ...]:
    """`q,k,v,o,gate,up,down`, HF module names (`q_proj`, `self_attn.o_proj`), `all` (every linear
    projection) or regular expressions over the paths (`attn\\..*`) -> the projection paths, in order."""
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    if not tokens:
        raise ValueError("config.peft.targets is empty; name projections such as q,k,v,o,gate,up,down")
    chosen = set()
    for token in tokens:
        hits = set()
        if token in ("all", "all-linear", "all_linear"):
            hits = set(PROJECTIONS)
        for path, (short, hf_name, _) in PROJECTIONS.items():
            if token in (short, path, hf_name, path.split(".")[1]):
                hits.add(path)
        if not hits:
            try:
                hits = {p for p in PROJECTIONS if re.search(token, "layers." + p)}
            except re.error as e:
                raise ValueError(
                    f"config.peft.targets: {token!r} is not a name or a regular expression: {e}"
                ) from e
        if not hits:
            names = ", ".join(f"{v[0]} (layers.{k})" for k, v in PROJECTIONS.items())
            raise ValueError(
                f"config.peft.targets: {token!r} matches no linear projection; they are: {names}"
            )
        chosen |= hits
    return tuple(p for p in PROJECTIONS if p in chosen)


def scaling(rank: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def check_rank(rank: int, shapes: dict[str, tuple[int, ...]]) -> None:
    """ValueError when `rank` exceeds the smaller side (fan in, fan out) of a target projection;
    `shapes`: path -> one layer's weight shape."""
    if rank < 1:
        raise ValueError(f"config.peft.rank={rank} must be >= 1")
    for path, shape in shapes.items():
        n_in = PROJECTIONS[path][2]
        fan_in, fan_out = math.prod(shape[:n_in]), math.prod(shape[n_in:])
        if rank > min(fan_in, fan_out):
            raise ValueError(
                f"config.peft.rank={rank} is larger than layers.{path}'s {fan_in} x {fan_out} matrix "
                f"(at most {min(fan_in, fan_out)})"
            )


# ---------------------------------------------------------------------- inside the model


def split_spec(spec: str) -> tuple[str, str, str, str, str]:
    """'BTD,DNH->BTNH' -> (x 'BTD', w 'DNH', y 'BTNH', input letters 'D', output letters 'NH')."""
    inputs, y = spec.split("->")
    x, w = inputs.split(",")
    ins = "".join(c for c in w if c in x)
    outs = "".join(c for c in w if c not in x)
    return x, w, y, ins, outs


def project(
    module: Any, name: str, spec: str, x: jax.Array, cfg: Any, rng: jax.Array | None = None
) -> jax.Array:
    """`einsum(spec, x, W)` for the projection `name` of `module`, dequantizing W when it is stored
    quantized and adding the LoRA path when it has adapters (dropout on its input with `rng`)."""
    dt = x.dtype
    w = getattr(module, name)[...]
    if cfg.quant != "none":
        y = _dequantized_einsum(spec, cfg.quant, x, w, getattr(module, name + "_scale")[...])
    else:
        y = jnp.einsum(spec, x, w.astype(dt))
    if not hasattr(module, name + "_lora_a"):
        return y
    xs, _, ys, ins, outs = split_spec(spec)
    rows = "".join(c for c in xs if c not in ins)
    if rng is not None and cfg.lora_dropout > 0:  # inverted dropout on the adapters' input
        keep = jax.random.bernoulli(rng, 1.0 - cfg.lora_dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - cfg.lora_dropout), 0).astype(dt)
    a = getattr(module, name + "_lora_a")[...].astype(dt)
    b = getattr(module, name + "_lora_b")[...].astype(dt)
    xa = jnp.einsum(f"{xs},{ins}R->{rows}R", x, a)
    return y + (cfg.lora_scale * jnp.einsum(f"{rows}R,R{outs}->{ys}", xa, b)).astype(dt)


@functools.partial(jax.checkpoint, static_argnums=(0, 1), prevent_cse=False)
def _dequantized_einsum(spec: str, fmt: str, x: jax.Array, codes: jax.Array, scale: jax.Array) -> jax.Array:
    """`einsum(spec, x, dequantize(codes, scale))`, keeping only its inputs for the backward.

    The backward needs the float weight (dx = dy W^T). Without this checkpoint autodiff keeps the
    dequantized copy, and scan stacks it over the layers: with `model.remat=none` a compute-dtype copy
    of the whole base beside the codes (8B: 7.0B weights, 14 GB in bfloat16). Here the
    backward re-dequantizes from the codes instead (one elementwise pass over them per projection).
    Under a layer remat policy (`full`, `dots`) that policy decides, as before: neither saves the
    dequantized weight (it is no matmul output)."""
    return jnp.einsum(spec, x, quant.dequantize(codes, scale, fmt, x.dtype))


def declare(
    module: Any,
    name: str,
    path: str,
    make_param: Callable,
    init: Callable,
    shape: tuple[int, ...],
    axes: tuple[str, ...],
    cfg: Any,
) -> None:
    """Create projection `name` on `module`: the weight (quantized with QLoRA) and, for a target,
    its adapters. `make_param(init, shape, axes, dtype)` makes one nnx.Param."""
    if cfg.quant == "none":
        setattr(module, name, make_param(init, shape, axes, cfg.param_dtype))
    else:
        codes_shape, scale_shape = quant.stored_shapes(shape, cfg.quant, cfg.quant_block)
        code_dtype = jnp.int8 if cfg.quant == "int8" else jnp.uint8
        zeros = jax.nn.initializers.zeros
        setattr(module, name, make_param(zeros, codes_shape, axes, code_dtype))
        setattr(module, name + "_scale", make_param(jax.nn.initializers.ones, scale_shape, axes, jnp.float32))
    if path in cfg.lora_targets:
        n_in = PROJECTIONS[path][2]
        r = cfg.lora_rank
        bound = math.prod(shape[:n_in]) ** -0.5
        uniform = lambda key, s, dt: jax.random.uniform(key, s, dt, -bound, bound)  # noqa: E731
        setattr(
            module,
            name + "_lora_a",
            make_param(uniform, (*shape[:n_in], r), (*axes[:n_in], "lora_rank"), jnp.float32),
        )
        setattr(
            module,
            name + "_lora_b",
            make_param(zeros_init, (r, *shape[n_in:]), ("lora_rank", *axes[n_in:]), jnp.float32),
        )


def zeros_init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    return jnp.zeros(shape, dtype)


# ---------------------------------------------------------------------- on parameter dicts


def _projection_leaves(params: dict):
    """(path, parent dict, weight name) of every projection in a params dict."""
    for path in PROJECTIONS:
        group, name = path.split(".")
        yield path, params["layers"][group], name


def attach(base: dict, rng: jax.Array, cfg: Any) -> dict:
    """A base model's parameters (float, as loaded or initialised) -> this config's: projections
    quantized (QLoRA, one layer at a time), fresh adapters on the targets (A random, B zero)."""
    out = jax.tree.map(lambda x: x, base)  # new dicts, same arrays
    for i, (path, parent, name) in enumerate(_projection_leaves(out)):
        w = parent[name]
        if cfg.quant != "none" and name + "_scale" not in parent:  # not quantized while loading
            parent[name], parent[name + "_scale"] = quantize_stacked(w, cfg)
        if path in cfg.lora_targets:
            n_in = PROJECTIONS[path][2]
            layers, per_layer = w.shape[0], w.shape[1:]
            bound = math.prod(per_layer[:n_in]) ** -0.5
            key = jax.random.fold_in(rng, i)
            a_shape = (layers, *per_layer[:n_in], cfg.lora_rank)
            parent[name + "_lora_a"] = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound)
            parent[name + "_lora_b"] = jnp.zeros((layers, cfg.lora_rank, *per_layer[n_in:]), jnp.float32)
    return out


def quantize_stacked(w: jax.Array, cfg: Any) -> tuple[jax.Array, jax.Array]:
    """(codes, scales) of a stacked [L, ...] projection, quantized one layer at a time."""
    return jax.lax.map(lambda layer: quant.quantize(layer, cfg.quant, cfg.quant_block), w)


def is_projection(path: tuple) -> bool:
    """Whether a parameter path (('layers', 'attn', 'q_proj'), ...) is a projection of the layers."""
    return len(path) == 3 and path[0] == "layers" and f"{path[1]}.{path[2]}" in PROJECTIONS


def delta(a: jax.Array, b: jax.Array, n_in: int, scale: float) -> jax.Array:
    """The weight update s * A B of one stacked projection, in the weight's layout [L, in..., out...]."""
    layers, ins, r = a.shape[0], a.shape[1 : 1 + n_in], a.shape[-1]
    outs = b.shape[2:]
    flat = jnp.einsum("lir,lro->lio", a.reshape(layers, -1, r), b.reshape(layers, r, -1))
    return (scale * flat).reshape(layers, *ins, *outs)


def merge(params: dict, cfg: Any, dtype: Any) -> dict:
    """This config's parameters -> the base model's (float `dtype` projections, adapters folded in):
    what a merged export writes and what PEFT's merge_and_unload computes."""
    out = jax.tree.map(lambda x: x, params)
    for path, parent, name in _projection_leaves(out):
        w = parent[name]
        if cfg.quant != "none":
            w = jax.lax.map(
                lambda lw: quant.dequantize(lw[0], lw[1], cfg.quant), (w, parent.pop(name + "_scale"))
            )
        w = w.astype(jnp.float32)
        if name + "_lora_a" in parent:
            a, b = parent.pop(name + "_lora_a"), parent.pop(name + "_lora_b")
            w = w + delta(a, b, PROJECTIONS[path][2], cfg.lora_scale)
        parent[name] = w.astype(dtype)
    return out


def is_adapter(path: str) -> bool:
    return path.endswith(ADAPTER_SUFFIXES)


def _leaf_name(path: tuple) -> str:
    return str(getattr(path[-1], "key", path[-1]))


def adapter_mask(params: Any) -> Any:
    """True on the adapters (what trains with LoRA/QLoRA), False on the base."""
    return jax.tree_util.tree_map_with_path(lambda p, _: is_adapter(_leaf_name(p)), params)


def base_bytes(params: Any) -> int:
    """Bytes of the non-adapter parameters (the frozen base; abstract or concrete arrays)."""
    flat = jax.tree_util.tree_leaves_with_path(params)
    return sum(
        int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for p, x in flat if not is_adapter(_leaf_name(p))
    )
