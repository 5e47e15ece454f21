"""Where each jsft parameter lives in a Hugging Face checkpoint, and how its layout differs.

HF stores projections as [out, in] matrices; jsft keeps [in, out] with heads split out
(q_proj [D, N, H], o_proj [N, H, D]) and layers stacked on a leading axis. `specs()` lists every
parameter with its HF name and the two reshapes (for one layer, or one expert of one layer); import
and export both read this one table, so a family's key map is written once.

Mixture-of-Experts models: each stack of layers (`LlamaConfig.layer_stacks()`: `layers`, and
`dense_layers` when dense and MoE layers mix) has its own specs, whose `layers` say which HF layer each
stacked entry is. Experts are stacked too ([L, E, ...]); HF stores one tensor per expert, named as
transformers 5.24 writes them (its save reverts its in-memory fused `experts.gate_up_proj` to these):
Qwen3-MoE `mlp.gate.weight` and `mlp.experts.{e}.{gate,up,down}_proj.weight`; Mixtral
`block_sparse_moe.gate.weight` and `block_sparse_moe.experts.{e}.w1/w3/w2.weight` (gate/up/down).
Import also reads transformers' in-memory layout (`mlp.gate.weight`, `mlp.experts.gate_up_proj`
[E, 2F, D] and `mlp.experts.down_proj` [E, D, F]), which transformers loads too; export never writes it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from jsft.models.llama import LlamaConfig


@dataclasses.dataclass(frozen=True)
class Spec:
    """One jsft parameter in HF terms; `to_jsft`/`to_hf` are pure layout changes (exact)."""

    path: tuple[str, ...]  # in the jsft params dict
    hf: str  # HF tensor name; `{i}` for per-layer tensors
    to_jsft: Callable  # (hf array, cfg) -> jsft array (one layer)
    to_hf: Callable  # (jsft array, cfg) -> hf array (one layer)
    layers: tuple[int, ...] = ()  # per-layer specs: the HF layer of each entry of the stack

    @property
    def per_layer(self) -> bool:
        """A stacked [L, ...] parameter, one HF tensor per layer (and per expert with `{e}`)."""
        return "{i}" in self.hf

    @property
    def per_expert(self) -> bool:
        """A stacked [L, E, ...] parameter, one HF tensor per layer and expert."""
        return "{e}" in self.hf

    def tensors(self, n_experts: int) -> list[tuple[str, tuple[int, ...]]]:
        """(HF name, index into the jsft parameter) of every HF tensor of this parameter."""
        if not self.per_layer:
            return [(self.hf, ())]
        if not self.per_expert:
            return [(self.hf.format(i=i), (j,)) for j, i in enumerate(self.layers)]
        return [
            (self.hf.format(i=i, e=e), (j, e)) for j, i in enumerate(self.layers) for e in range(n_experts)
        ]


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


# Where a MoE layer's router and experts live: layout -> (module, gate, up, down expert names)
MOE_LAYOUTS = {
    "mlp": ("mlp", "gate_proj", "up_proj", "down_proj"),  # Qwen3-MoE
    "block_sparse_moe": ("block_sparse_moe", "w1", "w3", "w2"),  # Mixtral
}
FAMILY_MOE_LAYOUT = {"mixtral": "block_sparse_moe"}
FUSED = "fused"  # transformers' in-memory layout (import only)


def specs(cfg: LlamaConfig, moe_layout: str = "mlp") -> list[Spec]:
    """Every parameter of a model with `cfg`, in HF terms (experts named as `moe_layout` says)."""
    out = [
        Spec(("embed",), "model.embed_tokens.weight", _same, _same),
        Spec(("final_norm", "scale"), "model.norm.weight", _same, _same),
    ]
    for name, ids, sparse in cfg.layer_stacks():
        layer_specs = _layer_specs(cfg, _moe_specs(moe_layout) if sparse else _mlp_specs())
        out += [dataclasses.replace(s, path=(name, *s.path[1:]), layers=ids) for s in layer_specs]
    if not cfg.tie_embeddings:
        out.append(Spec(("lm_head",), "lm_head.weight", _t, _t))
    return out


def _mlp_specs() -> list[Spec]:
    return [
        Spec(("layers", "mlp", p), f"model.layers.{{i}}.mlp.{p}.weight", _t, _t)
        for p in ("gate_proj", "up_proj", "down_proj")
    ]


def _moe_specs(layout: str) -> list[Spec]:
    """The router [D, E] and the experts' [E, ...] weights, one HF tensor per expert (per layer when
    `layout` is FUSED)."""
    if layout == FUSED:
        return _fused_moe_specs()
    module, *names = MOE_LAYOUTS[layout]
    layer = f"model.layers.{{i}}.{module}."
    return [Spec(("layers", "moe", "router"), layer + "gate.weight", _t, _t)] + [
        Spec(("layers", "moe", p), layer + f"experts.{{e}}.{hf_name}.weight", _t, _t)
        for p, hf_name in zip(("gate_proj", "up_proj", "down_proj"), names, strict=True)
    ]


def _fused_moe_specs() -> list[Spec]:
    def fused_only(_x, _cfg):
        raise ValueError("jsft exports experts one tensor each (as transformers saves them), never fused")

    experts = "model.layers.{i}.mlp.experts."
    return [
        Spec(("layers", "moe", "router"), "model.layers.{i}.mlp.gate.weight", _t, _t),
        Spec(
            ("layers", "moe", "gate_proj"),
            experts + "gate_up_proj",
            lambda w, c: w[:, : c.moe_mlp_dim].transpose(0, 2, 1),
            fused_only,
        ),
        Spec(
            ("layers", "moe", "up_proj"),
            experts + "gate_up_proj",
            lambda w, c: w[:, c.moe_mlp_dim :].transpose(0, 2, 1),
            fused_only,
        ),
        Spec(
            ("layers", "moe", "down_proj"),
            experts + "down_proj",
            lambda w, c: w.transpose(0, 2, 1),
            fused_only,
        ),
    ]


def _layer_specs(cfg: LlamaConfig, mlp: list[Spec]) -> list[Spec]:
    """One layer's parameters (paths under `layers`; `specs` sets the stack), its MLP's from `mlp`."""
    layer = "model.layers.{i}."
    out = [
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
        *mlp,
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


# A Gemma3ForConditionalGeneration checkpoint holds its language model under a prefix (transformers
# 5 saves the first layout, which the Hub's checkpoints have; 4.5x saved the second) beside a vision
# tower and projector, which jsft does not import.
LANGUAGE_MODEL_LAYOUTS = (
    ("language_model.model.", "language_model.lm_head."),
    ("model.language_model.", "lm_head."),
)
VISION_PREFIXES = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)


def checkpoint_layout(names: Iterable[str]) -> tuple[Callable[[str], str], tuple[str, ...]]:
    """(spec name -> the name in a checkpoint with tensors `names`, prefixes of tensors to leave
    unread): the identity and none for a plain causal LM; for an image-text Gemma 3 checkpoint, its
    language model's prefix and the vision tower's prefixes."""
    names = set(names)
    for body, head in LANGUAGE_MODEL_LAYOUTS:
        if body + "embed_tokens.weight" in names:

            def rename(name, body=body, head=head):
                return (
                    body + name[len("model.") :]
                    if name.startswith("model.")
                    else head + name[len("lm_head.") :]
                )

            return rename, VISION_PREFIXES
    return (lambda name: name), ()


def get_path(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """The leaf of a nested dict at `path` (a Spec's `path`)."""
    for p in path:
        tree = tree[p]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    """Put `value` at `path`, creating the dicts on the way."""
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value
