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
output) for the samples file. Only `eval_settings_from_config` (and `Evaluation.from_config`) read the
config; the evaluators take `EvalSettings`, `TaskSpec`s and a `BatchPlacement`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jsft.data import formats, packing, pipeline, sources, templates
from jsft.data.eval_data import eval_batches
from jsft.evals import generate, metrics
from jsft.evals.validation import ValidationEvaluator
from jsft.models.registry import ModelDef, Params
from jsft.parallel.placement import BatchPlacement
from jsft.train.step import batch_nll, make_eval_step

KINDS = ("generate", "choice", "loss")


class Interrupted(Exception):
    """An evaluation left early because `should_stop()` said so (SIGTERM); its results are dropped."""


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """The validation evaluation's sizes (config.data.seq_len and config.eval.*)."""

    seq_len: int
    batch_size: int  # rows per eval batch, before rounding up to the placement's divisor
    max_new_tokens: int  # generated per validation prompt (exact match)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task of the suite (config.eval.tasks.<name>); `metrics`, `max_new_tokens`, `sampling` and
    `stop_strings` are read by generate tasks only."""

    name: str
    kind: str  # one of KINDS
    path: str
    metrics: tuple[str, ...] = ("exact_match",)
    max_examples: int = 1000
    max_new_tokens: int = 16
    sampling: generate.Sampling = generate.Sampling()
    stop_strings: tuple[str, ...] = ()


def _task_spec(name: str, cfg: ml_collections.ConfigDict) -> TaskSpec:
    if cfg.kind not in KINDS:
        raise ValueError(f"config.eval.tasks.{name}.kind={cfg.kind!r} is not one of {KINDS}")
    names = tuple(m.strip() for m in cfg.metrics.split(",") if m.strip())
    unknown = set(names) - set(metrics.METRICS)
    if cfg.kind == "generate" and unknown:
        raise ValueError(
            f"config.eval.tasks.{name}.metrics: unknown {sorted(unknown)}; known {sorted(metrics.METRICS)}"
        )
    return TaskSpec(
        name=name,
        kind=cfg.kind,
        path=cfg.path,
        metrics=names,
        max_examples=cfg.max_examples,
        max_new_tokens=cfg.max_new_tokens,
        sampling=generate.Sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed),
        stop_strings=tuple(s for s in cfg.stop_strings.split("|") if s) if cfg.stop_strings else (),
    )


def eval_settings_from_config(config: ml_collections.ConfigDict) -> tuple[EvalSettings, list[TaskSpec]]:
    """The evaluation's settings and its tasks (sorted by name), read from the config in one place."""
    settings = EvalSettings(config.data.seq_len, config.eval.batch_size, config.eval.max_new_tokens)
    return settings, [_task_spec(name, cfg) for name, cfg in sorted(config.eval.tasks.items())]


