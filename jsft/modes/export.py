"""`--mode export`: a trained checkpoint as a Hugging Face model directory `transformers` loads."""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
import ml_collections

from jsft.errors import ConfigError
from jsft.interop import hf
from jsft.interop import peft as peft_io
from jsft.interop.hf_files import upload
from jsft.interop.hf_metadata import export_metadata
from jsft.models import lora
from jsft.parallel import multihost
from jsft.run import Run, local_root


def run_export(
    config: ml_collections.ConfigDict,
    workdir: str,
    export_dir: str,
    step: int = 0,
    dtype: str = "bfloat16",
    adapter: bool = False,
) -> list[str]:
    """Write the checkpoint at `step` (0: the latest) of `workdir` to `export_dir`; returns the files.

    Only the parameters are restored (never the optimizer state), already sharded on the run's mesh,
    and every process takes part in the export: each tensor is gathered from the devices that hold
    it, one at a time, and process 0 writes it. A LoRA/QLoRA run exports the merged model (adapters
    folded into the dequantized base, as PEFT's merge_and_unload), or with `adapter` a PEFT adapter
    directory for the base model.

    An `export_dir` in object storage (gs://...) is written to a local directory first (under
    $JSFT_LOCAL_DIR, default /tmp/jsft), then uploaded by process 0 with config.json last, and the
    local copy removed."""
    if "://" not in export_dir:
        files, what = _export(config, workdir, export_dir, step, dtype, adapter)
    else:
        os.makedirs(local_root(), exist_ok=True)
        local = tempfile.mkdtemp(prefix="export-", dir=local_root())
        try:
            files, what = _export(config, workdir, local, step, dtype, adapter)
            if jax.process_index() == 0:
                upload(local, export_dir)
        finally:
            shutil.rmtree(local, ignore_errors=True)
        multihost.barrier("jsft_export_upload")
    if jax.process_index() == 0:
        print(f"Exported {what} to {export_dir}")
    return files


def _export(
    config: ml_collections.ConfigDict, workdir: str, export_dir: str, step: int, dtype: str, adapter: bool
) -> tuple[list[str], str]:
    """run_export into a local directory: (the files written, what they are)."""
    run = Run.create(config, workdir)
    tok = run.tokenizer()
    model = run.model(tok.vocab_size)
    if adapter and not model.config.lora_targets:
        raise ConfigError("--export_adapter needs a LoRA/QLoRA run (config.peft.method=lora or qlora)")
    which = str(step) if step else "latest"
    try:
        params, _, step = run.restore_params(model, which)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; pass an existing step with --export_step=STEP") from e
    if adapter:
        peft_cfg = run.peft_settings()
        files = peft_io.save_adapter(
            export_dir, params, model.config, config.model.hf_path, peft_cfg["rslora"], peft_cfg["alpha"]
        )
        return files, f"the LoRA adapters of step {step} of {run.remote} (PEFT)"
    if model.config.is_peft:  # fold the adapters in: the export is a plain model of the base's shape
        _, base_shardings = run.params_layout(model.base())
        merge = jax.jit(
            lambda p: lora.merge(p, model.config, model.config.param_dtype), out_shardings=base_shardings
        )
        params, model = merge(params), model.base()
    family = (
        hf.read_config(config.model.hf_path)["model_type"]
        if config.model.hf_path
        else config.model.export_family
    )
    tokenizer_dir = config.data.tokenizer or config.model.hf_path
    # Every process takes part: each tensor is gathered from the devices that hold it; process 0 writes.
    files = hf.save_pretrained(
        export_dir,
        params,
        model.config,
        family,
        dtype=dtype,
        tokenizer_dir=tokenizer_dir if tokenizer_dir and os.path.isdir(tokenizer_dir) else None,
        **export_metadata(config, tok),
    )
    if jax.process_index() == 0 and not tokenizer_dir:  # a tokenizer jsft trained: ship it beside the weights
        shutil.copy(tok.path, os.path.join(export_dir, "tokenizer.model"))
        files.append("tokenizer.model")
    return files, f"step {step} of {run.remote} as {family} ({dtype}; {len(files)} files)"
