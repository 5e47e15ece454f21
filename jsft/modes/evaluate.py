"""`--mode eval` and `--mode generate`: a trained (or imported) model without training.

--checkpoint=latest | best | <step> | hf   (hf: the weights of config.model.hf_path as they are)
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING

import jax
import ml_collections

from jsft.data import formats, sources, templates
from jsft.evals import generate
from jsft.evals.suite import Evaluation
from jsft.parallel import sharding
from jsft.run import Run

if TYPE_CHECKING:
    from jsft.data.pipeline import Data
    from jsft.models.registry import ModelDef, Params


def load(
    config: ml_collections.ConfigDict, workdir: str, checkpoint: str, eval_prompt_limit: int = 0
) -> tuple[Run, Data, ModelDef, Params, str, int]:
    """(run, data, model, params, label, step) for a named checkpoint of `workdir` (step 0 for
    --checkpoint=hf). Only the parameters are restored, never the optimizer state."""
    run = Run.create(config, workdir)
    data = run.data(eval_prompt_limit)
    model = run.model(data.tokenizer.vocab_size)
    params, label, step = run.restore_params(model, checkpoint)
    return run, data, model, params, label, step


def run_eval(config: ml_collections.ConfigDict, workdir: str, checkpoint: str = "latest") -> dict:
    """Validation metrics and the eval suite on one checkpoint: prints a table, writes
    WORKDIR/eval_<label>.json and the samples under WORKDIR/eval_<label>/."""
    run, data, model, params, label, step = load(
        config, workdir, checkpoint, config.eval.exact_match_examples
    )
    with sharding.use_rules(run.mesh, run.rules):
        evaluation = Evaluation.from_config(config, model, data, run.placement)
        # The checkpoint's step seeds sampled generations, as the evaluation during training did.
        results, all_samples = evaluation.run(params, step)
    out_dir = os.path.join(run.workdir, f"eval_{label}")
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(f"{out_dir}.json", "w") as f:
            json.dump(results, f, indent=2)
        for name, rows in all_samples.items():
            with open(os.path.join(out_dir, f"{name}.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        width = max(len(k) for k in results) if results else 10
        print(f"eval of {label} ({workdir})")
        for key, value in sorted(results.items()):
            print(f"  {key:<{width}}  {value:10.4f}")
        print(f"written: {out_dir}.json and samples in {out_dir}/")
    return results


def _prompt_conversation(record, where: str) -> formats.Conversation:
    """A prompt record: {"prompt": ...} or {"messages": [...]} (a final assistant reply is dropped and
    generated anew)."""
    if isinstance(record.get("messages"), list):
        msgs = tuple(formats.Message(m["role"], m["content"]) for m in record["messages"])
        return formats.Conversation(msgs[:-1] if msgs and msgs[-1].role == "assistant" else msgs)
    if not isinstance(record.get("prompt"), str):
        raise sources.DataError(f"{where}: a prompt record needs a 'prompt' string or 'messages'")
    return formats.Conversation((formats.Message("user", record["prompt"]),))


def run_generate(
    config: ml_collections.ConfigDict,
    workdir: str,
    checkpoint: str,
    prompts_file: str,
    sampling: generate.Sampling,
    max_new_tokens: int,
) -> str | None:
    """Generate for every record of `prompts_file` (writing `<name>.outputs.jsonl` next to it), or,
    without a file, for each line typed on stdin, streaming tokens as they come."""
    run, data, model, params, label, step = load(config, workdir, checkpoint)
    tok, template = data.tokenizer, data.template
    with sharding.use_rules(run.mesh, run.rules):
        if not prompts_file:
            print(f"jsft generate ({label}); one prompt per line, Ctrl-D to end", file=sys.stderr)
            for index, line in enumerate(sys.stdin):
                if not line.strip():
                    continue
                conv = formats.Conversation((formats.Message("user", line.rstrip("\n")),))
                ids, shown = [], ""
                for token in generate.stream(
                    model,
                    params,
                    templates.prompt_ids(template, tok, conv),
                    max_new_tokens,
                    data.stop_ids,
                    sampling,
                    index,
                ):
                    ids.append(token)
                    text = tok.decode(ids)
                    print(text[len(shown) :], end="", flush=True)
                    shown = text
                print()
            return None
        table = sources.read_table(prompts_file, "train", None)
        rows = [sources.row_record(table[i], i, prompts_file) for i in range(len(table))]
        for where, _, error in rows:
            if error:
                raise sources.DataError(f"{where}: {error}")
        prompts = [
            templates.prompt_ids(template, tok, _prompt_conversation(rec, where)) for where, rec, _ in rows
        ]
        longest = max(len(p) for p in prompts)
        gen = generate.make_generator(model, max_new_tokens, data.stop_ids, tok.pad_id, sampling)
        outputs = generate.generate_ids(
            gen, params, prompts, longest, config.eval.batch_size, data.stop_ids, tok.pad_id, step=step
        )
    out_path = os.path.splitext(prompts_file)[0] + ".outputs.jsonl"
    with open(out_path, "w") as f:
        for (where, rec, _), ids in zip(rows, outputs, strict=True):
            f.write(
                json.dumps({**rec, "output": tok.decode(ids), "source": where, "checkpoint": label}) + "\n"
            )
    print(f"wrote {len(outputs)} outputs to {out_path}")
    return out_path
