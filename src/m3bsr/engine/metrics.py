"""Ranking metrics from 1-based ranks (pure functions, no torch).

A rank is pessimistic: ``1 + #(other items whose score >= the positive's score)``, so ties count
against the positive (docs/training.md "Evaluation protocols"). For a rank ``r`` and cut-off ``K``:

* ``HR@K   = 1[r <= K]``
* ``NDCG@K = 1[r <= K] / log2(r + 1)`` (one relevant item, so the ideal DCG is 1)
* ``MRR    = 1 / r``

Each metric is the mean over evaluated targets. ``K`` larger than the candidate list is allowed
(every rank is then within the cut-off).
"""

from __future__ import annotations

import numpy as np

DEFAULT_KS = (5, 10, 20)


def metric_names(ks: tuple[int, ...] | list[int] = DEFAULT_KS) -> list[str]:
    """``["HR@5", "NDCG@5", ..., "MRR"]`` in report order."""
    return [name for k in ks for name in (f"HR@{k}", f"NDCG@{k}")] + ["MRR"]


def metrics_from_ranks(ranks: np.ndarray, ks: tuple[int, ...] | list[int] = DEFAULT_KS) -> dict[str, float]:
    """Mean HR@K, NDCG@K for every ``K`` in ``ks``, and MRR, of 1-based ``ranks`` [N].

    An empty ``ranks`` gives 0.0 for every metric (nothing was evaluated).
    """
    r = np.asarray(ranks, dtype=np.float64).reshape(-1)
    if r.size and (r < 1).any():
        raise ValueError(f"ranks are 1-based; got minimum {r.min()}")
    out: dict[str, float] = {}
    for k in ks:
        hit = r <= k
        out[f"HR@{k}"] = float(hit.mean()) if r.size else 0.0
        out[f"NDCG@{k}"] = float(np.where(hit, 1.0 / np.log2(r + 1.0), 0.0).mean()) if r.size else 0.0
    out["MRR"] = float((1.0 / r).mean()) if r.size else 0.0
    return out


def pessimistic_ranks(scores: np.ndarray, positive: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Reference ranks (NumPy, O(N x C)): ``1 + #{j != positive[n], valid[n, j]: scores[n, j] >= scores[n, positive[n]]}``.

    ``scores`` [N, C], ``positive`` [N] column of the positive, ``valid`` [N, C] bool (default all).
    Used by tests and small tables; the engine computes the same quantity in torch, chunk by chunk.
    """
    scores = np.asarray(scores)
    n = np.arange(len(scores))
    pos = scores[n, positive][:, None]
    ge = scores >= pos
    if valid is not None:
        ge &= valid
    ge[n, positive] = False
    return 1 + ge.sum(axis=1)
