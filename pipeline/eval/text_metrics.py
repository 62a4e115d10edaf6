"""ROUGE-1/2/L and BLEU-4 of generated answers against references, scored as the ChatGLM3 / GLM-4
fine-tuning demos score them: both texts segmented into words with jieba, ROUGE F1 from the
rouge_chinese package on the space-joined words, sentence BLEU-4 from nltk with smoothing method 3,
each averaged over the samples.

The libraries are the `eval` extra (pip install -e ".[eval]"); they are imported when scoring
starts.
"""

from __future__ import annotations

import importlib
import logging
import warnings

from pipeline.errors import UserError

METRICS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


def _libraries():
    """(jieba, rouge_chinese.Rouge, nltk's sentence_bleu, SmoothingFunction), or one sentence naming
    the install."""
    try:
        with (
            warnings.catch_warnings()
        ):  # jieba's import warns about pkg_resources, and older code about escapes
            warnings.simplefilter("ignore")
            jieba = importlib.import_module("jieba")
            rouge = importlib.import_module("rouge_chinese")
            bleu = importlib.import_module("nltk.translate.bleu_score")
    except ImportError as e:
        raise UserError(
            f"scoring generated answers needs jieba, rouge-chinese and nltk ({e.name} is missing); "
            'install them with pip install -e ".[eval]".'
        ) from e
    jieba.setLogLevel(logging.WARNING)  # its dictionary-loading notes are not the run's business
    return jieba, rouge.Rouge, bleu.sentence_bleu, bleu.SmoothingFunction


def check_installed() -> None:
    """Stop now, in one sentence, when the scoring libraries are missing (not after hours of
    training)."""
    _libraries()


def score_texts(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2, ROUGE-L (F1) and BLEU-4 over the pairs, each x100 (0-100), plus
    "samples" (pairs scored), "empty_predictions" and "empty_references" (pairs where one side has
    no words: rouge_chinese refuses those, so they score 0 on every metric and still count in the
    means).

    Identical texts of 4 words or more score 100 (ROUGE as 99.9999995: rouge_chinese adds 1e-8 to
    its F1 denominator); shorter ones score what the metrics define: a one-word answer has no word
    pairs, so its ROUGE-2 is 0 and its smoothed BLEU-4 35.36."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no pairs to score")
    jieba, rouge_class, sentence_bleu, smoothing = _libraries()
    rouge, smooth = rouge_class(), smoothing().method3
    totals = dict.fromkeys(METRICS, 0.0)
    empty = {"empty_predictions": 0, "empty_references": 0}
    for prediction, reference in zip(predictions, references):
        hypothesis, label = list(jieba.cut(prediction)), list(jieba.cut(reference))
        if not "".join(hypothesis).strip() or not "".join(label).strip():
            empty[
                "empty_predictions" if not "".join(hypothesis).strip() else "empty_references"
            ] += 1
            continue
        scores = rouge.get_scores(" ".join(hypothesis), " ".join(label))[0]
        for name in METRICS[:3]:
            totals[name] += scores[name]["f"] * 100
        totals["bleu-4"] += sentence_bleu([label], hypothesis, smoothing_function=smooth) * 100
    n = len(predictions)
    return {**{name: total / n for name, total in totals.items()}, "samples": n, **empty}
