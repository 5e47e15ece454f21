"""TrainState: everything that changes during training, as one pytree."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any  # nested dict of arrays (see jsft.models.registry)
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so checkpoints hold plain arrays

    @classmethod
    def create(cls, params, tx, rng: jax.Array) -> TrainState:
        return cls(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.key_data(rng))
