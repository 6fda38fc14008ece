"""Evaluation metrics and per-client summaries, in plain numpy.

Classification and regression metrics take 1-D array-likes of equal, non-zero
length and return a Python float. Correlation-type metrics (mcc, pearson,
spearman) return 0.0 where they are undefined (a constant input), the
convention scikit-learn uses for MCC, so that per-client summaries stay finite.
Generation metrics import sacrebleu / rouge_score only when called.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

HIGHER_IS_BETTER: dict[str, bool] = {
    "accuracy": True,
    "mcc": True,
    "f1": True,
    "pearson": True,
    "spearman": True,
    "bleu": True,
    "chrf": True,
    "ter": False,
    "rouge_l": True,
    "loss": False,
    "mse": False,
}


def higher_is_better(metric: str) -> bool:
    """Whether a higher value of a per-client metric is better, for picking the worst clients.

    A derived name takes its base metric's direction: ``accuracy.shared_only`` (PF2LoRA's
    diagnostic with the personal level off) is an accuracy. ``majority_accuracy`` counts as
    an accuracy; names with no direction (the norms ``norm_C``, ``norm_D``) count as lower.
    """
    base = metric.split(".", 1)[0]
    return HIGHER_IS_BETTER.get(base, base.endswith("accuracy"))


def _pair(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Return `a`, `b` as 1-D arrays after checking they have equal, non-zero length."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 1 or b.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError(
            f"{names[0]} and {names[1]} must be non-empty 1-D arrays of equal length; "
            f"got shapes {a.shape} and {b.shape}"
        )
    return a, b


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of positions where `preds` equals `labels`, in [0, 1]."""
    preds, labels = _pair(preds, labels, ("preds", "labels"))
    return float(np.mean(preds == labels))


