"""Metrics from ranks, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from m3bsr.engine.metrics import metric_names, metrics_from_ranks, pessimistic_ranks


def test_metric_names_order():
    assert metric_names([5, 10, 20]) == ["HR@5", "NDCG@5", "HR@10", "NDCG@10", "HR@20", "NDCG@20", "MRR"]


def test_hand_computed_ranks():
    # ranks 1, 3, 7, 12: HR@5 = 2/4; NDCG@5 = (1 + 1/log2(4)) / 4 = (1 + 0.5) / 4
    m = metrics_from_ranks(np.array([1, 3, 7, 12]), ks=[5, 10])
    assert m["HR@5"] == pytest.approx(0.5)
    assert m["NDCG@5"] == pytest.approx(1.5 / 4)
    assert m["HR@10"] == pytest.approx(0.75)
    assert m["NDCG@10"] == pytest.approx((1 + 0.5 + 1 / 3) / 4)  # log2(8) = 3
    assert m["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 7 + 1 / 12) / 4)


def test_rank_exactly_at_cutoff_counts():
    m = metrics_from_ranks(np.array([10]), ks=[10])
    assert m["HR@10"] == 1.0
    assert m["NDCG@10"] == pytest.approx(1 / math.log2(11))


def test_k_larger_than_candidate_list():
    # 3 candidates: every rank is <= 3, so HR@20 is 1 and NDCG@20 is the mean of 1/log2(r+1).
    m = metrics_from_ranks(np.array([1, 2, 3]), ks=[20])
    assert m["HR@20"] == 1.0
    assert m["NDCG@20"] == pytest.approx((1 + 1 / math.log2(3) + 0.5) / 3)


def test_empty_and_invalid_ranks():
    assert all(v == 0.0 for v in metrics_from_ranks(np.array([], dtype=int)).values())
    with pytest.raises(ValueError):
        metrics_from_ranks(np.array([0, 1]))


def test_pessimistic_ranks_ties_count_against_the_positive():
    scores = np.array([
        [0.5, 0.9, 0.1, 0.3],   # positive col 0: one higher → rank 2
        [0.5, 0.5, 0.5, 0.1],   # two ties → rank 3 (pessimistic)
        [1.0, 1.0, 1.0, 1.0],   # all tied → rank 4
        [0.2, 0.1, 0.0, -1.0],  # best → rank 1
    ])
    ranks = pessimistic_ranks(scores, np.zeros(4, dtype=int))
    assert ranks.tolist() == [2, 3, 4, 1]
    # an all-tied row of C candidates scores like the worst position
    assert metrics_from_ranks(ranks[2:3], ks=[5])["NDCG@5"] == pytest.approx(1 / math.log2(5))


def test_pessimistic_ranks_with_masked_items_and_other_positions():
    scores = np.array([[0.1, 0.9, 0.8, 0.5]])
    valid = np.array([[True, False, True, True]])  # item 1 masked (e.g. already seen)
    assert pessimistic_ranks(scores, np.array([3]), valid).tolist() == [2]  # only 0.8 beats 0.5
    assert pessimistic_ranks(scores, np.array([3])).tolist() == [3]
