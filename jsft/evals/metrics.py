"""Text metrics on generated outputs: exact match, SQuAD token F1, BLEU (sacrebleu), ROUGE-L (rouge-score).

Each metric takes lists of predictions and references and returns one number in [0, 1] (BLEU is
reported on sacrebleu's 0-100 scale, as papers do). `METRICS` names them for eval-task configs.
"""

from __future__ import annotations

import collections
import re
import string

from jsft.errors import import_without


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def normalize_squad(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


NORMALIZERS = {"whitespace": normalize_whitespace, "squad": normalize_squad, "none": lambda t: t}


def exact_match(prediction: str, reference: str, normalize: str = "whitespace") -> float:
    """1.0 when the texts agree after normalisation (default: up to whitespace)."""
    norm = NORMALIZERS[normalize]
    return float(norm(prediction) == norm(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token-overlap F1 of the normalised texts (1.0 when both are empty)."""
    pred, ref = normalize_squad(prediction).split(), normalize_squad(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if not common:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, exponential smoothing), 0-100."""
    import sacrebleu  # noqa: PLC0415

    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure (rouge-score, with stemming)."""
    # nltk (for its Porter stemmer) tries scipy.stats at import: 1.4 s of every evaluating run's start.
    rouge_scorer = import_without("rouge_score.rouge_scorer", ("scipy.stats",))

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    return float(sum(scores) / max(len(scores), 1))


def _mean(fn):
    return lambda preds, refs: sum(fn(p, r) for p, r in zip(preds, refs, strict=True)) / max(len(preds), 1)


# Corpus-level metrics over (predictions, references).
METRICS = {
    "exact_match": _mean(exact_match),
    "exact_match_squad": _mean(lambda p, r: exact_match(p, r, "squad")),
    "f1": _mean(token_f1),
    "bleu": bleu,
    "rouge_l": rouge_l,
}
