import pytest
import sacrebleu
from rouge_score import rouge_scorer

from jsft.evals import metrics


def test_squad_exact_match_and_f1_on_hand_computed_cases():
    assert metrics.exact_match("The Eiffel Tower!", "eiffel tower", "squad") == 1.0
    assert metrics.exact_match("The Eiffel Tower!", "eiffel tower") == 0.0  # whitespace-only default
    # pred {paris, france}, ref {paris}: precision 1/2, recall 1 -> F1 2/3
    assert metrics.token_f1("Paris, France", "Paris") == pytest.approx(2 / 3)
    # articles and punctuation vanish; repeated tokens count with multiplicity
    assert metrics.token_f1("the cat the cat", "a cat") == pytest.approx(2 * (1 / 2) * 1 / (1 / 2 + 1))
    assert metrics.token_f1("dog", "cat") == 0.0
    assert metrics.token_f1("", "") == 1.0 and metrics.token_f1("the", "cat") == 0.0


def test_bleu_and_rouge_l_match_the_reference_libraries():
    preds = ["the cat sat on the mat", "a quick brown fox jumps", "hello there general"]
    refs = ["the cat is on the mat", "the quick brown fox jumped", "hello there general kenobi"]
    assert metrics.bleu(preds, refs) == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs, strict=True)) / 3
    assert metrics.rouge_l(preds, refs) == pytest.approx(expected)
    assert metrics.bleu(refs, refs) == pytest.approx(100.0)
    assert metrics.METRICS["exact_match"](["a", "b"], ["a", "c"]) == 0.5
