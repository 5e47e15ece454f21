"""The embedded default: a tiny Llama-style model learns five small instruction tasks on the CPU.

    python -m jsft.main --config configs/demo.py --workdir /tmp/jsft_demo

`configs/demo.py:smoke` shrinks the run to a few steps (used by tests). Every field below can be
overridden on the command line, e.g. `--config.optim.lr=1e-3`.
"""

import os

import ml_collections

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "demo")


def source(path: str, val_path: str = "", weight: float = 1.0, **kw) -> ml_collections.ConfigDict:
    """One data source; see jsft.data.sources.SourceSpec for every field."""
    fields = dict(
        path=os.path.normpath(path),
        val_path=os.path.normpath(val_path) if val_path else "",
        weight=weight,
        format="auto",
        fields=ml_collections.ConfigDict(),
        split="train",
        val_split="",
        val_fraction=0.0,
    )
    fields.update(kw)
    return ml_collections.ConfigDict(fields)


def task(path: str, kind: str, metrics: str = "exact_match", max_examples: int = 1000, **kw):
    """One eval task; `kind`: generate | choice | loss (jsft.evals.suite)."""
    fields = dict(
        path=os.path.normpath(path),
        kind=kind,
        metrics=metrics,
        max_examples=max_examples,
        max_new_tokens=16,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        seed=0,
        stop_strings="",
    )
    fields.update(kw)
    return ml_collections.ConfigDict(fields)


