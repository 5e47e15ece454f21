"""Config helpers: validation with the offending key named, and the JSON copy kept in the workdir."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Collection

import ml_collections

from jsft.errors import ConfigError

MODES = ("train", "inspect", "plan", "export", "eval", "generate", "report")
# A config file marks the fields a user must set with this value (e.g. `model.hf_path`).
REQUIRED = "<required>"
ON_NONFINITE = ("stop", "skip")
ON_CHANGED_DATA = ("error", "restart")


def _choice(config: ml_collections.ConfigDict, key: str, choices: Collection) -> None:
    value = config
    for part in key.split("."):
        value = value[part]
    if value not in choices:
        raise ConfigError(f"config.{key}={value!r} is not one of {sorted(choices)}")


def _positive(config: ml_collections.ConfigDict, key: str, allow_zero: bool = False) -> None:
    value = config
    for part in key.split("."):
        value = value[part]
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"config.{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def _required(config: ml_collections.ConfigDict, prefix: str = "config") -> list[str]:
    missing = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            missing += _required(value, f"{prefix}.{key}")
        elif isinstance(value, str) and value == REQUIRED:
            missing.append(f"{prefix}.{key}")
    return missing


def _check_best_metric(config: ml_collections.ConfigDict) -> None:
    """The best-checkpoint metric must be one the evaluation produces, or the run dies at its first eval.

    Names: `eval/loss|perplexity|exact_match` (validation split), `eval/<metric>/<source>` per source,
    `eval/<task>/<metric>` for a task in config.eval.tasks.
    """
    metric = config.train.best_metric
    if not metric:
        return
    _choice(config, "train.best_mode", ("max", "min"))
    key = f"config.train.best_metric={metric!r}"
    if not config.train.eval_every_steps:
        return  # no evaluations, so no best checkpoint either
    parts = metric.split("/")
    tasks = config.eval.get("tasks") or {}
    validation = ["loss", "perplexity"] + (["exact_match"] if config.eval.exact_match_examples else [])
    if parts[0] == "eval" and len(parts) == 3 and parts[1] in tasks:
        task = tasks[parts[1]]
        reported = {"choice": ["accuracy"], "loss": ["loss", "perplexity"]}.get(task.kind)
        reported = reported or [m.strip() for m in str(task.get("metrics", "")).split(",") if m.strip()]
        if parts[2] not in reported:
            raise ConfigError(f"{key}: eval task {parts[1]!r} reports {reported}")
        return
    if parts[0] != "eval" or len(parts) not in (2, 3) or parts[1] not in validation:
        choices = [f"eval/{m}" for m in validation] + [f"eval/{t}/..." for t in sorted(tasks)]
        raise ConfigError(f"{key} is not a metric this config reports; choose one of {choices}")
    if len(parts) == 3 and parts[2] not in config.data.sources:
        raise ConfigError(f"{key}: no source {parts[2]!r} in config.data.sources")
    has_validation = any(
        src.get("val_path") or src.get("val_split") or src.get("val_fraction", 0) > 0
        for src in config.data.sources.values()
    )
    if not has_validation:
        raise ConfigError(
            f"{key} needs a validation split, and no source in config.data.sources has val_path, "
            "val_split or val_fraction; add one (e.g. --config.data.sources.<name>.val_fraction=0.01) "
            "or set config.train.best_metric=''"
        )


def validate(config: ml_collections.ConfigDict, mode: str = "train") -> None:
    """Fail before any work starts on values that would fail (or silently misbehave) later.

    The checks run in this order, and the first failure raises: required fields, choices, the
    sources, numeric ranges, then (outside `--mode plan`, which needs shapes only) the best-checkpoint
    metric and the eval task files, and last the sizes that must agree across sections.
    """
    _check_required(config, mode)
    _check_choices(config)
    _check_sources(config)
    _check_numbers(config)
    if mode != "plan":
        _check_best_metric(config)
        _check_task_files(config)
    _check_sizes(config)


def _check_required(config: ml_collections.ConfigDict, mode: str) -> None:
    missing = _required(config)
    if missing and mode != "plan":  # a plan needs shapes only
        raise ConfigError(
            f"{', '.join(missing)} must be set for this config (pass --{missing[0][len('config.') :]}"
            "=... on the command line, or edit the config file)".replace("--", "--config.", 1)
        )


def _check_choices(config: ml_collections.ConfigDict) -> None:
    """Every named choice against its list. The lists live with the code that implements them; they
    are imported here, when a config is validated, so that `import jsft.config` (configs do it) stays
    free of JAX and datasets."""
    from jsft.data import examples, mixture, packing, pipeline, templates  # noqa: PLC0415
    from jsft.models.llama import REMAT_POLICIES  # noqa: PLC0415
    from jsft.train.losses import IMPLEMENTATIONS, NORMALIZATIONS  # noqa: PLC0415
    from jsft.train.optim import DECAYS  # noqa: PLC0415

    _choice(config, "loss.normalization", NORMALIZATIONS)
    _choice(config, "loss.implementation", IMPLEMENTATIONS)
    _choice(config, "optim.decay", DECAYS)
    _choice(config, "model.remat", REMAT_POLICIES)
    _choice(config, "data.template", [*templates.BUILTIN, "hf"])
    _choice(config, "data.train_on", templates.TRAIN_ON)
    _choice(config, "data.packing", packing.PACKING_MODES)
    _choice(config, "data.overlong", packing.OVERLONG_POLICIES)
    _choice(config, "data.on_bad_record", examples.ON_BAD_RECORD)
    _choice(config, "data.mixture", mixture.RULES)
    _choice(config, "data.engine", pipeline.ENGINES)
    _choice(config, "train.on_nonfinite", ON_NONFINITE)
    _choice(config, "data.on_changed_data", ON_CHANGED_DATA)
    _check_peft(config)
    _check_objective(config)
    _check_wandb(config)


def _check_wandb(config: ml_collections.ConfigDict) -> None:
    from jsft.train.writer import WANDB_MODES  # noqa: PLC0415

    if "logging" not in config or "wandb" not in config.logging:
        return
    _choice(config, "logging.wandb.mode", WANDB_MODES)
    if config.logging.wandb.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            f"config.logging.wandb.mode={config.logging.wandb.mode!r} needs the wandb package: "
            "pip install 'jsft[wandb]' (or set config.logging.wandb.mode='disabled')"
        )


def _check_objective(config: ml_collections.ConfigDict) -> None:
    from jsft.train.objectives import Objective  # noqa: PLC0415

    try:
        Objective.from_config(config.loss)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if config.loss.get("objective") == "qsft" and config.get("peft") and config.peft.method != "none":
        raise ConfigError(
            f"config.loss.objective='qsft' with config.peft.method={config.peft.method!r}: Q-SFT keeps whole "
            "copies of the parameters (target and behaviour), not yet of a LoRA model's adapters; use "
            "full fine-tuning"
        )
    if config.loss.get("neftune_alpha", 0.0) < 0:
        raise ConfigError(f"config.loss.neftune_alpha={config.loss.neftune_alpha} must be >= 0")


def _check_peft(config: ml_collections.ConfigDict) -> None:
    """The PEFT method, quantization format, targets and numbers; a rank larger than a target's
    dimension needs the model's shapes and is checked when the model is built (jsft.run)."""
    from jsft.models import lora, quant  # noqa: PLC0415

    peft = config.get("peft")
    if peft is None:
        return
    _choice(config, "peft.method", lora.METHODS)
    if peft.method == "none":
        return
    if peft.method == "qlora" and peft.quant not in quant.FORMATS:
        raise ConfigError(
            f"config.peft.quant={peft.quant!r} is not a QLoRA storage format; "
            f"choose one of {list(quant.FORMATS)}"
        )
    _positive(config, "peft.rank")
    _positive(config, "peft.alpha")
    _positive(config, "peft.quant_block")
    if not 0.0 <= peft.dropout < 1.0:
        raise ConfigError(f"config.peft.dropout={peft.dropout} must be in [0, 1)")
    try:
        lora.parse_targets(peft.targets)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if config.train.trainable or config.train.frozen:
        raise ConfigError(
            f"config.peft.method={peft.method!r} trains the adapters only; config.train.trainable / "
            "config.train.frozen select parameters for full fine-tuning (peft.method='none'): unset them"
        )
    if peft.adapter and not os.path.isfile(os.path.join(peft.adapter, "adapter_config.json")):
        raise ConfigError(f"config.peft.adapter={peft.adapter!r}: no adapter_config.json there")


