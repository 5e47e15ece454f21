"""Generate the bundled demo SFT data (deterministic): `python data/demo/make_demo_data.py`.

It also writes `data/demo_lora/` (configs/demo_lora.py): two tasks the demo model never saw,
`rotate` (the first letter moves to the end) and `double` (every letter twice), taught with LoRA.

Five small instruction tasks whose answers can be checked exactly and that need an algorithm, not
recall: the validation split uses words and operand pairs that never occur in training. Letters are
written space-separated so that every letter is its own token whatever the tokenizer.
"""

import json
import os
import random
import string

HERE = os.path.dirname(os.path.abspath(__file__))


def word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def spaced(s: str) -> str:
    return " ".join(s)


def is_val_key(key: str) -> bool:
    # A fixed hash split (not Python's salted hash()): about 1 key in 8 is reserved for validation.
    return sum((i + 1) * ord(c) for i, c in enumerate(key)) % 8 == 0


TASKS = {
    "upper": lambda r: (lambda w: (w, f"upper: {spaced(w)}", spaced(w.upper())))(word(r, 3, 7)),
    "reverse": lambda r: (lambda w: (w, f"reverse: {spaced(w)}", spaced(w[::-1])))(word(r, 3, 6)),
    "sort": lambda r: (lambda w: (w, f"sort: {spaced(w)}", spaced("".join(sorted(w)))))(word(r, 3, 6)),
    "parity": lambda r: (lambda n: (str(n), f"is {n} even or odd?", "even" if n % 2 == 0 else "odd"))(
        r.randint(0, 9999)
    ),
    "add": lambda r: (lambda a, b: (f"{a}+{b}", f"add {a} and {b}", str(a + b)))(
        r.randint(0, 99), r.randint(0, 99)
    ),
}


def generate(n: int, want_val: bool, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        name = rng.choice(sorted(TASKS))
        key, prompt, response = TASKS[name](rng)
        if is_val_key(f"{name}:{key}") == want_val and prompt not in seen:  # no exact duplicates
            seen.add(prompt)
            out.append({"prompt": prompt, "response": response, "task": name})
    return out


def eval_sets() -> dict[str, list[dict]]:
    """Two held-out eval tasks (keys never seen in training): word transforms scored on generated
    text, and even/odd scored by the log-likelihood of each choice (no generation)."""
    words = [r for r in generate(2000, True, 2) if r["task"] in ("upper", "reverse", "sort")][:150]
    parity = []
    for r in generate(4000, True, 3):
        if r["task"] == "parity" and len(parity) < 150:
            choices = ["even", "odd"]
            parity.append({"prompt": r["prompt"], "choices": choices, "answer": choices.index(r["response"])})
    return {
        "eval_words": [{"prompt": r["prompt"], "response": r["response"]} for r in words],
        "eval_parity_choice": parity,
    }


LORA_TASKS = {
    "rotate": lambda r: (lambda w: (w, f"rotate: {spaced(w)}", spaced(w[1:] + w[0])))(word(r, 3, 6)),
    "double": lambda r: (lambda w: (w, f"double: {spaced(w)}", spaced("".join(c + c for c in w))))(
        word(r, 2, 5)
    ),
}


def write(directory: str, sets: dict[str, list[dict]]) -> None:
    os.makedirs(directory, exist_ok=True)
    for name, records in sets.items():
        with open(os.path.join(directory, f"{name}.jsonl"), "w") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")


def main():
    write(HERE, {"train": generate(20000, False, 0), "val": generate(500, True, 1), **eval_sets()})
    TASKS.clear()
    TASKS.update(LORA_TASKS)
    lora = os.path.join(os.path.dirname(HERE), "demo_lora")
    write(lora, {"train": generate(4000, False, 10), "val": generate(300, True, 11)})


if __name__ == "__main__":
    main()
