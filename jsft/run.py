"""One run: a config and a workdir turned into what every mode shares.

    run = Run.create(config, workdir)       # the workdir (local, or remote with a local mirror), mesh
    data = run.data()                       # tokenizer, sources, train stream, eval examples
    model = run.model(data.tokenizer.vocab_size)
    params, label, step = run.restore_params(model, "latest")   # parameters only: no Adam moments

train, eval, generate, export, inspect, plan and bench are short functions over these pieces. The
run is also where weights come from: fresh, from a Hugging Face checkpoint (`model.hf_path`), or from
a checkpoint of the workdir; the model registry only builds modules. With LoRA/QLoRA that includes
the base (loaded, quantized while loading, identified by a content hash) under its adapters, which is
why this one object runs a little over 400 lines: every mode needs the same answer to "which weights".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax
from etils import epath

from jsft.data.pipeline import Data, build_data
from jsft.data.tokenizer import Tokenizer
from jsft.data.tokenizer_choice import build_tokenizer
from jsft.errors import ConfigError
from jsft.interop import hf
from jsft.interop import peft as peft_io
from jsft.models import attention, lora
from jsft.models.registry import ModelDef, Params, build_model
from jsft.parallel import sharding
from jsft.parallel.mesh import build_mesh
from jsft.parallel.placement import BatchPlacement
from jsft.train import checkpoint, trainable
from jsft.train.checkpoint import Checkpointer, checksums
from jsft.train.objectives import Objective
from jsft.train.optim import build_optimizer, build_schedule
from jsft.train.state import TrainState, init_fn, state_shardings
from jsft.train.step import make_train_step
from jsft.train.trainable import Mask


def local_root() -> str:
    """Where this host keeps what a remote workdir does not hold: $JSFT_LOCAL_DIR, default /tmp/jsft."""
    return os.environ.get("JSFT_LOCAL_DIR", "/tmp/jsft")


def local_mirror(remote: str, root: str = "") -> str:
    """Where logs and caches of a remote (gs://...) workdir live on this host: under `root`, default
    local_root() (a sweep puts each trial's inside its trial directory)."""
    name = remote.split("://", 1)[1].strip("/").replace("/", "_")
    return os.path.join(root or local_root(), name)


def _with_shardings(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


@dataclasses.dataclass
class Run:
    config: ml_collections.ConfigDict
    workdir: str  # local: config copy, metrics, caches, tokenizer (a mirror when `remote` is a bucket)
    remote: str  # where checkpoints live (the workdir itself when it is local)
    mesh: jax.sharding.Mesh
    rules: sharding.Rules

    # ------------------------------------------------------------------ set up
    @classmethod
    def create(cls, config: ml_collections.ConfigDict, workdir: str = "") -> Run:
        """Resolve the workdir and build the mesh; a bad mesh is a ConfigError before any data is read.
        `workdir=""` (plan, bench) keeps nothing on disk."""
        if "://" in workdir:
            remote, local = workdir.rstrip("/"), local_mirror(workdir)
        else:
            remote = local = os.path.abspath(workdir) if workdir else ""  # orbax needs absolute paths
        if local:
            os.makedirs(local, exist_ok=True)
        try:
            mesh = build_mesh(config.mesh.shape, config.mesh.dcn_shape, expert=config.mesh.get("expert", 1))
            rules = sharding.parse_rules(config.mesh.rules.to_dict())
        except ValueError as e:
            raise ConfigError(str(e)) from e
        return cls(config, local, remote, mesh, rules)

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    @property
    def replicated(self) -> jax.sharding.NamedSharding:
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    @property
    def batch_sharding(self) -> jax.sharding.NamedSharding:
        return sharding.batch_sharding(self.mesh, self.rules)

    @property
    def batch_divisor(self) -> int:
        """How many ways the batch axes split a batch: batch sizes must be multiples of it."""
        return sharding.batch_divisor(self.mesh, self.rules)

    @property
    def placement(self) -> BatchPlacement:
        """Whole host batches (evaluation) onto the mesh: each device takes its rows."""
        return BatchPlacement(self.batch_sharding, self.replicated, self.batch_divisor)

    def check_train_batch(self) -> None:
        cfg = self.config
        if (cfg.data.batch_size // cfg.optim.grad_accum_steps) % self.batch_divisor:
            raise ConfigError(
                f"config.data.batch_size={cfg.data.batch_size} / config.optim.grad_accum_steps="
                f"{cfg.optim.grad_accum_steps} must be a multiple of {self.batch_divisor}, the mesh axes "
                f"the batch is split over ({dict(self.mesh.shape)}, config.mesh.rules.batch)"
            )

    # ------------------------------------------------------------------ data and tokenizer
    def data(
        self, eval_prompt_limit: int | None = None, data_cfg: ml_collections.ConfigDict | None = None
    ) -> Data:
        """The configured data for this process (tokenized, cached in the workdir); Q-SFT reads the
        records' rewards too."""
        limit = self.config.eval.exact_match_examples if eval_prompt_limit is None else eval_prompt_limit
        if self.config.loss.get("objective") == "qsft":
            data_cfg = ml_collections.ConfigDict((data_cfg or self.config.data).to_dict())
            data_cfg.rewards = True
        return build_data(
            data_cfg or self.config.data,
            self.config.seed,
            self.workdir,
            jax.process_index(),
            jax.process_count(),
            eval_prompt_limit=limit,
            hf_path=self.config.model.hf_path,
        )

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the run trained on, without reading any data (export, generate)."""

        def no_texts():
            raise FileNotFoundError(
                f"no tokenizer: {self.workdir}/tokenizer.model is missing and the config names none "
                "(config.data.tokenizer, config.model.hf_path)"
            )

        cfg = self.config
        return build_tokenizer(cfg.data, self.workdir, cfg.data.template, no_texts, cfg.model.hf_path)

    # ------------------------------------------------------------------ model and optimizer
    def model(self, vocab_size: int) -> ModelDef:
        """The configured model; with `model.hf_path`, the checkpoint's architecture (the config's
        shape fields are ignored; its dtypes, remat policy and attention kernel apply). A kernel the
        model or the platform cannot use is refused here, not at the first step."""
        cfg = self.config.model
        numerics = ("param_dtype", "compute_dtype", "remat", "attention", "attention_chunk")
        # Training choices a config may set over a checkpoint's (the MoE ones: jsft/models/moe.py)
        optional = (
            "dropout_embed",
            "dropout_residual",
            "router_aux_loss_coef",
            "router_z_loss_coef",
            "capacity_factor",
        )
        numerics += tuple(k for k in optional if k in cfg)
        try:
            if cfg.hf_path:
                arch = hf.config_from_hf(hf.read_config(cfg.hf_path), **{k: cfg[k] for k in numerics})
                if arch.vocab_size < vocab_size:
                    raise ValueError(
                        f"config.model.hf_path={cfg.hf_path}: the model's vocabulary ({arch.vocab_size}) "
                        f"is smaller than the tokenizer's ({vocab_size})"
                    )
                model = ModelDef.create(arch)
            else:
                model = build_model(cfg, vocab_size)
            arch = model.config
            attention.resolve(  # off its platform a Pallas kernel would run interpreted: refused
                arch.attention,
                arch.attn_softcap,
                per_layer_windows=bool(arch.layer_windows),
                dtype=arch.compute_dtype,
                head_dim=arch.head_dim,
                interpret_ok=False,
            )
            neftune = float(self.config.loss.get("neftune_alpha", 0.0))
            if neftune:
                model = ModelDef.create(dataclasses.replace(arch, neftune_alpha=neftune))
                arch = model.config
            fields = self.peft_fields()
            if fields:
                shapes = model.abstract_params()["layers"]
                lora.check_rank(
                    fields["lora_rank"],
                    {p: shapes[p.split(".")[0]][p.split(".")[1]].shape[1:] for p in fields["lora_targets"]},
                )
                model = ModelDef.create(dataclasses.replace(arch, **fields))
        except ValueError as e:  # an unknown family, a vocabulary smaller than the tokenizer's, a kernel
            raise ConfigError(str(e)) from e
        return model

    def peft_settings(self) -> dict[str, Any]:
        """config.peft with a PEFT adapter directory's own r, alpha, rsLoRA and targets applied."""
        peft = self.config.get("peft")
        if peft is None or peft.method == "none":
            return {}
        out = {k: peft[k] for k in ("rank", "alpha", "rslora", "dropout")}
        out["targets"] = lora.parse_targets(peft.targets)
        if peft.adapter:
            out.update(peft_io.read_adapter_config(peft.adapter))
            out["dropout"] = peft.dropout  # training's choice, not the saved adapter's
        return out

    def peft_fields(self) -> dict[str, Any]:
        """The LlamaConfig fields of config.peft ({} for full fine-tuning)."""
        s = self.peft_settings()
        if not s:
            return {}
        peft = self.config.peft
        quantized = peft.method == "qlora"
        return dict(
            lora_rank=s["rank"],
            lora_targets=s["targets"],
            lora_scale=lora.scaling(s["rank"], s["alpha"], s["rslora"]),
            lora_dropout=s["dropout"],
            quant=peft.quant if quantized else "none",
            quant_block=peft.quant_block,
        )

    def optimizer(self) -> tuple[optax.GradientTransformation, optax.Schedule]:
        schedule = build_schedule(self.config.optim, self.config.train.steps)
        return build_optimizer(self.config.optim, schedule), schedule

    def train_step(
        self,
        model: ModelDef,
        tx: optax.GradientTransformation,
        schedule: optax.Schedule,
        num_sources: int = 0,
    ) -> Callable:
        """The configured (un-jitted) train step: accumulation, loss normalisation and implementation."""
        cfg = self.config
        return make_train_step(
            model,
            tx,
            schedule,
            cfg.optim.grad_accum_steps,
            cfg.loss.normalization,
            num_sources,
            cfg.loss.implementation,
            cfg.loss.chunk_len,
            self.trainable_mask(model),
            self.layers_train(model),
            self.objective(),
        )

    def objective(self) -> Objective:
        """The training objective of config.loss (plain cross-entropy by default)."""
        try:
            return Objective.from_config(self.config.loss)
        except ValueError as e:
            raise ConfigError(str(e)) from e

    def layers_train(self, model: ModelDef) -> tuple[bool, ...] | None:
        """Per layer, whether it trains (`config.train.frozen_layers`); None: every layer."""
        try:
            return trainable.frozen_layers(self.config.train.get("frozen_layers", ""), model.config.n_layers)
        except ValueError as e:
            raise ConfigError(str(e)) from e

    def trainable_mask(self, model: ModelDef) -> Mask | None:
        """Which parameters train (`config.train.trainable` / `frozen`); None: all of them."""
        train_cfg = self.config.train
        if model.config.is_peft:  # the adapters train, the base is frozen (config.validate)
            return lora.adapter_mask(model.abstract_params())
        try:
            return trainable.trainable_mask(model.abstract_params(), train_cfg.trainable, train_cfg.frozen)
        except ValueError as e:
            raise ConfigError(str(e)) from e

    def state_layout(
        self, model: ModelDef, tx: optax.GradientTransformation
    ) -> tuple[TrainState, TrainState, list]:
        """(abstract TrainState with shardings, TrainState of shardings, dims replicated for
        divisibility): nothing is allocated."""
        abstract, shardings, dropped = state_shardings(
            model, tx, self.mesh, self.rules, self.trainable_mask(model), self.objective().state_copies
        )
        return _with_shardings(abstract, shardings), shardings, dropped

    def params_layout(self, model: ModelDef) -> tuple[Params, dict[str, Any]]:
        """(abstract params with shardings, params' shardings): what a parameters-only restore reads."""
        abstract = model.abstract_params()
        shardings = sharding.param_shardings(abstract, model.logical_axes(), self.mesh, self.rules, [])
        return _with_shardings(abstract, shardings), shardings

    # ------------------------------------------------------------------ weights
    def initial_state(
        self,
        model: ModelDef,
        tx: optax.GradientTransformation,
        state_sharding: TrainState,
        params: Params | None = None,
    ) -> TrainState:
        """Fresh weights, or the Hugging Face checkpoint's, created or streamed straight into their
        shardings (no full copy of the model on any one device); or `params` as given (LoRA: the base
        with its adapters, `peft_params`)."""
        key = jax.random.key(self.config.seed)
        mask = self.trainable_mask(model)
        self.layers_train(model)  # a bad layer range is refused before anything is built
        if params is None and model.config.is_peft:
            params = self.peft_params(model, self.base_params(model)[0], state_sharding.params)
        copies = self.objective().state_copies
        if params is None and not self.config.model.hf_path:
            return jax.jit(init_fn(model, tx, mask, copies), out_shardings=state_sharding)(key)
        if params is None:
            params = hf.load_params(self.config.model.hf_path, model.config, state_sharding.params)
        _, train_rng = jax.random.split(key)
        create = jax.jit(
            lambda p, rng: TrainState.create(p, tx, rng, mask, copies),
            out_shardings=state_sharding,
            donate_argnums=0,
        )
        return create(params, train_rng)

    # ------------------------------------------------------------------ LoRA / QLoRA bases
    def base_params(self, model: ModelDef) -> tuple[Params, dict[str, str]]:
        """(the base model's float parameters in their shardings, its identity {source, hash}): the
        weights of model.hf_path, or fresh ones from config.seed (what `model.init` starts from). The
        hash covers every array's contents (checksums computed on the devices), not file names."""
        base = model.base()
        _, shardings = self.params_layout(base)
        init_rng, _ = jax.random.split(jax.random.key(self.config.seed))
        path = self.config.model.hf_path
        if path:  # QLoRA: each projection is quantized as soon as it is loaded
            sums: dict[str, list[int]] = {}
            on_leaf = self._quantizing_loader(model, sums)
            params = hf.load_params(path, base.config, shardings, on_leaf=on_leaf)
            source = os.path.abspath(path)
        else:
            params = jax.jit(base.init, out_shardings=shardings)(init_rng)
            sums, source = checksums(params), f"fresh weights (seed {self.config.seed})"
        digest = hashlib.sha256(json.dumps(sums, sort_keys=True).encode()).hexdigest()
        return params, {"source": source, "hash": digest}

    def _quantizing_loader(self, model: ModelDef, sums: dict) -> Callable:
        """on_leaf for hf.load_params: records each float parameter's checksum (the base's identity)
        and, with QLoRA, returns a projection's codes and scales in their shardings instead of it."""
        _, shardings = self.params_layout(model)

        def on_leaf(path: tuple, value: jax.Array) -> dict[str, jax.Array]:
            key = jax.tree_util.keystr(tuple(jax.tree_util.DictKey(k) for k in path))
            sums[key] = checksums({"leaf": value})["['leaf']"]  # as checksums() of the whole tree
            if model.config.quant == "none" or not lora.is_projection(path):
                return {path[-1]: value}
            parent = shardings[path[0]][path[1]]
            out = (parent[path[2]], parent[path[2] + "_scale"])
            quantize = jax.jit(
                lambda w: lora.quantize_stacked(w, model.config), out_shardings=out, donate_argnums=0
            )
            with warnings.catch_warnings():  # the float buffer cannot hold the codes; it is freed
                warnings.filterwarnings("ignore", "Some donated buffers were not usable")
                codes, scale = quantize(value)
            return {path[2]: codes, path[2] + "_scale": scale}

        return on_leaf

    def peft_params(self, model: ModelDef, base: Params, shardings: Params) -> Params:
        """The base's parameters -> this model's: projections quantized (QLoRA), adapters fresh (A
        random, B zero) or those of config.peft.adapter. `base` is consumed (donated)."""
        init_rng, _ = jax.random.split(jax.random.key(self.config.seed))
        attach = jax.jit(model.attach, out_shardings=shardings, donate_argnums=0)
        with warnings.catch_warnings():  # quantized projections cannot reuse the float buffers
            warnings.filterwarnings("ignore", "Some donated buffers were not usable")
            params = attach(base, jax.random.fold_in(init_rng, 1))
        if self.config.peft.adapter:
            try:
                params = peft_io.load_adapter(self.config.peft.adapter, params, model.config, shardings)
            except ValueError as e:
                raise ConfigError(str(e)) from e
        return params

    def saved_view(self, state: TrainState, model: ModelDef) -> TrainState:
        """What a checkpoint holds of `state` (abstract or concrete): everything, or with LoRA/QLoRA
        the adapters and their optimizer state only (the base is re-read from its source)."""
        if not model.config.is_peft:
            return state
        return state.replace(params=trainable.split(state.params, self.trainable_mask(model))[0])

    @staticmethod
    def check_base(saved: dict | None, current: dict, where: str) -> None:
        """Refuse adapters trained on another base (a different content hash)."""
        if saved and saved.get("hash") != current["hash"]:
            raise ConfigError(
                f"{where} holds LoRA adapters trained on the base {saved.get('source')} (content hash "
                f"{str(saved.get('hash'))[:12]}), but this run's base is {current['source']} (hash "
                f"{current['hash'][:12]}); set config.model.hf_path to the base the adapters were trained "
                "on, or start a new --workdir"
            )

    def checkpointer(self, name: str = "checkpoints", keep: int | None = None) -> Checkpointer:
        keep = self.config.train.keep_checkpoints if keep is None else keep
        return Checkpointer(f"{self.remote}/{name}", keep)

    def restore_params(self, model: ModelDef, which: str = "latest") -> tuple[dict, str, int]:
        """(params, label, step) of `which`: `latest`, `best`, a step of the workdir's checkpoints, or
        `hf` (the weights of model.hf_path as they are, step 0). Only the parameters are read: the
        optimizer state (twice the parameters' bytes with AdamW) stays on disk."""
        target, shardings = self.params_layout(model)
        if which == "hf" and model.config.is_peft:
            return self.peft_params(model, self.base_params(model)[0], shardings), "hf", 0
        if which == "hf":
            if not self.config.model.hf_path:
                raise ConfigError(
                    "--checkpoint=hf evaluates the weights of config.model.hf_path, which is not set; set it "
                    "or name a checkpoint of the workdir (--checkpoint=latest, best or a step)"
                )
            return hf.load_params(self.config.model.hf_path, model.config, shardings), "hf", 0
        if which not in ("latest", "best") and not which.isdigit():
            raise ConfigError(f"--checkpoint={which!r}: expected latest, best, hf or a step number")
        name, step = self._best_checkpoint() if which == "best" else ("checkpoints", None)
        ckpt = self.checkpointer(name, keep=1000)
        try:
            if step is None:
                step = ckpt.latest_step() if which in ("latest", "best") else int(which)
            if step is None or step not in ckpt.all_steps():
                raise FileNotFoundError(
                    f"no checkpoint {which!r} in {ckpt.directory} (steps: {ckpt.all_steps()})"
                )
            if model.config.is_peft:
                params = self._restore_adapters(model, ckpt, step, target, shardings)
            else:
                params = ckpt.restore_params(step, target)
        finally:
            ckpt.close()
        return params, f"{which}_step_{step}", step

    def _best_checkpoint(self) -> tuple[str, int | None]:
        """(directory name, step) of the best checkpoint: the step the latest checkpoint's record names,
        kept in checkpoints/; or, for a workdir written before that, checkpoints_best/'s latest."""
        ckpt = self.checkpointer("checkpoints", keep=1000)
        try:
            step = checkpoint.best_step(ckpt)
            kept = step is not None and step in ckpt.all_steps()
        finally:
            ckpt.close()
        legacy = epath.Path(f"{self.remote}/checkpoints_best")
        if not kept and legacy.exists():
            return "checkpoints_best", None
        if step is None:
            raise FileNotFoundError(
                f"no best checkpoint in {self.remote}/checkpoints (config.train.best_metric was not set, "
                "or no evaluation has run yet)"
            )
        return "checkpoints", step

    def _restore_adapters(self, model: ModelDef, ckpt: Checkpointer, step: int, target, shardings) -> Params:
        """A LoRA checkpoint's adapters over this run's base (refused if the base differs)."""
        base, identity = self.base_params(model)
        self.check_base(ckpt.read_meta(step).get("base"), identity, f"checkpoint {ckpt.directory}/{step}")
        params = self.peft_params(model, base, shardings)
        mask = self.trainable_mask(model)
        adapters = ckpt.restore_params(step, trainable.split(target, mask)[0])
        return trainable.merge(adapters, trainable.split(params, mask)[1])
