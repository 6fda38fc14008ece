"""Metrics against values computed by hand on small fixtures."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pf2lora_ray import metrics


def test_accuracy_hand_computed() -> None:
    # matches at positions 0, 1, 3 -> 3 / 5
    assert metrics.accuracy(np.array([0, 1, 1, 0, 1]), np.array([0, 1, 0, 0, 0])) == 0.6


def test_accuracy_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="equal length"):
        metrics.accuracy(np.array([0, 1]), np.array([0, 1, 1]))


def test_mcc_binary_hand_computed() -> None:
    preds = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    labels = np.array([1, 1, 0, 0, 0, 1, 1, 0])
    # TP = {0, 1, 6} = 3, FP = {2} = 1, FN = {5} = 1, TN = {3, 4, 7} = 3
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (9 - 1) / sqrt(4^4) = 0.5
    assert metrics.matthews_corrcoef(preds, labels) == pytest.approx(0.5)


def test_mcc_multiclass_gorodkin_hand_computed() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([0, 1, 1, 1, 2, 0])
    # confusion (rows true, cols predicted): [[1,1,0],[0,2,0],[1,0,1]]
    # c = trace = 4, s = 6, t = rows = [2,2,2], p = cols = [2,3,1]
    # t.p = 12, p.p = 14, t.t = 12
    # (c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)) = (24 - 12) / sqrt(22 * 24) = 12 / sqrt(528)
    assert metrics.matthews_corrcoef(preds, labels) == pytest.approx(12 / math.sqrt(528))


def test_mcc_extremes_and_undefined() -> None:
    labels = np.array([0, 1, 0, 1])
    assert metrics.matthews_corrcoef(labels, labels) == pytest.approx(1.0)
    assert metrics.matthews_corrcoef(1 - labels, labels) == pytest.approx(-1.0)
    # one predicted class: s^2 - p.p = 16 - 16 = 0, so undefined -> 0.0
    assert metrics.matthews_corrcoef(np.ones(4, int), labels) == 0.0


def test_f1_binary_hand_computed() -> None:
    preds = np.array([1, 1, 0, 1, 0])
    labels = np.array([1, 0, 0, 1, 1])
    # positive 1: TP = {0, 3} = 2, FP = {1} = 1, FN = {4} = 1 -> 2*2 / (4 + 1 + 1) = 2/3
    assert metrics.f1_binary(preds, labels) == pytest.approx(2 / 3)
    # positive 0: TP = {2} = 1, FP = {4} = 1, FN = {1} = 1 -> 2 / (2 + 1 + 1) = 0.5
    assert metrics.f1_binary(preds, labels, positive=0) == pytest.approx(0.5)
    # no positive predicted or present: 2TP + FP + FN = 0 -> 0.0
    assert metrics.f1_binary(np.zeros(3, int), np.zeros(3, int)) == 0.0


def test_pearson_hand_computed() -> None:
    # dx = [-1.5, -0.5, 0.5, 1.5], dy = [-3, -1, 0, 4]
    # dx.dy = 4.5 + 0.5 + 0 + 6 = 11, dx.dx = 5, dy.dy = 26 -> 11 / sqrt(130)
    x, y = np.array([1, 2, 3, 4]), np.array([2, 4, 5, 9])
    assert metrics.pearson(x, y) == pytest.approx(11 / math.sqrt(130))
    assert metrics.pearson(x, np.full(4, 3.0)) == 0.0


def test_spearman_average_ranks_for_ties() -> None:
    # ranks x = [1, 2.5, 2.5, 4], ranks y = [1, 3, 2, 4]
    # dx = [-1.5, 0, 0, 1.5], dy = [-1.5, 0.5, -0.5, 1.5]
    # dx.dy = 4.5, dx.dx = 4.5, dy.dy = 5 -> 4.5 / sqrt(22.5) = sqrt(0.9)
    x, y = np.array([10, 20, 20, 30]), np.array([1, 3, 2, 4])
    assert metrics.spearman(x, y) == pytest.approx(math.sqrt(0.9))


def test_spearman_is_one_for_monotone_nonlinear() -> None:
    assert metrics.spearman(np.array([1, 2, 3]), np.array([1, 10, 100])) == pytest.approx(1.0)
    assert metrics.pearson(np.array([1, 2, 3]), np.array([1, 10, 100])) < 0.99


def test_bleu_hand_computed_on_0_100_scale() -> None:
    # hyp "the cat sat on the mat" vs ref "the cat sat on a mat" (equal length, BP = 1)
    # clipped n-gram precisions: 1-gram 5/6, 2-gram 3/5, 3-gram 2/4, 4-gram 1/3
    # geometric mean: (5/6 * 3/5 * 2/4 * 1/3)^(1/4) = (1/12)^(1/4) = 0.53728...
    score = metrics.bleu(["the cat sat on the mat"], [["the cat sat on a mat"]])
    assert score == pytest.approx(100 * (1 / 12) ** 0.25)


def test_bleu_variable_number_of_references() -> None:
    # each hypothesis equals one of its references -> every precision is 1 -> 100
    hyps = ["a b c d", "e f g h"]
    refs = [["x y z w", "a b c d"], ["e f g h"]]
    assert metrics.bleu(hyps, refs) == pytest.approx(100.0)


def test_rouge_l_max_over_references_mean_over_examples() -> None:
    # ex 1: vs "the cat sat on the mat": LCS 3, P = 3/3, R = 3/6 -> F = 2/3
    #       vs "cat": LCS 1, P = 1/3, R = 1 -> F = 1/2; max = 2/3
    # ex 2: vs "a c e": LCS "a c" = 2, P = 2/4, R = 2/3 -> F = 4/7
    # mean = (2/3 + 4/7) / 2 = 13/21
    hyps = ["the cat sat", "a b c d"]
    refs = [["the cat sat on the mat", "cat"], ["a c e"]]
    assert metrics.rouge_l(hyps, refs) == pytest.approx(13 / 21)


def test_ter_hand_computed_closest_reference_and_above_100() -> None:
    # one substitution (the -> a) over a 6-word reference: 1/6 of 100
    assert metrics.ter(["the cat sat on the mat"], [["the cat sat on a mat"]]) == pytest.approx(
        100 / 6
    )
    # the hypothesis equals its second reference: no edit, whatever the first says
    assert metrics.ter(["a b c d"], [["a b c d e f g h", "a b c d"]]) == 0.0
    # 2 substitutions + 1 insertion over a 2-word reference
    assert metrics.ter(["x y z"], [["a b"]]) == pytest.approx(150.0)


def test_chrf_bounds_and_best_reference() -> None:
    assert metrics.chrf(["the cat sat"], [["the cat sat"]]) == pytest.approx(100.0)
    assert metrics.chrf(["a b c d"], [["zzzz", "a b c d"]]) == pytest.approx(100.0)
    assert metrics.chrf(["qqq"], [["zzz"]]) == 0.0
    partial = metrics.chrf(["the cat sat on the mat"], [["the cat sat on a mat"]])
    assert 50.0 < partial < 100.0


def test_generation_scores_names_every_metric_and_its_direction() -> None:
    scores = metrics.generation_scores(["the cat sat down"], [["the cat sat down", "a cat"]])
    assert scores == pytest.approx({"bleu": 100.0, "chrf": 100.0, "ter": 0.0, "rouge_l": 1.0})
    assert [metrics.higher_is_better(m) for m in scores] == [True, True, False, True]
    assert metrics.higher_is_better("ter.shared_only") is False


def test_generation_metrics_need_one_reference_list_per_hypothesis() -> None:
    with pytest.raises(ValueError, match="one reference list per hypothesis"):
        metrics.bleu(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match=r"references\[0\]"):
        metrics.rouge_l(["a"], [[]])
    with pytest.raises(ValueError, match="one reference list per hypothesis"):
        metrics.ter([], [])


def test_majority_accuracy() -> None:
    # train majority is 2 (twice); test has 3 of 5 equal to 2
    assert metrics.majority_accuracy(np.array([2, 0, 2, 1]), np.array([2, 2, 0, 1, 2])) == 0.6
    # tie between 0 and 1 in train -> smallest label 0; test has 2 of 3 zeros
    assert metrics.majority_accuracy(np.array([1, 0, 1, 0]), np.array([0, 0, 1])) == (
        pytest.approx(2 / 3)
    )


def test_summarize_hand_computed() -> None:
    values = np.array([0.9, 0.5, 0.7, 0.1])
    # mean = 2.2 / 4 = 0.55; deviations [0.35, -0.05, 0.15, -0.45]
    # population variance = (0.1225 + 0.0025 + 0.0225 + 0.2025) / 4 = 0.0875
    # ceil(4 / 10) = 1 worst client: 0.1 when higher is better, 0.9 when lower is
    up = metrics.summarize(values, higher_is_better=True)
    assert up == pytest.approx(
        {"mean": 0.55, "std": math.sqrt(0.0875), "worst_decile": 0.1, "min": 0.1, "max": 0.9}
    )
    assert metrics.summarize(values, higher_is_better=False)["worst_decile"] == pytest.approx(0.9)


def test_summarize_worst_decile_uses_exact_ceiling() -> None:
    # 11 clients -> ceil(1.1) = 2 worst: mean(0, 1) or mean(9, 10)
    eleven = np.arange(11.0)
    assert metrics.summarize(eleven, True)["worst_decile"] == 0.5
    assert metrics.summarize(eleven, False)["worst_decile"] == 9.5
    # 30 clients -> exactly 3 worst (0.1 * 30 in floats is 3.0000000000000004)
    assert metrics.summarize(np.arange(30.0), True)["worst_decile"] == 1.0


def test_higher_is_better_directions() -> None:
    for name in ("accuracy", "mcc", "f1", "pearson", "spearman", "bleu", "rouge_l"):
        assert metrics.HIGHER_IS_BETTER[name] is True
    assert metrics.HIGHER_IS_BETTER["loss"] is False
    assert metrics.HIGHER_IS_BETTER["mse"] is False


def test_derived_metric_names_take_the_base_direction() -> None:
    assert metrics.higher_is_better("accuracy.shared_only") is True
    assert metrics.higher_is_better("mcc.shared_only") is True
    assert metrics.higher_is_better("loss.shared_only") is False
    assert metrics.higher_is_better("majority_accuracy") is True


def test_aggregate_rows_worst_decile_of_shared_only_accuracy_is_the_lowest() -> None:
    from pf2lora_ray.results import aggregate_rows

    rows = [
        {"client_id": k, "split": "test", "metric": "accuracy.shared_only", "value": v}
        for k, v in enumerate([0.2, 0.9, 0.8])
    ]
    out = {r["metric"]: r["value"] for r in aggregate_rows(rows)}
    assert out["accuracy.shared_only.worst_decile"] == 0.2
