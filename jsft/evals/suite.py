"""The eval suite a config names: small evaluators, each with one `run(params)` method.

    config.eval.tasks.<name> = task(path, kind, metrics=..., ...)   (see configs/demo.py)

  generate  prompt -> generated text, scored against the reference by `metrics` (exact_match,
            exact_match_squad, f1, bleu, rouge_l); the prompt is the conversation before the last reply;
            with temperature > 0 the samples depend on the seed, the eval step and the batch
  choice    {"prompt", "choices": [...], "answer": index}: the choice with the highest
            log-likelihood (summed over its tokens; the end-of-turn token or EOS that the template
            trains after a reply is excluded, for every template) is the prediction; accuracy
  loss      per-token loss and perplexity on the references (the trained tokens)

Each `run(params, step)` returns metrics as `eval/<task>/<metric>` and samples (prompt, reference,
output) for the samples file.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jsft.data import formats, packing, pipeline, sources, templates
from jsft.evals import generate, metrics
from jsft.evals.validation import ValidationEvaluator
from jsft.models.registry import ModelDef
from jsft.train import losses
from jsft.train.step import make_eval_step

KINDS = ("generate", "choice", "loss")


class Interrupted(Exception):
    """An evaluation left early because `should_stop()` said so (SIGTERM); its results are dropped."""


@dataclasses.dataclass
class Context:
    """What every evaluator needs from the run."""

    model: ModelDef
    tokenizer: object
    template: object
    stop_ids: list[int]
    seq_len: int
    batch_size: int
    put: object = staticmethod(lambda x: x)  # numpy batch -> device array (sharded when needed)
    replicated: object = None


def _records(path: str, limit: int) -> list[tuple[str, dict]]:
    table = sources.read_table(path, "train", None)
    out = []
    for i in range(len(table)):
        if len(out) >= limit:
            break
        where, record, error = sources.row_record(table[i], i, path)
        if error:
            raise sources.DataError(f"{where}: {error}")
        out.append((where, record))
    return out


class GenerateTask:
    def __init__(self, name: str, cfg: ml_collections.ConfigDict, ctx: Context):
        self.name, self.ctx = name, ctx
        self.metrics = [m.strip() for m in cfg.metrics.split(",") if m.strip()]
        unknown = set(self.metrics) - set(metrics.METRICS)
        if unknown:
            raise ValueError(
                f"config.eval.tasks.{name}.metrics: unknown {sorted(unknown)}; "
                f"known {sorted(metrics.METRICS)}"
            )
        self.stop_strings = [s for s in cfg.stop_strings.split("|") if s] if cfg.stop_strings else []
        self.prompts, self.refs = [], []
        for where, record in _records(cfg.path, cfg.max_examples):
            try:
                conv = formats.to_conversation(record, formats.detect_format(list(record), {}), {})
                context, reference = conv.split_last_turn()
            except formats.BadRecord as e:
                raise sources.DataError(f"{where}: {e}") from e
            self.prompts.append(templates.prompt_ids(ctx.template, ctx.tokenizer, context))
            self.refs.append(reference)
        longest = max((len(p) for p in self.prompts), default=1)
        self.max_prompt_len = min(ctx.seq_len, -(-longest // 8) * 8)
        sampling = generate.Sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)
        self.generator = generate.make_generator(
            ctx.model, cfg.max_new_tokens, ctx.stop_ids, ctx.tokenizer.pad_id, sampling, ctx.replicated
        )

    def run(self, params, step: int = 0) -> tuple[dict, list[dict]]:
        tok = self.ctx.tokenizer
        ids = generate.generate_ids(
            self.generator,
            params,
            self.prompts,
            self.max_prompt_len,
            self.ctx.batch_size,
            self.ctx.stop_ids,
            tok.pad_id,
            self.ctx.put,
            step=step,
        )
        outputs = [generate.cut_at_stop_strings(tok.decode(x), self.stop_strings) for x in ids]
        result = {f"eval/{self.name}/{m}": metrics.METRICS[m](outputs, self.refs) for m in self.metrics}
        samples = [
            {"prompt": tok.decode(p), "reference": r, "output": o}
            for p, r, o in zip(self.prompts, self.refs, outputs, strict=True)
        ]
        return result, samples


def _score_step(model: ModelDef):
    """Per-row sum of log-probabilities of the trained (masked) target tokens."""

    def score(params, batch):
        logits = model.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"])
        return -jnp.sum(losses.token_nll(logits, batch["targets"]) * batch["loss_mask"], axis=-1)

    return score


def _without_end_token(ids: list[int], mask: list[bool], stop_ids: list[int]) -> list[bool]:
    """The mask with the reply's end token (its last trained token, if a stop id) untrained: a choice
    is scored by its own tokens, whatever the template writes after that token (chatml's newline)."""
    last = max((i for i, m in enumerate(mask) if m), default=None)
    if last is None or ids[last] not in stop_ids:
        return mask
    return mask[:last] + [False] + mask[last + 1 :]


class ChoiceTask:
    def __init__(self, name: str, cfg: ml_collections.ConfigDict, ctx: Context):
        self.name, self.ctx = name, ctx
        self.examples, self.answers, self.prompts, self.choices = [], [], [], []
        for where, record in _records(cfg.path, cfg.max_examples):
            choices, answer = record.get("choices"), record.get("answer")
            if (
                not isinstance(choices, list)
                or not isinstance(answer, int)
                or not 0 <= answer < len(choices or [])
            ):
                raise sources.DataError(
                    f"{where}: a choice record needs 'choices' (a list) and 'answer' (an index)"
                )
            for choice in choices:
                conv = formats.Conversation(
                    (formats.Message("user", record["prompt"]), formats.Message("assistant", str(choice)))
                )
                try:
                    ids, mask = templates.render(ctx.template, ctx.tokenizer, conv)
                except formats.BadRecord as e:
                    raise sources.DataError(f"{where}: {e}") from e
                mask = _without_end_token(ids, mask, ctx.stop_ids)
                ids, mask, _ = packing.fit_ids(ids, mask, ctx.seq_len, "truncate_prompt")
                self.examples.append(packing.Example(np.asarray(ids, np.int32), np.asarray(mask, np.bool_)))
            self.answers.append(answer)
            self.prompts.append(record["prompt"])
            self.choices.append([str(c) for c in choices])
        self.batches = pipeline.eval_batches(self.examples, ctx.seq_len, ctx.batch_size, mode="pad")
        self.score = jax.jit(_score_step(ctx.model), out_shardings=ctx.replicated)

    def run(self, params, step: int = 0) -> tuple[dict, list[dict]]:
        scores = np.concatenate(
            [np.asarray(self.score(params, {k: self.ctx.put(v) for k, v in b.items()})) for b in self.batches]
        )[: len(self.examples)]
        samples, correct, k = [], 0, 0
        for prompt, choices, answer in zip(self.prompts, self.choices, self.answers, strict=True):
            picked = int(np.argmax(scores[k : k + len(choices)]))
            k += len(choices)
            correct += picked == answer
            samples.append({"prompt": prompt, "reference": choices[answer], "output": choices[picked]})
        return {f"eval/{self.name}/accuracy": correct / max(len(self.answers), 1)}, samples


class LossTask:
    def __init__(self, name: str, cfg: ml_collections.ConfigDict, ctx: Context):
        self.name, self.ctx = name, ctx
        examples = []
        for where, record in _records(cfg.path, cfg.max_examples):
            try:
                conv = formats.to_conversation(record, formats.detect_format(list(record), {}), {})
                ids, mask = templates.render(ctx.template, ctx.tokenizer, conv)
            except formats.BadRecord as e:
                raise sources.DataError(f"{where}: {e}") from e
            ids, mask, _ = packing.fit_ids(ids, mask, ctx.seq_len, "truncate")
            if ids:
                examples.append(packing.Example(np.asarray(ids, np.int32), np.asarray(mask, np.bool_)))
        self.batches = pipeline.eval_batches(examples, ctx.seq_len, ctx.batch_size)
        self.step = jax.jit(make_eval_step(ctx.model), out_shardings=ctx.replicated)

    def run(self, params, step: int = 0) -> tuple[dict, list[dict]]:
        loss_sum = weight = 0.0
        for b in self.batches:
            sums = jax.device_get(self.step(params, {k: self.ctx.put(v) for k, v in b.items()}))
            loss_sum, weight = loss_sum + float(sums["loss_sum"]), weight + float(sums["weight_sum"])
        loss = loss_sum / max(weight, 1.0)
        return {f"eval/{self.name}/loss": loss, f"eval/{self.name}/perplexity": math.exp(min(loss, 50.0))}, []


TASKS = {"generate": GenerateTask, "choice": ChoiceTask, "loss": LossTask}


def build_suite(tasks_cfg: ml_collections.ConfigDict, ctx: Context) -> dict:
    """{name: evaluator} for `config.eval.tasks`."""
    suite = {}
    for name, cfg in sorted(tasks_cfg.items()):
        if cfg.kind not in TASKS:
            raise ValueError(f"config.eval.tasks.{name}.kind={cfg.kind!r} is not one of {KINDS}")
        suite[name] = TASKS[cfg.kind](name, cfg, ctx)
    return suite


class Evaluation:
    """Everything evaluated at an eval step: the validation split (loss, exact match) and the suite.

    `run(params, step) -> (metrics, samples by task)`; validation samples are under "validation".
    `step` (the training step evaluated) seeds sampled generations; without it, the number of earlier
    `run` calls does, so repeated evaluations never reuse one sample.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        model: ModelDef,
        data: pipeline.Data,
        batch_sharding=None,
        replicated=None,
        batch_divisor: int = 1,
    ):
        self.validation = ValidationEvaluator(
            model,
            data,
            config.data.seq_len,
            config.eval.batch_size,
            config.eval.max_new_tokens,
            batch_sharding,
            replicated,
            batch_divisor,
        )
        ctx = Context(
            model,
            data.tokenizer,
            data.template,
            data.stop_ids,
            config.data.seq_len,
            self.validation.batch_size,
            put=self.validation._put,
            replicated=replicated,
        )
        self.suite = build_suite(config.eval.tasks, ctx)
        self.runs = 0

    def run(self, params, step: int | None = None, should_stop=None) -> tuple[dict, dict[str, list[dict]]]:
        """`should_stop`: polled before every batch (on every process at the same batches); when it
        returns True the evaluation raises Interrupted."""
        step = self.runs if step is None else step
        self.runs += 1

        def interrupt() -> None:
            if should_stop():
                raise Interrupted(f"evaluation at step {step} interrupted")

        self.validation.interrupt = interrupt if should_stop is not None else None
        try:
            results, samples = self.validation.run(params)
            by_task = {"validation": samples}
            for name, task in self.suite.items():
                task_metrics, by_task[name] = task.run(params, step)
                results.update(task_metrics)
        finally:
            self.validation.interrupt = None
        return results, by_task