ARGS = (None, "smoke")  # the named arguments get_config takes (tests run each)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    # Sources by name; add more (each with a weight) for a mixture. Formats: auto, prompt_response,
    # alpaca, chat, text. Files: .jsonl, .json, .parquet, .csv, .arrow, save_to_disk directories.
    # A source's `tools` (source(..., tools="tools.json")) names a JSON list of tool schemas for the
    # records that carry no `tools` of their own (jsft/data/formats.py: tool calls and reasoning).
    config.data.sources = ml_collections.ConfigDict()
    config.data.sources.demo = source(
        os.path.join(DATA_DIR, "train.jsonl"), os.path.join(DATA_DIR, "val.jsonl")
    )
    config.data.mixture = "weights"  # weights | examples (capped at mixture_cap) | temperature
    config.data.mixture_cap = 0
    config.data.mixture_temperature = 1.0
    config.data.on_bad_record = "error"  # error: stop before training; skip: count, report, go on
    # A resumed run whose data stream differs from the checkpoint's (files, batch_size, seq_len, ...):
    # error (default) names the changed fields; restart keeps the weights and starts the data afresh.
    config.data.on_changed_data = "error"
    config.data.tokenizer = ""  # .model (SentencePiece) or HF tokenizer dir; empty: train one
    config.data.vocab_size = 512  # size of the tokenizer trained when none is given
    config.data.template = "plain"  # plain | chatml | llama3 | gemma | hf (the tokenizer's chat_template)
    config.data.separator = "\n"  # plain template: between prompt and response
    config.data.train_on = "all_assistant"  # or last_assistant
    # Assistants' thinking (`reasoning_content`, or `<think>...</think>` before the reply): True trains
    # it with the reply; False removes it before templating, so the model learns to answer without it.
    config.data.train_reasoning = True
    config.data.seq_len = 128
    config.data.overlong = "truncate"  # truncate | truncate_prompt | drop
    config.data.packing = "best_fit"  # best_fit | pad (one example per row)
    config.data.pack_chunk_examples = 2048  # examples drawn and packed together
    config.data.batch_size = 32  # rows per global batch (packed examples per row vary)
    config.data.prefetch = 2  # batches prepared ahead of the train step
    config.data.num_shards = 0  # logical data shards (the batches depend on this); 0: one per process
    config.data.num_proc = 0  # tokenization processes; 0: by data size
    config.data.cache_dir = ""  # tokenization cache; empty: WORKDIR/cache
    # table: read, tokenize and cache every source whole (in memory-mapped Arrow) before training;
    # stream: cut sources into shards, each process indexes only its own and reads, tokenizes and
    # packs records when they are drawn, in grain workers (BUILD_NOTES, "Streaming data engine")
    config.data.engine = "table"
    config.data.workers = 0  # stream: grain worker processes per logical stream (0: in the trainer)
    config.data.shuffle_window = 16384  # stream: records shuffled together (0: the whole stream)
    config.data.shard_bytes = 64 << 20  # stream: JSONL byte range per shard (Parquet: row groups)

    config.model = ml_collections.ConfigDict()
    config.model.name = "llama"
    config.model.hf_path = ""  # a local Hugging Face checkpoint to start from (architecture + weights)
    config.model.export_family = "llama"  # HF model_type written by --mode export (HF imports keep theirs)
    config.model.vocab_size = 0  # 0: the tokenizer's vocabulary size
    config.model.d_model = 128
    config.model.n_layers = 4
    config.model.n_heads = 4
    config.model.n_kv_heads = 2
    config.model.head_dim = 32
    config.model.mlp_dim = 384
    config.model.rope_theta = 10000.0
    config.model.norm_eps = 1e-5
    config.model.tie_embeddings = False
    config.model.init_std = 0.02
    config.model.param_dtype = "float32"
    config.model.compute_dtype = "float32"
    # What each layer keeps for the backward: none | full | save_dots | save_dots_except_mlp |
    # save_attention_out | offload (save_dots' activations in host memory) | dots | dots_no_batch.
    config.model.remat = "none"
    # auto (GPU: pallas_gpu, cudnn where it takes the model and rows; TPU: splash; else flash) | flash |
    # pallas_gpu | cudnn | splash | chunked | reference | xla_sdpa: jsft/models/attention.py
    config.model.attention = "auto"
    config.model.attention_chunk = 128
    config.model.dropout_embed = 0.0  # training only; 0: off
    config.model.dropout_residual = 0.0  # on each sublayer's output before the residual add

    config.mesh = ml_collections.ConfigDict()
    config.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); one -1 takes the remaining devices
    config.mesh.dcn_shape = (1, 1, 1)  # the part of each axis across slices/nodes (slow network)
    config.mesh.expert = 1  # expert-parallel axis (MoE): experts split over it, the batch too
    # Logical axis -> mesh axes ("" replicates). Dimensions not divisible by their axes are replicated.
    config.mesh.rules = ml_collections.ConfigDict(
        dict(
            batch="data,fsdp,expert",
            embed="fsdp",
            mlp="tensor",
            heads="tensor",
            kv_heads="tensor",
            vocab="tensor",
            head_dim="",
            layers="",
            seq="",
            expert="expert",  # MoE experts; tokens reach them by all-to-all (jsft/models/moe.py)
        )
    )

    config.optim = ml_collections.ConfigDict()
    config.optim.lr = 3e-3
    config.optim.warmup_steps = 50
    config.optim.decay = "cosine"
    config.optim.final_lr_ratio = 0.1
    config.optim.weight_decay = 0.1
    config.optim.b1 = 0.9
    config.optim.b2 = 0.98
    config.optim.eps = 1e-8
    config.optim.clip_norm = 1.0
    config.optim.grad_accum_steps = 1

    config.loss = ml_collections.ConfigDict()
    config.loss.normalization = "token"
    # chunked: the output projection fused with the loss, `chunk_len` positions of every row at a time
    # (the batch's [B, T, V] logits never exist); reference: log-softmax over full logits (the oracle).
    config.loss.implementation = "chunked"
    config.loss.chunk_len = 128
    # The objective (jsft/train/objectives.py): ce | gem (GEM: gem_beta in (0, 1], gem_h linear |
    # log_sigmoid); label_smoothing (ce), z_loss (coefficient of log(Z)^2) and NEFTune's neftune_alpha
    # (noise on the input embeddings, training only). Eval loss is always plain cross-entropy.
    config.loss.objective = "ce"
    config.loss.label_smoothing = 0.0
    config.loss.z_loss = 0.0
    config.loss.gem_beta = 0.7
    config.loss.gem_h = "linear"
    config.loss.neftune_alpha = 0.0
    config.loss.prompt_weight = 0.0  # > 0: also train prompt/template tokens with this weight
    # Q-SFT (objective='qsft'; records carry `reward` in [0, 1]): discount between assistant turns and
    # the target copy's Polyak rate. The behaviour policy is the starting weights (an SFT model).
    config.loss.qsft_gamma = 1.0
    config.loss.qsft_polyak = 0.005

    config.train = ml_collections.ConfigDict()
    config.train.steps = 600
    config.train.log_every_steps = 10
    config.train.eval_every_steps = 150
    config.train.checkpoint_every_steps = 150
    config.train.keep_checkpoints = 2
    config.train.stop_after_steps = 0  # >0: leave after this step (checkpointed); rerun to go on
    config.train.best_metric = "eval/exact_match"  # keep the best checkpoint by this metric ("": off)
    config.train.best_mode = "max"  # or "min" (e.g. for eval/loss)
    config.train.early_stopping_patience = 0  # >0: stop after this many evals without improvement
    # A step whose loss or gradient is not finite is never applied. stop: end the run (nothing new is
    # saved); skip: drop that update, count it in metrics.jsonl, stop after max_skipped_steps in a row.
    config.train.on_nonfinite = "stop"
    config.train.max_skipped_steps = 10
    # Frozen subsets: regexes over dotted parameter paths (embed, lm_head, layers.attn.q_proj, ...);
    # a parameter trains if it matches `trainable` ("": all) and not `frozen` ("": none).
    config.train.trainable = ""
    config.train.frozen = ""
    # Layers whose slices of every stacked parameter stay as they are, e.g. "0-23" trains only the last
    # 8 layers of a 32-layer model (with LoRA too: their adapters stay zero).
    config.train.frozen_layers = ""

    # Parameter-efficient fine-tuning (jsft/models/lora.py). method: none (full fine-tuning) | lora |
    # qlora (the frozen base projections stored as `quant`: nf4 | int8, blocks of `quant_block`).
    # targets: q,k,v,o,gate,up,down, HF names (q_proj), all, or regexes over paths (layers.attn.*).
    # adapter: a Hugging Face PEFT LoRA directory to start from (its r, alpha and targets apply).
    config.peft = ml_collections.ConfigDict()
    config.peft.method = "none"
    config.peft.rank = 8
    config.peft.alpha = 16.0
    config.peft.rslora = False  # scale alpha / sqrt(rank) instead of alpha / rank
    config.peft.dropout = 0.0
    config.peft.targets = "all"
    config.peft.quant = "nf4"
    config.peft.quant_block = 64
    config.peft.adapter = ""

    # Weights & Biases (pip install 'jsft[wandb]'), beside metrics.jsonl and TensorBoard; mode: disabled |
    # offline (files under WORKDIR/wandb, `wandb sync` them later) | online. Sweeps set group and trial.
    config.logging = ml_collections.ConfigDict()
    config.logging.wandb = ml_collections.ConfigDict(
        dict(mode="disabled", project="jsft", entity="", name="", group="", tags="", trial="")
    )

    config.eval = ml_collections.ConfigDict()
    config.eval.at_start = True
    config.eval.batch_size = 50
    config.eval.max_new_tokens = 16
    config.eval.exact_match_examples = 200
    # The eval suite: named tasks on held-out data (see jsft/evals/suite.py for kinds and metrics).
    config.eval.tasks = ml_collections.ConfigDict(
        {
            "words": task(
                os.path.join(DATA_DIR, "eval_words.jsonl"), "generate", metrics="exact_match,rouge_l,bleu"
            ),
            "parity": task(os.path.join(DATA_DIR, "eval_parity_choice.jsonl"), "choice"),
        }
    )

    if arg == "smoke":  # a few seconds: for tests and for checking an install
        config.train.steps = 6
        config.train.log_every_steps = 1
        config.train.eval_every_steps = 3
        config.train.checkpoint_every_steps = 3
        config.optim.warmup_steps = 2
        config.data.batch_size = 8
        config.eval.exact_match_examples = 8
        config.eval.batch_size = 8
        config.eval.max_new_tokens = 8
        for t in config.eval.tasks.values():
            t.max_examples = 8
    elif arg:
        raise ValueError(f"configs/demo.py: unknown argument {arg!r} (known: 'smoke')")
    return config
