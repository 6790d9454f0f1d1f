import itertools

import numpy as np
import pytest
import torch

from fedlens.shared.metrics import classification_report, roc_auc_ovr


def test_report_matches_hand_counts():
    # true:  0 0 1 1 2 2 ; pred: 0 1 1 1 2 0
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 0])
    logits = torch.nn.functional.one_hot(pred, 3).float() * 5
    r = classification_report(logits, labels, 3)
    assert r.accuracy == pytest.approx(4 / 6)
    assert r.confusion == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert r.precision == pytest.approx([0.5, 2 / 3, 1.0])
    assert r.recall == pytest.approx([0.5, 1.0, 0.5])
    f1 = [0.5, 0.8, 2 / 3]
    assert r.f1 == pytest.approx(f1)
    assert r.macro_f1 == pytest.approx(np.mean(f1))
    assert r.support == [2, 2, 2] and r.num_examples == 6


def _brute_force_auc(scores, positives):
    pos = scores[positives]
    neg = scores[~positives]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(40, 3)).astype(float)  # many ties
    labels = rng.integers(0, 3, size=40)
    aucs = roc_auc_ovr(scores, labels, 3)
    for c in range(3):
        assert aucs[c] == pytest.approx(_brute_force_auc(scores[:, c], labels == c))


def test_perfect_and_absent_classes():
    labels = torch.tensor([0, 1, 0, 1])
    logits = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [2.0, 0, 0], [0, 2.0, 0]])
    r = classification_report(logits, labels, 3)
    assert r.accuracy == 1.0 and r.macro_f1 == 1.0 and r.roc_auc_macro == 1.0
    assert np.isnan(r.roc_auc[2]) and r.support[2] == 0


def test_empty_evaluation_is_an_error():
    with pytest.raises(ValueError):
        classification_report(torch.empty(0, 3), torch.empty(0, dtype=torch.long), 3)
