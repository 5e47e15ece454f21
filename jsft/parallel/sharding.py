"""Logical axis names -> mesh axes -> NamedShardings, for parameters, optimizer state and batches.

Parameters carry logical names (`embed`, `mlp`, `heads`, ...; see jsft.models.llama.LOGICAL_AXES).
A rules table (config.mesh.rules) maps each name to zero, one or several mesh axes. A dimension whose
size is not divisible by its mesh axes is replicated instead (and reported), so every model runs on
every mesh; the memory planner shows what that costs.

Activations are constrained at block boundaries through `constrain`, which is a no-op unless the loop
has activated rules with `use_rules` (layers never see the config).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

Rules = Mapping[str, tuple[str, ...]]

_ACTIVE: contextvars.ContextVar[tuple[jax.sharding.Mesh, Rules] | None] = contextvars.ContextVar(
    "jsft_sharding_rules", default=None
)


def parse_rules(table: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    """{'batch': 'data,fsdp', 'embed': 'fsdp', 'head_dim': ''} -> {'batch': ('data', 'fsdp'), ...}."""
    return {name: tuple(a.strip() for a in axes.split(",") if a.strip()) for name, axes in table.items()}


def spec_for(
    shape: Sequence[int],
    names: Sequence[str | None],
    mesh: jax.sharding.Mesh,
    rules: Rules,
    dropped: list | None = None,
) -> PartitionSpec:
    """The PartitionSpec for one array; mesh axes are used at most once per array."""
    used: set[str] = set()
    out = []
    for dim, name in zip(shape, names, strict=True):
        axes = tuple(a for a in rules.get(name, ()) if a in mesh.shape and a not in used) if name else ()
        axes = tuple(a for a in axes if mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in axes)
        if axes and dim % size:
            if dropped is not None:
                dropped.append((name, dim, axes))
            axes = ()
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*out)


def param_shardings(
    abstract_params: Mapping[str, Any],
    logical_axes: Mapping[str, Any],
    mesh: jax.sharding.Mesh,
    rules: Rules,
    dropped: list | None = None,
) -> dict[str, Any]:
    """NamedShardings for a params pytree from its logical-axes pytree."""
    return jax.tree.map(
        lambda p, names: NamedSharding(mesh, spec_for(p.shape, names, mesh, rules, dropped)),
        abstract_params,
        logical_axes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def opt_state_shardings(
    tx: optax.GradientTransformation,
    abstract_opt_state: optax.OptState,
    params_shardings: Mapping[str, Any],
    mesh: jax.sharding.Mesh,
) -> Any:
    """Optimizer state mirrors the parameters (Adam's moments); everything else is replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract_opt_state,
        params_shardings,
        transform_non_params=lambda _: replicated,
    )
    return shardings


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules) -> NamedSharding:
    """Rows of a [batch, seq] array split over the mesh axes the `batch` rule names."""
    axes = tuple(a for a in rules.get("batch", ()) if a in mesh.shape)
    return NamedSharding(mesh, PartitionSpec(axes or None))


def batch_divisor(mesh: jax.sharding.Mesh, rules: Rules) -> int:
    return math.prod(mesh.shape[a] for a in rules.get("batch", ()) if a in mesh.shape)


@contextlib.contextmanager
def use_rules(mesh: jax.sharding.Mesh, rules: Rules) -> Iterator[None]:
    """Activate activation constraints (`constrain`) for code traced inside this block."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> tuple[jax.sharding.Mesh, Rules] | None:
    """The (mesh, rules) of the enclosing `use_rules` block, or None outside one."""
    return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names when rules are active; otherwise `x` unchanged."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(x.shape, names, mesh, rules)))
