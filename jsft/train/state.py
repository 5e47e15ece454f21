"""TrainState: everything that changes during training, as one pytree."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jsft.parallel import sharding
from jsft.train import trainable
from jsft.train.trainable import Mask

if TYPE_CHECKING:
    from jsft.models.registry import ModelDef, Params


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any  # nested dict of arrays (see jsft.models.registry)
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so checkpoints hold plain arrays
    aux: Any = None  # parameter copies an objective keeps (Q-SFT: {"target", "behavior"}), or None

    @classmethod
    def create(
        cls,
        params: Params,
        tx: optax.GradientTransformation,
        rng: jax.Array,
        mask: Mask | None = None,
        copies: tuple[str, ...] = (),
    ) -> TrainState:
        """The optimizer state is float32 whatever the parameters' dtype: with bfloat16 parameters
        the AdamW moments (and the gradients the step feeds them) stay float32. With a trainable
        `mask` (jsft.train.trainable) it covers the trainable parameters only."""
        moments_like = jax.tree.map(
            lambda p: jax.ShapeDtypeStruct(p.shape, jnp.promote_types(p.dtype, jnp.float32)),
            trainable.split(params, mask)[0],
        )
        opt_state = tx.init(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), moments_like))
        aux = {name: jax.tree.map(jnp.copy, params) for name in copies} or None
        return cls(jnp.zeros((), jnp.int32), params, opt_state, jax.random.key_data(rng), aux)


def init_fn(
    model: ModelDef, tx: optax.GradientTransformation, mask: Mask | None = None, copies: tuple[str, ...] = ()
) -> Callable[[jax.Array], TrainState]:
    """rng -> a fresh TrainState; jit it with `out_shardings` to create the state already sharded."""

    def init(rng):
        init_rng, train_rng = jax.random.split(rng)
        return TrainState.create(model.init(init_rng), tx, train_rng, mask, copies)

    return init


def state_shardings(
    model: ModelDef,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    rules: sharding.Rules,
    mask: Mask | None = None,
    copies: tuple[str, ...] = (),
) -> tuple[TrainState, TrainState, list]:
    """(abstract TrainState, TrainState of NamedShardings, dims replicated for divisibility).

    Parameters follow the logical-axis rules, Adam's moments follow their parameters, and the
    step counter and rng are replicated. Nothing is allocated.
    """
    abstract = jax.eval_shape(init_fn(model, tx, mask, copies), jax.random.key(0))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    dropped: list = []
    params = sharding.param_shardings(abstract.params, model.logical_axes(), mesh, rules, dropped)
    shardings = TrainState(
        step=replicated,
        params=params,
        rng=replicated,
        opt_state=sharding.opt_state_shardings(
            tx, abstract.opt_state, trainable.split(params, mask)[0], mesh
        ),
        aux={name: params for name in copies} or None,
    )
    return abstract, shardings, dropped