@dataclasses.dataclass(frozen=True)
class Context:
    """What every task needs from the run."""

    model: ModelDef
    tokenizer: object
    template: object
    stop_ids: list[int]
    seq_len: int
    batch_size: int  # rows per eval batch: a multiple of placement.divisor
    placement: BatchPlacement = BatchPlacement()

    def __post_init__(self):
        if self.batch_size % self.placement.divisor:
            raise ValueError(
                f"Context.batch_size={self.batch_size} must be a multiple of the placement's divisor "
                f"{self.placement.divisor}; use placement.round_up(batch_size)"
            )


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
    def __init__(self, spec: TaskSpec, ctx: Context):
        self.name, self.ctx = spec.name, ctx
        self.metrics, self.stop_strings = list(spec.metrics), list(spec.stop_strings)
        self.prompts, self.refs = [], []
        for where, record in _records(spec.path, spec.max_examples):
            try:
                conv = formats.to_conversation(record, formats.detect_format(list(record), {}), {})
                context, reference = conv.split_last_turn()
            except formats.BadRecord as e:
                raise sources.DataError(f"{where}: {e}") from e
            self.prompts.append(templates.prompt_ids(ctx.template, ctx.tokenizer, context))
            self.refs.append(reference)
        longest = max((len(p) for p in self.prompts), default=1)
        self.max_prompt_len = min(ctx.seq_len, -(-longest // 8) * 8)
        self.generator = generate.make_generator(
            ctx.model,
            spec.max_new_tokens,
            ctx.stop_ids,
            ctx.tokenizer.pad_id,
            spec.sampling,
            ctx.placement.replicated,
        )

    def run(self, params: Params, step: int = 0) -> tuple[dict, list[dict]]:
        tok = self.ctx.tokenizer
        ids = generate.generate_ids(
            self.generator,
            params,
            self.prompts,
            self.max_prompt_len,
            self.ctx.batch_size,
            self.ctx.stop_ids,
            tok.pad_id,
            self.ctx.placement,
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
        return -jnp.sum(batch_nll(model, params, batch) * batch["loss_mask"], axis=-1)

    return score


def _without_end_token(ids: list[int], mask: list[bool], stop_ids: list[int]) -> list[bool]:
    """The mask with the reply's end token (its last trained token, if a stop id) untrained: a choice
    is scored by its own tokens, whatever the template writes after that token (chatml's newline)."""
    last = max((i for i, m in enumerate(mask) if m), default=None)
    if last is None or ids[last] not in stop_ids:
        return mask
    return mask[:last] + [False] + mask[last + 1 :]


class ChoiceTask:
    def __init__(self, spec: TaskSpec, ctx: Context):
        self.name, self.ctx = spec.name, ctx
        self.examples, self.answers, self.prompts, self.choices = [], [], [], []
        for where, record in _records(spec.path, spec.max_examples):
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
        self.batches = eval_batches(self.examples, ctx.seq_len, ctx.batch_size, mode="pad")
        self.score = jax.jit(_score_step(ctx.model), out_shardings=ctx.placement.replicated)

    def run(self, params: Params, step: int = 0) -> tuple[dict, list[dict]]:
        scores = np.concatenate(
            [np.asarray(self.score(params, self.ctx.placement.put_batch(b))) for b in self.batches]
        )[: len(self.examples)]
        samples, correct, k = [], 0, 0
        for prompt, choices, answer in zip(self.prompts, self.choices, self.answers, strict=True):
            picked = int(np.argmax(scores[k : k + len(choices)]))
            k += len(choices)
            correct += picked == answer
            samples.append({"prompt": prompt, "reference": choices[answer], "output": choices[picked]})
        return {f"eval/{self.name}/accuracy": correct / max(len(self.answers), 1)}, samples


class LossTask:
    def __init__(self, spec: TaskSpec, ctx: Context):
        self.name, self.ctx = spec.name, ctx
        examples = []
        for where, record in _records(spec.path, spec.max_examples):
            try:
                conv = formats.to_conversation(record, formats.detect_format(list(record), {}), {})
                ids, mask = templates.render(ctx.template, ctx.tokenizer, conv)
            except formats.BadRecord as e:
                raise sources.DataError(f"{where}: {e}") from e
            ids, mask, _ = packing.fit_ids(ids, mask, ctx.seq_len, "truncate")
            if ids:
                examples.append(packing.Example(np.asarray(ids, np.int32), np.asarray(mask, np.bool_)))
        self.batches = eval_batches(examples, ctx.seq_len, ctx.batch_size)
        self.step = jax.jit(make_eval_step(ctx.model), out_shardings=ctx.placement.replicated)

    def run(self, params: Params, step: int = 0) -> tuple[dict, list[dict]]:
        loss_sum = weight = 0.0
        for b in self.batches:
            sums = jax.device_get(self.step(params, self.ctx.placement.put_batch(b)))
            loss_sum, weight = loss_sum + float(sums["loss_sum"]), weight + float(sums["weight_sum"])
        loss = loss_sum / max(weight, 1.0)
        return {f"eval/{self.name}/loss": loss, f"eval/{self.name}/perplexity": math.exp(min(loss, 50.0))}, []


TASKS = {"generate": GenerateTask, "choice": ChoiceTask, "loss": LossTask}


def build_suite(tasks: list[TaskSpec], ctx: Context) -> dict:
    """{name: evaluator} for the tasks, in their order."""
    return {spec.name: TASKS[spec.kind](spec, ctx) for spec in tasks}


class Evaluation:
    """Everything evaluated at an eval step: the validation split (loss, exact match) and the suite.

    `run(params, step) -> (metrics, samples by task)`; validation samples are under "validation".
    `step` (the training step evaluated) seeds sampled generations; without it, the number of earlier
    `run` calls does, so repeated evaluations never reuse one sample. Build it from a config with
    `Evaluation.from_config(config, model, data, placement)`.
    """

    def __init__(
        self,
        settings: EvalSettings,
        tasks: list[TaskSpec],
        model: ModelDef,
        data: pipeline.Data,
        placement: BatchPlacement | None = None,
    ):
        self._should_stop, self._step = None, 0
        placement = placement or BatchPlacement()
        # Every batch of every evaluator is placed here, so a stop request is polled in one place.
        placement = dataclasses.replace(placement, before_batch=self._poll)
        self.validation = ValidationEvaluator(
            model, data, settings.seq_len, settings.batch_size, settings.max_new_tokens, placement
        )
        ctx = Context(
            model,
            data.tokenizer,
            data.template,
            data.stop_ids,
            settings.seq_len,
            placement.round_up(settings.batch_size),
            placement,
        )
        self.suite = build_suite(tasks, ctx)
        self.runs = 0

    @classmethod
    def from_config(
        cls,
        config: ml_collections.ConfigDict,
        model: ModelDef,
        data: pipeline.Data,
        placement: BatchPlacement | None = None,
    ) -> Evaluation:
        """The evaluation `config.eval` names (sizes from config.data.seq_len and config.eval.*)."""
        settings, tasks = eval_settings_from_config(config)
        return cls(settings, tasks, model, data, placement)

    def _poll(self) -> None:
        if self._should_stop is not None and self._should_stop():
            raise Interrupted(f"evaluation at step {self._step} interrupted")

    def run(
        self, params: Params, step: int | None = None, should_stop: Callable[[], bool] | None = None
    ) -> tuple[dict, dict[str, list[dict]]]:
        """`should_stop`: polled before every batch (on every process at the same batches); when it
        returns True the evaluation raises Interrupted."""
        step = self.runs if step is None else step
        self.runs += 1
        self._should_stop, self._step = should_stop, step
        try:
            results, samples = self.validation.run(params)
            by_task = {"validation": samples}
            for name, task in self.suite.items():
                task_metrics, by_task[name] = task.run(params, step)
                results.update(task_metrics)
        finally:
            self._should_stop = None
        return results, by_task
