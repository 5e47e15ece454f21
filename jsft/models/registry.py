"""The bridge between an NNX module and the pure-functional train step.

`ModelDef` splits the module once: its graph definition stays static, and the parameters travel as a
plain nested dict of arrays (the pytree the optimizer, the checkpointer and the HF key maps see).
`apply(params, ...)` merges them back inside traced code, which costs tracing time only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
from flax import nnx

from jsft.models import lora
from jsft.models.llama import Llama, LlamaConfig

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ModelDef:
    config: LlamaConfig
    graphdef: Any
    treedef: Any  # of the nnx.State, whose leaves come in the same order as the pure dict's
    # abstract_params() traced once: every mode, mask and layout asks for it (a LoRA run at each save)
    _abstract: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def create(cls, config: LlamaConfig) -> ModelDef:
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(config, nnx.Rngs(0))))
        return cls(config, graphdef, jax.tree.structure(state))

    def init(self, rng: jax.Array) -> Params:
        """Fresh parameters as a pure dict; jit it (with out_shardings) to create them in place. With
        LoRA/QLoRA: the base model's fresh parameters (same `rng`), quantized, with fresh adapters."""
        if self.config.is_peft:
            return self.attach(self.base().init(rng), jax.random.fold_in(rng, 1))
        _, state = nnx.split(Llama(self.config, nnx.Rngs(params=rng)))
        return nnx.to_pure_dict(state)

    def base(self) -> ModelDef:
        """The model without adapters or quantization (itself when it has neither)."""
        return ModelDef.create(self.config.base()) if self.config.is_peft else self

    def attach(self, base_params: Params, rng: jax.Array) -> Params:
        """The base model's parameters -> this model's (quantized; adapters A random, B zero)."""
        return lora.attach(base_params, rng, self.config)

    def abstract_params(self) -> Params:
        """Shapes and dtypes of the parameters (traced once per ModelDef; a fresh dict each call)."""
        if "params" not in self._abstract:
            self._abstract["params"] = jax.eval_shape(self.init, jax.random.key(0))
        return jax.tree.map(lambda x: x, self._abstract["params"])

    def logical_axes(self) -> Params:
        """The pytree of logical axis-name tuples, one per parameter (same structure as params)."""
        _, state = nnx.split(nnx.eval_shape(lambda: Llama(self.config, nnx.Rngs(0))))
        specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
        return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))

    def module(self, params: Params) -> Llama:
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, jax.tree.leaves(params)))

    def apply(
        self,
        params: Params,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        return self.module(params)(tokens, positions, segment_ids, rng)

    def features(
        self,
        params: Params,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        rng: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """(final hidden states [B, T, D], output projection [D, V]): logits without forming them.
        `rng` (training) drives dropout."""
        module = self.module(params)
        return module.features(tokens, positions, segment_ids, rng), module.head()

    def features_and_router(
        self,
        params: Params,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        rng: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """`features` and the router losses of a Mixture-of-Experts model over its real tokens
        (jsft.models.moe.router_losses: aux, z, load; {} for a dense model)."""
        module = self.module(params)
        x, router = module.features_and_router(tokens, positions, segment_ids, rng)
        return x, module.head(), router


def build_model(model_cfg: ml_collections.ConfigDict, vocab_size: int) -> ModelDef:
    """From the `config.model` section; `vocab_size: 0` there means "the tokenizer's size".

    A model whose architecture comes from a Hugging Face checkpoint (`hf_path`) is built by the run
    (`jsft.run.Run.model`), which reads that checkpoint's config.json: models never read files.
    """
    fields = model_cfg.to_dict()
    name, hf_path = fields.pop("name"), fields.pop("hf_path", "")
    fields.pop("export_family", None)
    if hf_path:
        raise ValueError(f"config.model.hf_path={hf_path!r}: build the model with jsft.run.Run.model")
    if name != "llama":
        raise ValueError(f"config.model.name={name!r}: the only model family so far is 'llama'")
    fields["vocab_size"] = fields["vocab_size"] or vocab_size
    if fields["vocab_size"] < vocab_size:
        raise ValueError(
            f"config.model.vocab_size={fields['vocab_size']} is smaller than the tokenizer's "
            f"vocabulary ({vocab_size}); set it to 0 to follow the tokenizer"
        )
    return ModelDef.create(LlamaConfig(**fields))