def matthews_corrcoef(preds: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation coefficient, binary or multiclass (Gorodkin 2004).

    With confusion matrix C (rows true, columns predicted), c = trace(C),
    s = total, t = row sums, p = column sums:

        MCC = (c * s - t . p) / sqrt((s^2 - p . p) * (s^2 - t . t))

    which for two classes equals (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)).

    Returns:
        A value in [-1, 1]; 0.0 when the denominator is zero (only one class
        predicted or present).
    """
    preds, labels = _pair(preds, labels, ("preds", "labels"))
    classes, codes = np.unique(np.concatenate([labels, preds]), return_inverse=True)
    true_codes, pred_codes = codes[: labels.size], codes[labels.size :]
    confusion = np.zeros((classes.size, classes.size), dtype=np.float64)
    np.add.at(confusion, (true_codes, pred_codes), 1.0)
    t, p = confusion.sum(axis=1), confusion.sum(axis=0)
    c, s = np.trace(confusion), confusion.sum()
    denominator = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / denominator) if denominator > 0 else 0.0


def f1_binary(preds: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    """F1 of the `positive` class: 2 TP / (2 TP + FP + FN); 0.0 when TP + FP + FN = 0."""
    preds, labels = _pair(preds, labels, ("preds", "labels"))
    predicted, actual = preds == positive, labels == positive
    tp = np.sum(predicted & actual)
    fp = np.sum(predicted & ~actual)
    fn = np.sum(~predicted & actual)
    denominator = 2 * tp + fp + fn
    return float(2 * tp / denominator) if denominator > 0 else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation in float64; 0.0 when either input is constant."""
    x, y = _pair(x, y, ("x", "y"))
    dx = x.astype(np.float64) - np.mean(x, dtype=np.float64)
    dy = y.astype(np.float64) - np.mean(y, dtype=np.float64)
    denominator = np.sqrt((dx @ dx) * (dy @ dy))
    return float(dx @ dy / denominator) if denominator > 0 else 0.0


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of the ranks they span."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)
    return (last_rank - (counts - 1) / 2.0)[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation: Pearson of average ranks (ties share a rank)."""
    x, y = _pair(x, y, ("x", "y"))
    return pearson(_average_ranks(x), _average_ranks(y))


def _check_generation(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    """Check one non-empty reference list per hypothesis."""
    if len(hypotheses) == 0 or len(hypotheses) != len(references):
        raise ValueError(
            "need one reference list per hypothesis and at least one hypothesis; "
            f"got {len(hypotheses)} hypotheses and {len(references)} reference lists"
        )
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references[{i}] must be a non-empty list of strings, got {refs!r}")


def _streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu's reference *streams*: one string per example each, None where an example
    has fewer references than the most."""
    width = max(len(refs) for refs in references)
    return [[refs[j] if j < len(refs) else None for refs in references] for j in range(width)]


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU via sacrebleu's `corpus_bleu` with its default settings.

    Args:
        hypotheses: One generated string per example.
        references: For each example, a non-empty list of reference strings
            (examples may have different numbers of references).

    Returns:
        BLEU on sacrebleu's 0-100 scale (the PF2LoRA paper prints 0-1: divide by 100).
    """
    import sacrebleu

    _check_generation(hypotheses, references)
    return float(sacrebleu.corpus_bleu(list(hypotheses), _streams(references)).score)


def chrf(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus chrF (character 6-grams, beta 2) via sacrebleu's `corpus_chrf`, 0-100.

    With several references sacrebleu scores each example against its best one.
    """
    import sacrebleu

    _check_generation(hypotheses, references)
    return float(sacrebleu.corpus_chrf(list(hypotheses), _streams(references)).score)


def ter(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus translation edit rate via sacrebleu's `corpus_ter`, in percent (lower is better).

    Edits to the closest reference over the mean reference length, x 100; it can
    exceed 100 when a hypothesis is much longer than its references.
    """
    import sacrebleu

    _check_generation(hypotheses, references)
    return float(sacrebleu.corpus_ter(list(hypotheses), _streams(references)).score)


def generation_scores(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, float]:
    """``bleu``, ``chrf``, ``ter`` (sacrebleu, 0-100) and ``rouge_l`` (rouge-score, 0-1)."""
    return {
        "bleu": bleu(hypotheses, references),
        "chrf": chrf(hypotheses, references),
        "ter": ter(hypotheses, references),
        "rouge_l": rouge_l(hypotheses, references),
    }


def rouge_l(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], use_stemmer: bool = False
) -> float:
    """Mean over examples of the best ROUGE-L F-measure against that example's references.

    Args:
        hypotheses: One generated string per example.
        references: For each example, a non-empty list of reference strings.
        use_stemmer: Passed to `rouge_score.rouge_scorer.RougeScorer`.

    Returns:
        A value on the 0-1 scale.
    """
    from rouge_score import rouge_scorer

    _check_generation(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    best = [
        max(scorer.score(ref, hyp)["rougeL"].fmeasure for ref in refs)
        for hyp, refs in zip(hypotheses, references, strict=True)
    ]
    return float(np.mean(best))


def majority_accuracy(train_labels: np.ndarray, test_labels: np.ndarray) -> float:
    """Accuracy on `test_labels` of always predicting the most frequent train label.

    Ties between train labels go to the smallest label. This is the baseline a
    personalized model must beat on label-skewed splits.
    """
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    if train_labels.size == 0 or test_labels.size == 0:
        raise ValueError(
            "majority_accuracy needs non-empty train and test labels; "
            f"got {train_labels.size} and {test_labels.size}"
        )
    values, counts = np.unique(train_labels, return_counts=True)
    majority = values[np.argmax(counts)]  # np.unique sorts, argmax takes the first max
    return float(np.mean(test_labels == majority))


def summarize(values: np.ndarray, higher_is_better: bool) -> dict[str, float]:
    """Summarize one metric over clients.

    Args:
        values: One value per client (1-D, non-empty).
        higher_is_better: Direction of the metric; decides which clients are worst.

    Returns:
        Dict with "mean", "std" (population, ddof=0), "worst_decile" (mean of
        the worst ceil(n / 10) clients, at least one), "min" and "max".
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"values must be a non-empty 1-D array, got shape {values.shape}")
    num_worst = max(1, -(-values.size // 10))  # integer ceil(n / 10), no float rounding
    ascending = np.sort(values)
    worst = ascending[:num_worst] if higher_is_better else ascending[-num_worst:]
    return {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=0)),
        "worst_decile": float(worst.mean()),
        "min": float(values.min()),
        "max": float(values.max()),
    }
