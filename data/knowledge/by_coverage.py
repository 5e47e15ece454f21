"""Exact match on the new facts by how many training pairs covered each fact, per condition, from a
finished knowledge-injection sweep: `python data/knowledge/by_coverage.py SWEEP_DIR`.

Reads each finished trial's resolved config (its condition) and its final eval samples
(new/samples/step_<train.steps>.jsonl), and coverage.json (pairs per fact in each condition); prints a
markdown table (all seeds pooled). Exact match is jsft's (up to whitespace).
"""

import collections
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
from jsft.evals.metrics import exact_match  # noqa: E402


def condition_and_samples(trial_dir: str) -> tuple[str, list[dict] | None]:
    """(condition, the final evaluation's samples, or None for a trial that did not finish)."""
    with open(os.path.join(trial_dir, "config.json")) as f:
        config = json.load(f)
    path = config["data"]["sources"]["qa"]["path"]
    final = os.path.join(trial_dir, "new", "samples", f"step_{config['train']['steps']:06d}.jsonl")
    samples = None
    if os.path.exists(final):
        with open(final) as f:
            samples = [json.loads(line) for line in f]
    return os.path.splitext(os.path.basename(path))[0].removeprefix("qa_"), samples


def bucket(pairs: int) -> str:
    return str(pairs) if pairs < 3 else "3+"


def main(root: str) -> None:
    with open(os.path.join(HERE, "coverage.json")) as f:
        coverage = json.load(f)
    hits: dict = collections.defaultdict(list)  # (condition, bucket) -> [0/1 per question per seed]
    for name in sorted(os.listdir(os.path.join(root, "trials"))):
        trial = os.path.join(root, "trials", name)
        if not os.path.exists(os.path.join(trial, "config.json")):
            continue
        cond, samples = condition_and_samples(trial)
        for s in samples or []:
            pairs = coverage[s["prompt"].rstrip("\n")][cond]
            hits[(cond, bucket(pairs))].append(exact_match(s["output"], s["reference"]))
    buckets = ["0", "1", "2", "3+"]
    print("| condition | " + " | ".join(f"EM, facts with {b} pairs (n)" for b in buckets) + " |")
    print("|---|" + "---|" * len(buckets))
    for cond in dict.fromkeys(c for c, _ in hits):
        cells = []
        for b in buckets:
            got = hits.get((cond, b), [])
            cells.append(f"{sum(got) / len(got):.3f} ({len(got)})" if got else "")
        print(f"| {cond} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
