"""Pure classification metrics on hand-made and synthetic tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from compactml.errors import CompactMLError
from compactml.evaluate.classification import (
    agreement,
    brier_score,
    calibration_error,
    expected_calibration_error,
    negative_log_likelihood,
    per_class_accuracy,
    topk_accuracy,
)


def test_ece_of_calibrated_predictor_is_near_zero():
    g = torch.Generator().manual_seed(0)
    probs = F.softmax(torch.randn(20000, 5, generator=g) * 2.0, dim=-1)
    labels = torch.multinomial(probs, 1, generator=g).squeeze(-1)
    assert expected_calibration_error(probs, labels) < 0.02


def test_ece_of_overconfident_predictor_is_large():
    g = torch.Generator().manual_seed(1)
    n, classes = 5000, 5
    guesses = torch.randint(0, classes, (n,), generator=g)
    probs = torch.full((n, classes), 0.0025).scatter(1, guesses[:, None], 0.99)
    labels = torch.randint(0, classes, (n,), generator=g)  # right only ~20% of the time
    ece = expected_calibration_error(probs, labels)
    assert ece > 0.3
    assert ece == pytest.approx(0.99 - (guesses == labels).float().mean().item(), abs=1e-6)


def test_ece_hand_case_uses_equal_width_bins():
    confidences = torch.tensor([0.9, 0.9, 0.6, 0.6])
    correct = torch.tensor([True, False, True, True])
    # bin (0.867, 0.933]: acc 0.5 vs conf 0.9, weight 2/4; bin (0.533, 0.6]: 1.0 vs 0.6, 2/4
    assert calibration_error(confidences, correct, bins=15) == pytest.approx(0.4)
    # with a single bin, over- and under-confidence cancel: |mean acc - mean conf|
    assert calibration_error(confidences, correct, bins=1) == pytest.approx(abs(0.75 - 0.75))


def test_brier_perfect_and_uniform():
    labels = torch.tensor([0, 2, 1, 3])
    assert brier_score(F.one_hot(labels, 4).float(), labels) == pytest.approx(0.0)
    uniform = torch.full((4, 4), 0.25)
    assert brier_score(uniform, labels) == pytest.approx(1 - 1 / 4)
    wrong = F.one_hot(torch.tensor([1, 0, 0, 0]), 4).float()
    assert brier_score(wrong, labels) == pytest.approx(2.0)


def test_top5_versus_top1_on_hand_made_logits():
    logits = torch.tensor(
        [
            [9.0, 8, 7, 6, 5, 4, 3],  # label 0: top-1 hit
            [9.0, 8, 7, 6, 5, 4, 3],  # label 4: 5th best, top-5 hit only
            [9.0, 8, 7, 6, 5, 4, 3],  # label 5: 6th best, miss
            [1.0, 2, 3, 4, 5, 6, 7],  # label 6: top-1 hit
        ]
    )
    labels = torch.tensor([0, 4, 5, 6])
    assert topk_accuracy(logits, labels, 1) == pytest.approx(0.5)
    assert topk_accuracy(logits, labels, 5) == pytest.approx(0.75)
    assert topk_accuracy(logits[:, :3], torch.tensor([0, 1, 2, 2]), 5) == 1.0  # k capped


def test_nll_of_uniform_logits_is_log_classes():
    assert negative_log_likelihood(torch.zeros(3, 6), torch.tensor([0, 1, 5])) == pytest.approx(
        math.log(6)
    )


def test_per_class_accuracy_hand_case():
    predictions = torch.tensor([0, 0, 1, 1, 2, 0])
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    assert per_class_accuracy(predictions, labels) == {
        "0": 1.0,
        "1": 1.0,
        "2": pytest.approx(1 / 3),
    }


def test_agreement_counts_equal_predictions():
    assert agreement(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 0])) == 0.5
    with pytest.raises(CompactMLError):
        agreement(torch.tensor([0, 1]), torch.tensor([0]))


def test_bad_labels_are_one_line_errors():
    with pytest.raises(CompactMLError, match="integer class ids"):
        topk_accuracy(torch.zeros(2, 3), torch.tensor([0.0, 1.0]), 1)
    with pytest.raises(CompactMLError, match="outside the model's 3 classes"):
        topk_accuracy(torch.zeros(2, 3), torch.tensor([0, 3]), 1)
    with pytest.raises(CompactMLError, match=r"\(batch, classes\)"):
        topk_accuracy(torch.zeros(2, 3, 4), torch.tensor([0, 1]), 1)
