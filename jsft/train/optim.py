"""The optax chain: learning-rate schedule, global-norm clipping, AdamW with a decay mask."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import ml_collections
import optax

if TYPE_CHECKING:
    from jsft.models.registry import Params

DECAYS = ("cosine", "linear", "constant")
# Parameters whose path contains one of these are never weight-decayed (norm scales, biases).
NO_DECAY_SUBSTRINGS = ("norm", "bias")


def build_schedule(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then decay to `lr * final_lr_ratio` at `total_steps`."""
    lr, warmup = optim_cfg.lr, optim_cfg.warmup_steps
    end = lr * optim_cfg.final_lr_ratio
    decay_steps = max(total_steps - warmup, 1)
    if optim_cfg.decay == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=optim_cfg.final_lr_ratio)
    elif optim_cfg.decay == "linear":
        decay = optax.linear_schedule(lr, end, decay_steps)
    elif optim_cfg.decay == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(f"config.optim.decay={optim_cfg.decay!r} is not one of {DECAYS}")
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def decay_mask(params: Params) -> Params:
    """True for parameters that get weight decay: everything but norms and biases."""

    def keep(path, _):
        name = jax.tree_util.keystr(path).lower()
        return not any(s in name for s in NO_DECAY_SUBSTRINGS)

    return jax.tree_util.tree_map_with_path(keep, params)


def build_optimizer(
    optim_cfg: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(optim_cfg.clip_norm) if optim_cfg.clip_norm > 0 else optax.identity(),
        optax.adamw(
            schedule,
            b1=optim_cfg.b1,
            b2=optim_cfg.b2,
            eps=optim_cfg.eps,
            weight_decay=optim_cfg.weight_decay,
            mask=decay_mask,
        ),
    )
