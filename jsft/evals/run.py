"""`--mode eval` and `--mode generate`: a trained (or imported) model without training.

--checkpoint=latest | best | <step> | hf   (hf: the weights of config.model.hf_path as they are)
"""

from __future__ import annotations

import json
import os
import sys

import jax
import ml_collections

from jsft import config as config_lib
from jsft.data import formats, sources, templates
from jsft.data.pipeline import build_data
from jsft.evals import generate
from jsft.evals.suite import Evaluation
from jsft.interop import hf
from jsft.models.registry import build_model
from jsft.parallel import sharding
from jsft.parallel.mesh import build_mesh
from jsft.train.checkpoint import Checkpointer
from jsft.train.optim import build_optimizer, build_schedule
from jsft.train.state import state_shardings


def load(config: ml_collections.ConfigDict, workdir: str, checkpoint: str, eval_prompt_limit: int = 0):
    """(data, model, params, label, step, mesh objects) for a named checkpoint of `workdir`
    (step 0 for --checkpoint=hf)."""
    workdir = os.path.abspath(workdir)
    data = build_data(
        config.data, config.seed, workdir, eval_prompt_limit=eval_prompt_limit, hf_path=config.model.hf_path
    )
    model = build_model(config.model, data.tokenizer.vocab_size)
    mesh = build_mesh(config.mesh.shape, config.mesh.dcn_shape)
    rules = sharding.parse_rules(config.mesh.rules.to_dict())
    tx = build_optimizer(config.optim, build_schedule(config.optim, config.train.steps))
    abstract, shardings, _ = state_shardings(model, tx, mesh, rules)
    if checkpoint == "hf":
        if not config.model.hf_path:
            raise config_lib.ConfigError(
                "--checkpoint=hf evaluates the weights of config.model.hf_path, which is not set; set it "
                "or name a checkpoint of the workdir (--checkpoint=latest, best or a step)"
            )
        params = hf.load_params(config.model.hf_path, model.config, shardings.params)
        return data, model, params, "hf", 0, (mesh, rules)
    directory = os.path.join(workdir, "checkpoints_best" if checkpoint == "best" else "checkpoints")
    ckpt = Checkpointer(directory, keep=1000)
    step = ckpt.latest_step() if checkpoint in ("latest", "best") else int(checkpoint)
    if step is None or step not in ckpt.all_steps():
        raise FileNotFoundError(f"no checkpoint {checkpoint!r} in {directory} (steps: {ckpt.all_steps()})")
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    state, _ = ckpt.restore_or_fail(step, target, hint=" (pass one with --checkpoint=STEP)")
    ckpt.close()
    return data, model, state.params, f"{checkpoint}_step_{step}", step, (mesh, rules)


def run_eval(config: ml_collections.ConfigDict, workdir: str, checkpoint: str = "latest") -> dict:
    """Validation metrics and the eval suite on one checkpoint: prints a table, writes
    WORKDIR/eval_<label>.json and the samples under WORKDIR/eval_<label>/."""
    data, model, params, label, step, (mesh, rules) = load(
        config, workdir, checkpoint, config.eval.exact_match_examples
    )
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with sharding.use_rules(mesh, rules):
        evaluation = Evaluation(
            config,
            model,
            data,
            sharding.batch_sharding(mesh, rules),
            replicated,
            sharding.batch_divisor(mesh, rules),
        )
        # The checkpoint's step seeds sampled generations, as the evaluation during training did.
        results, all_samples = evaluation.run(params, step)
    out_dir = os.path.join(os.path.abspath(workdir), f"eval_{label}")
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
    data, model, params, label, step, (mesh, rules) = load(config, workdir, checkpoint)
    tok, template = data.tokenizer, data.template
    with sharding.use_rules(mesh, rules):
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
