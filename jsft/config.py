"""Config helpers: validation with the offending key named, and the JSON copy kept in the workdir."""

from __future__ import annotations

import json
import os

import ml_collections

from jsft.data import mixture, packing, pipeline, templates
from jsft.models.llama import REMAT_POLICIES
from jsft.train.losses import NORMALIZATIONS
from jsft.train.optim import DECAYS

MODES = ("train", "inspect", "plan", "export", "eval", "generate")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def _choice(config, key: str, choices) -> None:
    value = config
    for part in key.split("."):
        value = value[part]
    if value not in choices:
        raise ConfigError(f"config.{key}={value!r} is not one of {sorted(choices)}")


def _positive(config, key: str, allow_zero: bool = False) -> None:
    value = config
    for part in key.split("."):
        value = value[part]
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"config.{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Fail before any work starts on values that would fail (or silently misbehave) later."""
    _choice(config, "loss.normalization", NORMALIZATIONS)
    _choice(config, "optim.decay", DECAYS)
    _choice(config, "model.remat", REMAT_POLICIES)
    _choice(config, "data.template", [*templates.BUILTIN, "hf"])
    _choice(config, "data.train_on", templates.TRAIN_ON)
    _choice(config, "data.packing", packing.PACKING_MODES)
    _choice(config, "data.overlong", packing.OVERLONG_POLICIES)
    _choice(config, "data.on_bad_record", pipeline.ON_BAD_RECORD)
    _choice(config, "data.mixture", mixture.RULES)
    try:
        pipeline.source_specs(config.data)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    for key in (
        "data.seq_len",
        "data.batch_size",
        "train.steps",
        "optim.lr",
        "optim.grad_accum_steps",
        "train.log_every_steps",
        "train.checkpoint_every_steps",
        "train.keep_checkpoints",
        "eval.batch_size",
        "eval.max_new_tokens",
        "data.pack_chunk_examples",
    ):
        _positive(config, key)
    for key in (
        "optim.warmup_steps",
        "train.eval_every_steps",
        "train.stop_after_steps",
        "data.prefetch",
        "data.num_proc",
        "data.num_shards",
        "eval.exact_match_examples",
        "optim.weight_decay",
        "optim.clip_norm",
    ):
        _positive(config, key, allow_zero=True)
    if config.data.batch_size % config.optim.grad_accum_steps:
        raise ConfigError(
            f"config.data.batch_size={config.data.batch_size} must be a multiple of "
            f"config.optim.grad_accum_steps={config.optim.grad_accum_steps}"
        )
    if not 0.0 <= config.optim.final_lr_ratio <= 1.0:
        raise ConfigError(f"config.optim.final_lr_ratio={config.optim.final_lr_ratio} must be in [0, 1]")
    if config.eval.max_new_tokens >= config.data.seq_len:
        raise ConfigError(
            f"config.eval.max_new_tokens={config.eval.max_new_tokens} must be below "
            f"config.data.seq_len={config.data.seq_len}"
        )


def save_json(config: ml_collections.ConfigDict, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True)
    os.replace(tmp, path)
