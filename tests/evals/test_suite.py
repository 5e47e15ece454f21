"""Eval tasks on a tiny model: choice scoring by log-likelihood, generation metrics, best checkpoint."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from configs.demo import task
from jsft.data.formats import Conversation, Message
from jsft.data.pipeline import build_data
from jsft.data.templates import PlainTemplate, build_template, render, stop_ids
from jsft.data.tokenizer import train_sentencepiece
from jsft.evals.generate import Sampling
from jsft.evals.suite import (
    Context,
    EvalSettings,
    Evaluation,
    Interrupted,
    TaskSpec,
    build_suite,
    eval_settings_from_config,
)
from jsft.models.llama import LlamaConfig
from jsft.models.registry import ModelDef, build_model
from jsft.modes.train import train_and_evaluate
from jsft.parallel.placement import BatchPlacement
from tests.conftest import write_jsonl


def _log_probs(model, params, ids):
    logits = np.asarray(model.apply(params, np.array([ids[:-1]])))[0].astype(np.float64)
    return (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )


@pytest.mark.parametrize("name", ["plain", "chatml"])
def test_choice_scoring_picks_the_choice_the_model_finds_likelier_without_its_end_token(tmp_path, name):
    template = build_template(name)
    tok = train_sentencepiece(
        ["pick one: red blue", "red", "blue", "user", "assistant"] * 20,
        300,
        str(tmp_path / "t.model"),
        template.special_tokens,
    )
    model = ModelDef.create(LlamaConfig.tiny(vocab_size=tok.vocab_size))
    stops = stop_ids(template, tok)

    # The choice's log-likelihood computed independently: the sum over the reply's trained tokens,
    # with and without its end token (<|im_end|> for chatml, EOS for plain).
    def loglik(params, choice, with_end):
        ids, mask = render(
            template, tok, Conversation((Message("user", "pick one"), Message("assistant", choice)))
        )
        logp = _log_probs(model, params, ids)
        scored = [i for i in range(1, len(ids)) if mask[i] and (with_end or ids[i] not in stops)]
        return sum(logp[i - 1, ids[i]] for i in scored), tok.decode([ids[i] for i in scored])

    # Which choice an untrained model prefers is arbitrary: take initial weights under which scoring
    # the end token too would pick the other choice, so the test tells the two apart.
    for seed in range(50):
        params = model.init(jax.random.key(seed))
        without_end = [loglik(params, c, False)[0] for c in ("red", "blue")]
        with_end = [loglik(params, c, True)[0] for c in ("red", "blue")]
        if np.argmax(without_end) != np.argmax(with_end):
            break
    else:
        pytest.fail("no seed separates the two scorings")
    assert loglik(params, "red", False)[1] == "red"  # exactly the choice's own tokens are scored
    liked = int(np.argmax(without_end))
    write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"prompt": "pick one", "choices": ["red", "blue"], "answer": liked},
            {"prompt": "pick one", "choices": ["red", "blue"], "answer": 1 - liked},
        ],
    )
    ctx = Context(model, tok, template, stops, seq_len=32, batch_size=4)
    suite = build_suite([TaskSpec("c", "choice", str(tmp_path / "c.jsonl"))], ctx)
    result, samples = suite["c"].run(params)
    assert result == {"eval/c/accuracy": 0.5}
    assert [s["output"] for s in samples] == [["red", "blue"][liked]] * 2


def test_sampled_generations_differ_by_batch_and_eval_step_and_repeat_for_the_same_step(tmp_path):
    tok = train_sentencepiece(["upper: a b c d", "A B C D"] * 20, 300, str(tmp_path / "t.model"))
    model = ModelDef.create(LlamaConfig.tiny(vocab_size=tok.vocab_size))
    params = model.init(jax.random.key(0))
    write_jsonl(tmp_path / "g.jsonl", [{"prompt": "upper: a b", "response": "A B"}] * 2)
    ctx = Context(model, tok, PlainTemplate("\n"), [tok.eos_id], seq_len=32, batch_size=1)
    spec = TaskSpec(
        "g", "generate", str(tmp_path / "g.jsonl"), max_new_tokens=8, sampling=Sampling(5.0, seed=3)
    )
    generate_task = build_suite([spec], ctx)["g"]

    def outputs(step):
        return [s["output"] for s in generate_task.run(params, step)[1]]

    first = outputs(step=3)
    assert first[0] != first[1]  # one prompt, two batches: two different samples
    assert outputs(step=3) == first  # the same seed and step draw the same samples
    assert outputs(step=4) != first  # the next evaluation draws new ones


def test_settings_and_task_specs_come_from_the_config_and_errors_name_the_key(tiny_config):
    config = tiny_config
    config.eval.tasks = ml_collections.ConfigDict(
        {
            "b": task("b.jsonl", "generate", "f1, bleu", max_new_tokens=5, top_k=3, stop_strings="##|\nQ:"),
            "a": task("a.jsonl", "loss", max_examples=7),
        }
    )
    settings, tasks = eval_settings_from_config(config)
    assert settings == EvalSettings(seq_len=32, batch_size=4, max_new_tokens=6)
    assert [t.name for t in tasks] == ["a", "b"]  # sorted by name
    assert tasks[0].kind == "loss" and tasks[0].max_examples == 7
    assert tasks[1].metrics == ("f1", "bleu") and tasks[1].stop_strings == ("##", "\nQ:")
    assert tasks[1].max_new_tokens == 5 and tasks[1].sampling == Sampling(top_k=3)
    config.eval.tasks.b.metrics = "f1,accuracy"
    with pytest.raises(ValueError, match=r"config\.eval\.tasks\.b\.metrics: unknown \['accuracy'\]"):
        eval_settings_from_config(config)
    config.eval.tasks.b.kind = "rank"
    with pytest.raises(ValueError, match=r"config\.eval\.tasks\.b\.kind='rank' is not one of"):
        eval_settings_from_config(config)


def test_context_batch_size_must_split_evenly_over_the_placement():
    with pytest.raises(ValueError, match="multiple of the placement's divisor 4"):
        Context(None, None, None, [], seq_len=8, batch_size=6, placement=BatchPlacement(divisor=4))


def test_evaluation_polls_should_stop_before_every_batch(tiny_config, tmp_path):
    config = tiny_config
    data = build_data(
        config.data, config.seed, str(tmp_path), eval_prompt_limit=config.eval.exact_match_examples
    )
    model = build_model(config.model, data.tokenizer.vocab_size)
    params = model.init(jax.random.key(0))
    evaluation = Evaluation.from_config(config, model, data, BatchPlacement())
    polls = []

    def never_stop():
        polls.append(1)
        return False

    results, samples = evaluation.run(params, 3, should_stop=never_stop)
    assert {"eval/loss", "eval/exact_match", "eval/words/exact_match", "eval/parity/accuracy"} <= set(results)
    assert set(samples) == {"validation", "words", "parity"}
    assert len(polls) >= 4  # every batch of the validation split and of each task

    def stop_at_third_poll():
        polls.append(1)
        return len(polls) == 3

    polls.clear()
    with pytest.raises(Interrupted, match="evaluation at step 6 interrupted"):
        evaluation.run(params, 6, should_stop=stop_at_third_poll)
    assert len(polls) == 3  # nothing placed after the stop
    assert evaluation.run(params, 3) == (results, samples)  # the hook is gone; the same numbers


def test_demo_suite_runs_in_training_and_the_best_checkpoint_is_the_best_eval(tiny_config, tmp_path):
    tiny_config.train.steps = 12
    tiny_config.train.eval_every_steps = 3
    tiny_config.train.best_metric = "eval/loss"
    tiny_config.train.best_mode = "min"
    tiny_config.optim.lr = 3e-3
    summary = train_and_evaluate(tiny_config, str(tmp_path))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if "eval/words/exact_match" in r}
    assert sorted(evals) == [0, 3, 6, 9, 12]
    for r in evals.values():
        assert {"eval/words/rouge_l", "eval/words/bleu", "eval/parity/accuracy", "eval/loss"} <= set(r)
    best_step = min(evals, key=lambda s: evals[s]["eval/loss"])
    record = json.loads((tmp_path / "checkpoints" / "best.json").read_text())
    assert record["step"] == best_step == summary["best_step"]
    assert str(best_step) in os.listdir(tmp_path / "checkpoints")  # kept out of the keep-N rotation
    assert not os.path.exists(tmp_path / "checkpoints_best")  # no second copy of the state
    assert (tmp_path / "words" / "samples" / "step_000012.jsonl").exists()
    assert (tmp_path / "parity" / "samples" / "step_000012.jsonl").exists()


def test_early_stopping_after_patience_evals_without_improvement(tiny_config, tmp_path):
    tiny_config.train.steps = 60
    tiny_config.train.eval_every_steps = 2
    tiny_config.train.best_metric = "eval/loss"
    tiny_config.train.best_mode = "max"  # "higher loss is better": improves only by chance, so it stops early
    tiny_config.train.early_stopping_patience = 2
    tiny_config.eval.tasks = ml_collections.ConfigDict()
    summary = train_and_evaluate(tiny_config, str(tmp_path))
    assert summary["steps"] < 60
    record = json.loads((tmp_path / "checkpoints" / "best.json").read_text())
    assert record["evals_since_best"] == 2
