"""Generate the Q-SFT study's data (deterministic): `python data/qsft/make_qsft_data.py`.

Subtraction with rewards, where most replies follow one consistent wrong rule (they add), so copying
the most frequent answer is wrong:

  train.jsonl            "subtract a from b" -> b - a (reward 1, 30%) or a + b (reward 0, 70%)
  train_filtered.jsonl   the reward-1 records only (filtered SFT, the reference)
  multiturn.jsonl        two subtractions in one chat; each reply is wrong (adds) with probability 0.5
                         and the only reward, on the last reply, is 1 when both replies are right
  val.jsonl              held-out pairs with the right answer (exact match is the measure)
  val_chat.jsonl         the same as one-turn chats (the multi-turn runs' validation split)
"""

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))


def pair(rng: random.Random) -> tuple[int, int]:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return min(a, b), max(a, b)


def is_val(a: int, b: int) -> bool:
    return (a * 7 + b * 13) % 8 == 0  # about 1 pair in 8 is held out


def draw(rng: random.Random, val: bool) -> tuple[int, int]:
    while True:
        a, b = pair(rng)
        if is_val(a, b) == val:
            return a, b


def main():
    rng = random.Random(0)
    train, filtered, multi = [], [], []
    for _ in range(3000):
        a, b = draw(rng, False)
        right = rng.random() < 0.3
        rec = {
            "prompt": f"subtract {a} from {b}",
            "response": str(b - a if right else a + b),
            "reward": float(right),
        }
        train.append(rec)
        if right:
            filtered.append(rec)
    for _ in range(3000):
        (a, b), (c, d) = draw(rng, False), draw(rng, False)
        ok1, ok2 = rng.random() < 0.5, rng.random() < 0.5
        multi.append(
            {
                "messages": [
                    {"role": "user", "content": f"subtract {a} from {b}"},
                    {"role": "assistant", "content": str(b - a if ok1 else a + b)},
                    {"role": "user", "content": f"subtract {c} from {d}"},
                    {
                        "role": "assistant",
                        "content": str(d - c if ok2 else c + d),
                        "reward": float(ok1 and ok2),
                    },
                ]
            }
        )
    val = []
    for _ in range(200):
        a, b = draw(rng, True)
        val.append({"prompt": f"subtract {a} from {b}", "response": str(b - a)})
    val_chat = [
        {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["response"]},
            ]
        }
        for r in val
    ]
    files = (
        ("train", train),
        ("train_filtered", filtered),
        ("multiturn", multi),
        ("val", val),
        ("val_chat", val_chat),
    )
    for name, rows in files:
        with open(os.path.join(HERE, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
