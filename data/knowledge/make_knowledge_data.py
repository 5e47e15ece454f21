"""The knowledge-injection study's data, deterministic: `python data/knowledge/make_knowledge_data.py`.

Fictional people (no model can know them), each with four facts: home town, occupation, birth year and
instrument. `KNOWN` people stand for what a pretrained model already knows: their documents and their
question/answer pairs in every phrasing are in every condition's training data, so every model learns
the question format and how documents map to answers. The `NEW` people are the new knowledge: their
documents are in every condition; how their question/answer pairs cover their facts is what differs.

  docs.jsonl             3 documents per person ({"text": ...}; facts in varied sentences and order)
  qa_docs_only.jsonl     the known people's questions only (the new facts are in the documents alone)
  qa_token1.jsonl        + (new facts) questions drawn at random with replacement ("token-based": as
                         many pairs as fact1, but uneven coverage: some facts get none, some several)
  qa_token3.jsonl        + 3 x (new facts) such questions (as many pairs as fact3)
  qa_fact1.jsonl         + one question per new fact ("fact-based", coverage 1)
  qa_fact3.jsonl         + three questions per new fact, in three different phrasings (coverage 3)
  eval_new.jsonl         every new fact asked in the 2 held-out phrasings (never trained on for new people)
  eval_known.jsonl       the known people in the held-out phrasings (the format check)
  tokenizer.model        one SentencePiece tokenizer for every condition (trained on docs + qa_fact3)
  coverage.json          per held-out question: how many pairs each condition has about its fact
  stats.json             counts: facts, pairs, coverage of the token-based sets
  by_coverage.py         (not generated) exact match by coverage, from a finished sweep's samples
"""

import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = sys.argv[1] if len(sys.argv) > 1 else HERE  # an argument: write there instead (tests)
KNOWN, NEW = 60, 40

SYLLABLES = "ka lo mi ren ta vo shi dun pe ra zul fen mo ther quin bal sor ith gar nel vex or ul tam".split()
OCCUPATIONS = [
    *"glassblower cartographer beekeeper astronomer clockmaker weaver potter ferryman bookbinder".split(),
    *"falconer tailor blacksmith herbalist mapmaker sailor baker miller carpenter mason".split(),
    "lighthouse keeper",
]
INSTRUMENTS = "lute harp flute drum fiddle oboe zither cello horn bagpipe organ lyre".split()

DOC_SENTENCES = {
    "city": ["{n} was born in {v}.", "{n} grew up in the town of {v}.", "The home town of {n} is {v}."],
    "job": ["{n} works as {v}.", "By trade, {n} is {v}.", "{n} earns a living as {v}."],
    "year": [
        "{n} was born in the year {v}.",
        "{n} came into the world in {v}.",
        "The birth year of {n} is {v}.",
    ],
    "music": [
        "{n} plays the {v}.",
        "In the evenings {n} plays the {v}.",
        "The instrument of {n} is the {v}.",
    ],
}
# Per attribute: four training phrasings, then two held out (asked of the new people only at eval).
QUESTIONS = {
    "city": [
        "Where was {n} born?",
        "What is the home town of {n}?",
        "In which town did {n} grow up?",
        "Name the town {n} comes from.",
        "Which town is {n} from?",
        "{n} was born in which town?",
    ],
    "job": [
        "What does {n} do for a living?",
        "What is the occupation of {n}?",
        "What is {n} by trade?",
        "Name the trade of {n}.",
        "What job does {n} have?",
        "{n} works as what?",
    ],
    "year": [
        "In what year was {n} born?",
        "What is the birth year of {n}?",
        "When was {n} born?",
        "Name the year {n} was born.",
        "Which year was {n} born in?",
        "{n} was born in which year?",
    ],
    "music": [
        "Which instrument does {n} play?",
        "What instrument is {n} known for?",
        "What does {n} play in the evenings?",
        "Name the instrument of {n}.",
        "What instrument does {n} play?",
        "{n} plays which instrument?",
    ],
}
TRAIN_PHRASINGS, HELD_OUT = 4, 2


def name(rng: random.Random, used: set) -> str:
    while True:
        first = "".join(rng.choice(SYLLABLES) for _ in range(2)).capitalize()
        last = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
        if (full := f"{first} {last}") not in used:
            used.add(full)
            return full


