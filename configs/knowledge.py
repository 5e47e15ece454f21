"""Knowledge injection (issue 14's showcase; Mecklenburg et al. 2024, arXiv 2404.00213): a tiny model
learns the facts of fictional people from documents alone or from documents plus question/answer pairs
that cover the facts in different ways, and is asked about every new fact in held-out phrasings.

    python data/knowledge/make_knowledge_data.py        # regenerates data/knowledge/ byte for byte
    python -m jsft.main --config configs/knowledge.py:fact3 --workdir /tmp/knowledge_fact3
    python -m jsft.sweep --sweep configs/sweeps/knowledge_injection.py --dir /tmp/knowledge --workers 2

The argument picks the question/answer file (the condition): docs_only | token1 | fact1 | token3 | fact3
(the default); see data/knowledge/make_knowledge_data.py. Every condition trains the same number of tokens
(steps x batch x sequence length, packed) with one shared tokenizer, so only the data's coverage of the
new facts differs. `eval/new/exact_match` is the measure.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import demo  # noqa: E402

DATA_DIR = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "knowledge")
)
CONDITIONS = ("docs_only", "token1", "fact1", "token3", "fact3")
ARGS = (None, "docs_only")


def qa_file(condition: str) -> str:
    return os.path.join(DATA_DIR, f"qa_{condition}.jsonl")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, *CONDITIONS):
        raise ValueError(f"configs/knowledge.py: unknown argument {arg!r} (known: {CONDITIONS})")
    config = demo.get_config()
    config.data.sources = ml_collections.ConfigDict(
        {
            "docs": demo.source(os.path.join(DATA_DIR, "docs.jsonl")),
            "qa": demo.source(qa_file(arg or "fact3"), os.path.join(DATA_DIR, "eval_new.jsonl")),
        }
    )
    config.data.mixture = "examples"  # the union of the two files: each record as often as any other
    config.data.tokenizer = os.path.join(DATA_DIR, "tokenizer.model")
    config.data.batch_size = 32
    config.data.seq_len = 128
    config.optim.lr = 3e-3
    config.optim.warmup_steps = 20
    config.train.steps = 300
    config.train.eval_every_steps = 100
    config.train.checkpoint_every_steps = 100
    config.train.best_metric = "eval/new/exact_match"
    config.eval.exact_match_examples = 0  # the tasks below ask the questions
    config.eval.max_new_tokens = 8
    config.eval.tasks = ml_collections.ConfigDict(
        {
            "new": demo.task(os.path.join(DATA_DIR, "eval_new.jsonl"), "generate", max_examples=320),
            "known": demo.task(os.path.join(DATA_DIR, "eval_known.jsonl"), "generate", max_examples=160),
        }
    )
    for t in config.eval.tasks.values():
        t.max_new_tokens = 8
    return config
