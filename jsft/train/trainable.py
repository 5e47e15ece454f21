"""Which parameters train: `config.train.trainable` and `config.train.frozen`, regular expressions
searched in each parameter's dotted path (`embed`, `lm_head`, `final_norm.scale`,
`layers.attn.q_proj`, `layers.mlp.down_proj`, ...; `python -m jsft.main --mode inspect` lists them).

A parameter trains when it matches `trainable` (empty: every parameter) and does not match `frozen`
(empty: none). The step differentiates only the trainable parameters (the frozen ones enter the loss
as constants: no gradient, no accumulator), the optimizer holds state only for them, and weight decay
and gradient clipping see only them. Layers are stacked along a leading axis under scan, so a pattern
selects a parameter in every layer at once.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax

Mask = Any  # a pytree of bools shaped like the parameters


def param_path(path: tuple) -> str:
    """('layers', 'attn', 'q_proj') key path -> 'layers.attn.q_proj'."""
    return ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _compile(pattern: str, key: str) -> re.Pattern | None:
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{key}={pattern!r} is not a regular expression: {e}") from e


def trainable_mask(params: Any, trainable: str = "", frozen: str = "") -> Mask | None:
    """The mask (True: trains) for patterns over parameter paths, or None when every parameter trains.
    A pattern that matches no parameter, or patterns that leave nothing to train, are refused."""
    keep, drop = _compile(trainable, "config.train.trainable"), _compile(frozen, "config.train.frozen")
    if keep is None and drop is None:
        return None
    paths = [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    for pattern, key in ((keep, "config.train.trainable"), (drop, "config.train.frozen")):
        if pattern is not None and not any(pattern.search(p) for p in paths):
            raise ValueError(
                f"{key}={pattern.pattern!r} matches no parameter; the parameters are: {', '.join(paths)}"
            )

    def trains(path, _):
        name = param_path(path)
        return (keep is None or bool(keep.search(name))) and not (drop is not None and drop.search(name))

    mask = jax.tree_util.tree_map_with_path(trains, params)
    if not any(jax.tree.leaves(mask)):
        raise ValueError(
            f"config.train.trainable={trainable!r} with config.train.frozen={frozen!r} leaves no "
            "parameter to train"
        )
    return mask


def frozen_layers(spec: str, n_layers: int) -> tuple[bool, ...] | None:
    """`config.train.frozen_layers` (layer numbers and ranges: "0-23", "0,2,5-7") -> per layer True
    when it trains; None when every layer trains."""
    if not spec.strip():
        return None
    frozen = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            lo, _, hi = part.partition("-")
            first, last = int(lo), int(hi or lo)
        except ValueError as e:
            raise ValueError(
                f"config.train.frozen_layers={spec!r}: {part!r} is not a layer number or a range like 0-23"
            ) from e
        if not 0 <= first <= last < n_layers:
            raise ValueError(
                f"config.train.frozen_layers={spec!r}: {part!r} is outside the model's layers "
                f"0-{n_layers - 1}"
            )
        frozen.update(range(first, last + 1))
    if len(frozen) == n_layers:
        raise ValueError(f"config.train.frozen_layers={spec!r} freezes every layer; use config.train.frozen")
    return tuple(i not in frozen for i in range(n_layers))


def split(tree: dict, mask: Mask | None) -> tuple[dict, dict]:
    """(the trainable part, the frozen part) of a nested dict shaped like the parameters; subtrees
    with nothing left are dropped. With no mask everything is trainable."""
    if mask is None:
        return tree, {}
    train, freeze = {}, {}
    for k, v in tree.items():
        if isinstance(v, dict):
            a, b = split(v, mask[k])
            if a:
                train[k] = a
            if b:
                freeze[k] = b
        else:
            (train if mask[k] else freeze)[k] = v
    return train, freeze


def merge(a: dict, b: dict) -> dict:
    """The union of two disjoint nested dicts (inverse of `split`)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if k in out else v
    return out


def count(params: Any, mask: Mask | None) -> tuple[int, int]:
    """(trainable, total) numbers of parameters."""
    sizes = [math.prod(x.shape) for x in jax.tree.leaves(params)]
    if mask is None:
        return sum(sizes), sum(sizes)
    return sum(s for s, m in zip(sizes, jax.tree.leaves(mask), strict=True) if m), sum(sizes)