def people(rng: random.Random, count: int, used: set, towns: list[str]) -> list[dict]:
    return [
        {
            "name": name(rng, used),
            "city": rng.choice(towns),
            "job": rng.choice(OCCUPATIONS),
            "year": str(rng.randint(1850, 1999)),
            "music": rng.choice(INSTRUMENTS),
        }
        for _ in range(count)
    ]


def document(rng: random.Random, person: dict) -> str:
    value = {**person, "job": ("an " if person["job"][0] in "aeiou" else "a ") + person["job"]}
    sentences = [rng.choice(DOC_SENTENCES[a]).format(n=person["name"], v=value[a]) for a in QUESTIONS]
    rng.shuffle(sentences)
    return " ".join(sentences)


def qa(person: dict, attribute: str, phrasing: int) -> dict:
    return {"prompt": QUESTIONS[attribute][phrasing].format(n=person["name"]), "response": person[attribute]}


def write(path: str, rows: list[dict]) -> None:
    with open(os.path.join(OUT, path), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    rng = random.Random(0)
    used: set = set()
    towns = sorted({name(rng, used).split()[1] for _ in range(16)})
    known, new = people(rng, KNOWN, used, towns), people(rng, NEW, used, towns)
    docs = [{"text": document(rng, p)} for p in known + new for _ in range(3)]
    rng.shuffle(docs)
    every = range(TRAIN_PHRASINGS + HELD_OUT)
    known_qa = [qa(p, a, i) for p in known for a in QUESTIONS for i in every]
    facts = [(p, a) for p in new for a in QUESTIONS]
    fact1 = [qa(p, a, rng.randrange(TRAIN_PHRASINGS)) for p, a in facts]
    fact3 = [qa(p, a, i) for p, a in facts for i in rng.sample(range(TRAIN_PHRASINGS), 3)]
    drawn = {n: [rng.randrange(len(facts)) for _ in range(n * len(facts))] for n in (1, 3)}
    token = {n: [qa(*facts[k], rng.randrange(TRAIN_PHRASINGS)) for k in drawn[n]] for n in (1, 3)}
    for name_, rows in (
        ("qa_docs_only", []),
        ("qa_token1", token[1]),
        ("qa_token3", token[3]),
        ("qa_fact1", fact1),
        ("qa_fact3", fact3),
    ):
        mixed = known_qa + rows
        random.Random(1).shuffle(mixed)
        write(f"{name_}.jsonl", mixed)
    write("docs.jsonl", docs)
    held_out = range(TRAIN_PHRASINGS, TRAIN_PHRASINGS + HELD_OUT)
    write("eval_new.jsonl", [qa(p, a, i) for p, a in facts for i in held_out])
    pairs = {"docs_only": [0] * len(facts), "fact1": [1] * len(facts), "fact3": [3] * len(facts)}
    pairs.update({f"token{n}": [drawn[n].count(k) for k in range(len(facts))] for n in (1, 3)})
    coverage = {
        qa(p, a, i)["prompt"]: {c: counts[k] for c, counts in pairs.items()}
        for k, (p, a) in enumerate(facts)
        for i in held_out
    }
    with open(os.path.join(OUT, "coverage.json"), "w") as f:
        lines = (f"{json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in sorted(coverage.items()))
        f.write("{\n" + ",\n".join(lines) + "\n}\n")
    write("eval_known.jsonl", [qa(p, a, i) for p in known[:20] for a in QUESTIONS for i in held_out])
    stats = {
        "known_people": KNOWN,
        "new_people": NEW,
        "new_facts": len(facts),
        "pairs": {
            "known": len(known_qa),
            "token1": len(token[1]),
            "token3": len(token[3]),
            "fact1": len(fact1),
            "fact3": len(fact3),
        },
        **{f"token{n}_facts_covered": len(set(drawn[n])) / len(facts) for n in (1, 3)},
        **{f"token{n}_max_pairs_per_fact": max(drawn[n].count(k) for k in drawn[n]) for n in (1, 3)},
    }
    with open(os.path.join(OUT, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
        f.write("\n")
    sys.path.insert(0, os.path.join(HERE, "..", ".."))
    from jsft.data.tokenizer import train_sentencepiece  # noqa: PLC0415

    texts = [d["text"] for d in docs] + [f"{r['prompt']}\n{r['response']}" for r in known_qa + fact3]
    train_sentencepiece(texts, 512, os.path.join(OUT, "tokenizer.model"))
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