def _check_sources(config: ml_collections.ConfigDict) -> None:
    from jsft.data import raw  # noqa: PLC0415

    try:
        raw.source_specs(config.data)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _check_numbers(config: ml_collections.ConfigDict) -> None:
    """Counts and rates in range, and a batch that splits into whole micro-batches."""
    for key in (
        "data.seq_len",
        "loss.chunk_len",
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
        "data.shard_bytes",
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
        "train.max_skipped_steps",
        "data.workers",
        "data.shuffle_window",
    ):
        _positive(config, key, allow_zero=True)
    if config.data.batch_size % config.optim.grad_accum_steps:
        raise ConfigError(
            f"config.data.batch_size={config.data.batch_size} must be a multiple of "
            f"config.optim.grad_accum_steps={config.optim.grad_accum_steps}"
        )
    if not 0.0 <= config.optim.final_lr_ratio <= 1.0:
        raise ConfigError(f"config.optim.final_lr_ratio={config.optim.final_lr_ratio} must be in [0, 1]")


def _check_task_files(config: ml_collections.ConfigDict) -> None:
    for name, task in (config.eval.get("tasks") or {}).items():
        if not os.path.exists(task.path):
            raise ConfigError(f"config.eval.tasks.{name}.path={task.path!r}: no such file")


def _check_sizes(config: ml_collections.ConfigDict) -> None:
    """Sizes that must agree across sections: the model's vocabulary, generation and the sequence."""
    if (
        config.model.vocab_size
        and config.model.vocab_size < config.data.vocab_size
        and not (config.data.tokenizer or config.model.hf_path)
    ):
        raise ConfigError(
            f"config.model.vocab_size={config.model.vocab_size} is smaller than the tokenizer it trains "
            f"(config.data.vocab_size={config.data.vocab_size}); set it to 0 to follow the tokenizer"
        )
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
