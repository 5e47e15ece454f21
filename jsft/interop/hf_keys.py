"""Where each jsft parameter lives in a Hugging Face checkpoint, and how its layout differs.

HF stores projections as [out, in] matrices; jsft keeps [in, out] with heads split out
(q_proj [D, N, H], o_proj [N, H, D]) and layers stacked on a leading axis. `specs()` lists every
parameter with its HF name and the two reshapes (for one layer); import and export both read this one
table, so a family's key map is written once.
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

    @property
    def per_layer(self) -> bool:
        """A stacked [L, ...] parameter, one HF tensor per layer."""
        return "{i}" in self.hf


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
