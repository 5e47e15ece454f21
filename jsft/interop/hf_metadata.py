"""What an export says besides the weights: special token ids, `max_position_embeddings` and the
generation config, from the run's config and tokenizer (and the source checkpoint it was tuned from)."""

from __future__ import annotations

import os

import ml_collections

from jsft.data import templates
from jsft.data.tokenizer import Tokenizer
from jsft.interop.hf_files import source_fields


def _as_ids(value) -> list[int]:
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]


def export_metadata(config: ml_collections.ConfigDict, tok: Tokenizer) -> dict:
    """The special ids, `max_position_embeddings` and generation config of an export.

    A model fine-tuned from `config.model.hf_path` keeps the source's values (config.json,
    generation_config.json); its EOS ids gain the template's end-of-turn token if the source lacked it,
    so `generate` stops where the model learned to. A model trained from scratch gets the tokenizer's
    ids and the sequence length it was trained at.
    """
    stops = templates.stop_ids(
        templates.build_template(config.data.template, config.data.separator, tok), tok
    )
    eos = [tok.eos_id] + [i for i in stops if i != tok.eos_id]
    out = dict(
        bos_id=tok.bos_id,
        pad_id=tok.pad_id if getattr(tok, "pad_token", None) else None,
        max_position_embeddings=config.data.seq_len,
        generation_config=None,
    )
    source_dir = config.model.hf_path
    if source_dir:
        carried, generation = source_fields(source_dir)
        out["max_position_embeddings"] = carried.get("max_position_embeddings", config.data.seq_len)
        own_tokenizer = not config.data.tokenizer or os.path.realpath(
            config.data.tokenizer
        ) == os.path.realpath(source_dir)
        if own_tokenizer:  # ids of another tokenizer would be wrong for this one
            out["bos_id"] = carried.get("bos_token_id", out["bos_id"])
            out["pad_id"] = carried.get("pad_token_id", out["pad_id"])
            source_eos = _as_ids(carried["eos_token_id"]) if "eos_token_id" in carried else []
            eos = source_eos + [i for i in eos if i not in source_eos]
            if generation is not None:
                gen_eos = (
                    _as_ids(generation["eos_token_id"]) if generation.get("eos_token_id") is not None else []
                )
                gen_eos += [i for i in eos if i not in gen_eos]
                generation["eos_token_id"] = gen_eos[0] if len(gen_eos) == 1 else gen_eos
                out["generation_config"] = generation
    out["eos_id"] = eos[0] if len(eos) == 1 else eos
    return out
