"""Repeat head: a pointer over the user's own history items (not in the paper; docs/model.md "repeat head").

Users often act on what they acted on before: in e-commerce logs most buys were viewed or carted
earlier. A next-item softmax can learn this only through the item vectors; the head gives the
model an explicit path (in the spirit of RepeatNet's repeat mode): each history event ``j``
visible to a query adds

    bonus_j = a[behavior_j] + r[recency bucket of j] + y · W e_j / sqrt(d)

to the score of its item (an item seen several times adds up). ``a``, ``r`` and ``W`` start at
zero, so an untrained head changes nothing and the model starts as its backbone.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

N_RECENCY = 8
"""Recency buckets: 0, 1, 2-3, 4-7, ... events ago (log2), the last one open-ended."""


class RepeatHead(nn.Module):
    """Scores of the history events each query may see.

    Shapes: ``reps`` y [B, P, d], ``item_vecs`` e [B, H, d], ``behaviors`` [B, H] (0 = padding),
    ``times`` [B, H] ascending (padding = PAD_TIME, last), ``query_times`` [B, P] → bonus [B, P, H]
    (zero where event j is not strictly before the query).
    """

    def __init__(self, d: int, n_behaviors: int):
        super().__init__()
        self.behavior_bias = nn.Parameter(torch.zeros(n_behaviors + 1))
        self.recency_bias = nn.Parameter(torch.zeros(N_RECENCY))
        self.match = nn.Parameter(torch.zeros(d, d))

    def forward(self, reps: Tensor, item_vecs: Tensor, behaviors: Tensor, times: Tensor,
                query_times: Tensor) -> Tensor:
        B, H = times.shape
        d = reps.shape[-1]
        visible = times.unsqueeze(1) < query_times.unsqueeze(2)  # [B, P, H]
        # times ascend, so the visible events are a prefix: event j is (n_visible - 1 - j) events ago
        ago = visible.sum(-1, keepdim=True) - 1 - torch.arange(H, device=times.device)  # [B, P, H]
        bucket = torch.log2(ago.clamp(min=0).float() + 1).floor().long().clamp(max=N_RECENCY - 1)
        match = torch.einsum("bpd,de,bhe->bph", reps, self.match.to(reps.dtype), item_vecs) / math.sqrt(d)
        bonus = self.behavior_bias[behaviors].unsqueeze(1) + self.recency_bias[bucket] + match  # [B, P, H]
        return bonus.masked_fill(~visible, 0.0)
