"""One convention for pairwise distances and medians: exact values, the lower median, one bandwidth check."""
import math

import pytest
import torch

from guidance import kernels
from guidance.kernels import (diff_block_rows, fixed_bandwidth, median_bandwidth, median_pair,
                              median_pairwise_distance, pairwise_distances, pairwise_sq_distances)


def test_pairwise_and_median_distance():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])
    d = pairwise_distances(x)
    assert d[0, 1].item() == pytest.approx(5.0) and d[1, 2].item() == pytest.approx(math.sqrt(18))
    assert median_pairwise_distance(x) == pytest.approx(math.sqrt(18))


def test_even_number_of_pairs_takes_the_lower_median():
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])          # 6 pairs: 1 2 3 4 6 7
    assert median_pairwise_distance(x) == 3.0
    value, i, j = median_pair(pairwise_sq_distances(x.double()))
    assert float(value) == 9.0 and {i, j} == {0, 2}
    assert float(median_bandwidth(x.double())) == pytest.approx(9.0 / math.log(3))


def test_squared_distances_match_the_exact_ones():
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(pairwise_sq_distances(x), pairwise_distances(x) ** 2, rtol=1e-12, atol=1e-12)


def test_a_median_needs_two_items_and_a_bandwidth_must_be_positive():
    with pytest.raises(ValueError, match="at least 2, got 1"):
        median_pairwise_distance(torch.zeros(1, 3))
    assert fixed_bandwidth(None) is None and fixed_bandwidth(0) is None and fixed_bandwidth(2) == 2.0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="bandwidth must be > 0"):
            fixed_bandwidth(bad)


def test_diff_block_rows_keeps_one_block_under_the_limit(monkeypatch):
    assert diff_block_rows(4, 16384) == kernels.DIFF_BLOCK_ELEMENTS // (4 * 16384) == 256
    assert diff_block_rows(0, 0) == kernels.DIFF_BLOCK_ELEMENTS
    monkeypatch.setattr(kernels, "DIFF_BLOCK_ELEMENTS", 64)
    assert diff_block_rows(2, 8) == 4 and diff_block_rows(5, 32) == 1     # never 0 rows, even over the limit
