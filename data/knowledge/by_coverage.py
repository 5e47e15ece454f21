"""Exact match on the new facts by how many training pairs covered each fact, per condition, from a
finished knowledge-injection sweep: `python data/knowledge/by_coverage.py SWEEP_DIR`.

Reads each trial's resolved config (its condition) and its last eval samples (new/samples/), and
coverage.json (pairs per fact in each condition); prints a markdown table (mean over seeds).
"""

import collections
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def condition(trial_dir: str) -> str:
    with open(os.path.join(trial_dir, "config.json")) as f:
        path = json.load(f)["data"]["sources"]["qa"]["path"]
    return os.path.splitext(os.path.basename(path))[0].removeprefix("qa_")


def last_samples(trial_dir: str) -> list[dict]:
    samples = os.path.join(trial_dir, "new", "samples")
    with open(os.path.join(samples, sorted(os.listdir(samples))[-1])) as f:
        return [json.loads(line) for line in f]


def bucket(pairs: int) -> str:
    return str(pairs) if pairs < 3 else "3+"


def main(root: str) -> None:
    with open(os.path.join(HERE, "coverage.json")) as f:
        coverage = json.load(f)
    hits: dict = collections.defaultdict(list)  # (condition, bucket) -> [0/1 per question per seed]
    for name in sorted(os.listdir(os.path.join(root, "trials"))):
        trial = os.path.join(root, "trials", name)
        if not os.path.isdir(os.path.join(trial, "new", "samples")):
            continue
        cond = condition(trial)
        for s in last_samples(trial):
            pairs = coverage[s["prompt"].rstrip("\n")][cond]
            hits[(cond, bucket(pairs))].append(s["output"].strip() == s["reference"].strip())
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
