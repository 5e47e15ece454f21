"""Eval tasks on a tiny model: choice scoring by log-likelihood, generation metrics, best checkpoint."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from configs.demo import task
from jsft.data.formats import Conversation, Message
from jsft.data.templates import PlainTemplate, build_template, render, stop_ids
from jsft.data.tokenizer import train_sentencepiece
from jsft.evals.suite import Context, build_suite
from jsft.models.llama import LlamaConfig
from jsft.models.registry import ModelDef
from jsft.train.loop import train_and_evaluate
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
    suite = build_suite(ml_collections.ConfigDict({"c": task(str(tmp_path / "c.jsonl"), "choice")}), ctx)
    result, samples = suite["c"].run(params)
    assert result == {"eval/c/accuracy": 0.5}
    assert [s["output"] for s in samples] == [["red", "blue"][liked]] * 2


def test_sampled_generations_differ_by_batch_and_eval_step_and_repeat_for_the_same_step(tmp_path):
    tok = train_sentencepiece(["upper: a b c d", "A B C D"] * 20, 300, str(tmp_path / "t.model"))
    model = ModelDef.create(LlamaConfig.tiny(vocab_size=tok.vocab_size))
    params = model.init(jax.random.key(0))
    write_jsonl(tmp_path / "g.jsonl", [{"prompt": "upper: a b", "response": "A B"}] * 2)
    ctx = Context(model, tok, PlainTemplate("\n"), [tok.eos_id], seq_len=32, batch_size=1)
    cfg = task(str(tmp_path / "g.jsonl"), "generate", max_new_tokens=8, temperature=5.0, seed=3)
    generate_task = build_suite(ml_collections.ConfigDict({"g": cfg}), ctx)["g"]

    def outputs(step):
        return [s["output"] for s in generate_task.run(params, step)[1]]

    first = outputs(step=3)
    assert first[0] != first[1]  # one prompt, two batches: two different samples
    assert outputs(step=3) == first  # the same seed and step draw the same samples
    assert outputs(step=4) != first  # the next evaluation draws new ones


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
    record = json.loads((tmp_path / "checkpoints_best" / "best.json").read_text())
    assert record["step"] == best_step == summary["best_step"]
    assert os.listdir(tmp_path / "checkpoints_best") and str(best_step) in os.listdir(
        tmp_path / "checkpoints_best"
    )
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
    record = json.loads((tmp_path / "checkpoints_best" / "best.json").read_text())
    assert record["evals_since_best"] == 2
