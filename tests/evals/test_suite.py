"""Eval tasks on a tiny model: choice scoring by log-likelihood, generation metrics, best checkpoint."""

import json
import os

import jax
import ml_collections
import numpy as np

from configs.demo import task
from jsft.data.formats import Conversation, Message
from jsft.data.templates import PlainTemplate, render
from jsft.data.tokenizer import train_sentencepiece
from jsft.evals.suite import Context, build_suite
from jsft.models.llama import LlamaConfig
from jsft.models.registry import ModelDef
from jsft.train.loop import train_and_evaluate
from tests.conftest import write_jsonl


def test_choice_scoring_picks_the_choice_the_model_finds_likelier(tmp_path):
    tok = train_sentencepiece(["pick one: red blue", "red", "blue"] * 20, 300, str(tmp_path / "t.model"))
    model = ModelDef.create(LlamaConfig.tiny(vocab_size=tok.vocab_size))
    params = model.init(jax.random.key(0))
    template = PlainTemplate("\n")

    # Which of "red"/"blue" the untrained model prefers is arbitrary: compute it independently
    # (sum of log-probs of the choice tokens) and build the data so the answer needs that choice.
    def loglik(choice):
        ids, mask = render(
            template, tok, Conversation((Message("user", "pick one"), Message("assistant", choice)))
        )
        logits = np.asarray(model.apply(params, np.array([ids[:-1]])))[0]
        logp = (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True)
        )
        return sum(logp[i - 1, ids[i]] for i in range(1, len(ids) - 1) if mask[i])  # EOS excluded

    liked = int(np.argmax([loglik("red"), loglik("blue")]))
    write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"prompt": "pick one", "choices": ["red", "blue"], "answer": liked},
            {"prompt": "pick one", "choices": ["red", "blue"], "answer": 1 - liked},
        ],
    )
    ctx = Context(model, tok, template, [tok.eos_id], seq_len=32, batch_size=4)
    suite = build_suite(ml_collections.ConfigDict({"c": task(str(tmp_path / "c.jsonl"), "choice")}), ctx)
    result, samples = suite["c"].run(params)
    assert result == {"eval/c/accuracy": 0.5}
    assert [s["output"] for s in samples] == [["red", "blue"][liked]] * 2


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
