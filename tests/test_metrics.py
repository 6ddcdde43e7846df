"""Vendi score and k-NN precision/recall against hand-computed values (libraries: vendi-score, prdc)."""
import math

import numpy as np
import pytest
import torch

from evaluation.metrics import knn_precision_recall, vendi_score

pytest.importorskip("vendi_score", reason="vendi-score not installed (pip install vendi-score==0.0.3 prdc==0.2)")
pytest.importorskip("prdc", reason="prdc not installed (pip install vendi-score==0.0.3 prdc==0.2)")


def test_vendi_of_orthogonal_and_identical_samples():
    assert vendi_score(torch.eye(5)) == pytest.approx(5.0)
    assert vendi_score(torch.ones(6, 3)) == pytest.approx(1.0)
    # Scale does not matter (cosine kernel).
    assert vendi_score(torch.eye(3) * torch.tensor([[1.0], [7.0], [0.2]])) == pytest.approx(3.0)


def test_vendi_of_two_vectors_with_cosine_c():
    c = 0.6                                   # K/2 has eigenvalues (1 +- c)/2
    x = torch.tensor([[1.0, 0.0], [c, math.sqrt(1 - c * c)]])
    p = np.array([(1 + c) / 2, (1 - c) / 2])
    assert vendi_score(x) == pytest.approx(math.exp(-(p * np.log(p)).sum()))


def test_knn_precision_recall_by_hand():
    # Real points on a line at 0, 1, 2, 3; k = 1: each real ball has radius 1 (distance to nearest neighbour).
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    # Fake: 0.5 is inside a real ball, 10 and 12 are not -> precision 1/3.
    fake = np.array([[0.5], [10.0], [12.0]])
    # Fake balls (k = 1): radius(0.5) = 9.5, radius(10) = 2, radius(12) = 2.
    # Real points within a fake ball: all of 0..3 are within 9.5 of 0.5 -> recall 1.
    out = knn_precision_recall(real, fake, k=1)
    assert out["precision"] == pytest.approx(1 / 3)
    assert out["recall"] == pytest.approx(1.0)
    # Coverage: real i covered if its nearest fake is within its own radius 1: only 0 and 1 (0.5 away).
    assert out["coverage"] == pytest.approx(0.5)


def test_identical_sets_have_full_precision_and_recall():
    x = np.random.default_rng(0).normal(size=(30, 4))
    out = knn_precision_recall(x, x + 1e-9, k=3)
    assert out["precision"] == pytest.approx(1.0) and out["recall"] == pytest.approx(1.0)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="zero feature"):
        vendi_score(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="differ"):
        knn_precision_recall(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="k must be"):
        knn_precision_recall(np.zeros((3, 2)), np.zeros((3, 2)), k=3)
