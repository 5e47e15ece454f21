"""`--mode export`: a trained checkpoint as a Hugging Face model directory `transformers` loads."""

from __future__ import annotations

import os

import jax
import ml_collections

from jsft.data.pipeline import build_tokenizer
from jsft.interop import hf
from jsft.models.registry import build_model
from jsft.parallel import sharding
from jsft.parallel.mesh import build_mesh
from jsft.train.checkpoint import Checkpointer
from jsft.train.optim import build_optimizer, build_schedule
from jsft.train.state import state_shardings


def run_export(
    config: ml_collections.ConfigDict, workdir: str, export_dir: str, step: int = 0, dtype: str = "bfloat16"
) -> list[str]:
    """Write the checkpoint at `step` (0: the latest) of `workdir` to `export_dir`; returns the files."""
    workdir = os.path.abspath(workdir)

    def no_texts():
        raise FileNotFoundError(
            f"no tokenizer: {workdir}/tokenizer.model is missing and the config names none"
        )

    tok = build_tokenizer(config.data, workdir, config.data.template, no_texts, config.model.hf_path)
    model = build_model(config.model, tok.vocab_size)
    tx = build_optimizer(config.optim, build_schedule(config.optim, config.train.steps))
    mesh = build_mesh(config.mesh.shape, config.mesh.dcn_shape)
    abstract, shardings, _ = state_shardings(
        model, tx, mesh, sharding.parse_rules(config.mesh.rules.to_dict())
    )
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints)
    step = step or ckpt.latest_step()
    if step is None or step not in ckpt.all_steps():
        raise FileNotFoundError(
            f"no checkpoint {'at step ' + str(step) if step else ''} in {ckpt.directory} "
            f"(have: {ckpt.all_steps()})"
        )
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    state, _ = ckpt.restore(step, target)
    ckpt.close()
    family = (
        hf.read_config(config.model.hf_path)["model_type"]
        if config.model.hf_path
        else config.model.export_family
    )
    tokenizer_dir = config.data.tokenizer or config.model.hf_path
    files = []
    if jax.process_index() == 0:
        files = hf.save_pretrained(
            export_dir,
            state.params,
            model.config,
            family,
            dtype=dtype,
            bos_id=tok.bos_id,
            eos_id=tok.eos_id,
            tokenizer_dir=tokenizer_dir if tokenizer_dir and os.path.isdir(tokenizer_dir) else None,
        )
        if not tokenizer_dir:  # a tokenizer jsft trained: ship the SentencePiece model beside the weights
            import shutil  # noqa: PLC0415

            shutil.copy(tok.path, os.path.join(export_dir, "tokenizer.model"))
            files.append("tokenizer.model")
        print(f"Exported step {step} of {workdir} to {export_dir} as {family} ({dtype}): {len(files)} files")
    return files
