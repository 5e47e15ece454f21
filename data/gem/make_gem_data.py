"""Generate the GEM study's data (deterministic): `python data/gem/make_gem_data.py`.

Three tasks where every prompt has many correct answers, so a model can be right in many ways:

  even    "name an even number below 40"    any even number in [0, 40)
  after   "name a letter after m"           any letter after m
  start   "name a word starting with k"     any 3 letters starting with k (space-separated)

`train.jsonl` is small on purpose (48 prompts, 3 sampled answers each): trained for many epochs, plain
cross-entropy memorises those answers (the overfitting GEM is meant to reduce). `val.jsonl` holds 32
other prompts with one answer each (the validation loss), and `prompts.jsonl` the same 32 prompts with
every correct answer listed (`answers`), against which `python -m jsft.study gem` checks each sample.
"""

import json
import os
import random
import string

HERE = os.path.dirname(os.path.abspath(__file__))
LETTERS = string.ascii_lowercase


def prompt(task: str, param) -> str:
    return {
        "even": f"name an even number below {param}",
        "after": f"name a letter after {param}",
        "start": f"name a word starting with {param}",
    }[task]


def answer(task: str, param, rng: random.Random) -> str:
    if task == "even":
        return str(rng.randrange(0, param, 2))
    if task == "after":
        return rng.choice(LETTERS[LETTERS.index(param) + 1 :])
    return " ".join(param + "".join(rng.choice(LETTERS) for _ in range(2)))


def answers(task: str, param) -> list[str]:
    """Every correct answer."""
    if task == "even":
        return [str(n) for n in range(0, param, 2)]
    if task == "after":
        return list(LETTERS[LETTERS.index(param) + 1 :])
    return [" ".join(param + a + b) for a in LETTERS for b in LETTERS]


def all_prompts() -> list[tuple[str, object]]:
    return (
        [("even", n) for n in range(12, 100, 2)]
        + [("after", c) for c in LETTERS[:20]]
        + [("start", c) for c in LETTERS]
    )


def main():
    rng = random.Random(0)
    pool = all_prompts()
    rng.shuffle(pool)
    train_prompts, val_prompts = pool[:48], pool[48:80]
    train = [
        {"prompt": prompt(t, p), "response": answer(t, p, rng), "task": t}
        for t, p in train_prompts
        for _ in range(3)
    ]
    rng.shuffle(train)
    val = [{"prompt": prompt(t, p), "response": answer(t, p, rng), "task": t} for t, p in val_prompts]
    checks = [{"prompt": prompt(t, p), "task": t, "answers": answers(t, p)} for t, p in val_prompts]
    for name, rows in (("train", train), ("val", val), ("prompts", checks)):
        with open(os.path.join(HERE, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
